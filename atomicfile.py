"""Write a file so that readers see the old version or the new one, never half of either.

Every program here that writes an output (checkpoints, model.bin, tokenizer.bin, shards,
meta.json, exports) goes through `atomic_write`: the bytes go to a temporary file in the
same directory, are flushed to disk, and the temporary file is renamed over the target. A
failure on the way (a full disk, an exception, Ctrl-C) removes the temporary file and leaves
the previous file untouched.
"""

import os
import tempfile
from contextlib import contextmanager


class WriteError(OSError):
    """An output could not be written; the previous file (if any) is intact."""


@contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs):
    """`with atomic_write("out/model.bin") as f: f.write(...)`: f is the temporary file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise WriteError(f"{path}: cannot write, directory {folder} does not exist")
    # The rename would replace whatever is there: never a directory, a FIFO or a device such as /dev/null.
    if os.path.isdir(path):
        raise WriteError(f"{path}: is a directory; give a file name to write")
    if os.path.exists(path) and not os.path.isfile(path):
        raise WriteError(f"{path}: not a regular file (a FIFO or device?); refusing to replace it")
    try:  # remove_leftovers knows this name
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _new_file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{path}: write failed, previous file left intact ({e.strerror or e})") from None
        raise
    _sync_dir(folder)


def remove_leftovers(path) -> None:
    """Remove the temporary files of writes to `path` that were killed half way (a terminated worker)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder):
        if entry.startswith(f".{name}.") and entry.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, entry))
            except FileNotFoundError:
                pass


def _new_file_mode() -> int:
    """The mode open() would have given a new file (mkstemp's own is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _sync_dir(folder: str) -> None:
    """Make the rename itself durable (a crash right after it could otherwise undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename has still happened
    finally:
        os.close(fd)
