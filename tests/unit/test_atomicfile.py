"""atomicfile.atomic_write: the old file or the new one, never half, and no leftovers."""

import os
import subprocess
import sys

import pytest

from atomicfile import WriteError, atomic_write, remove_leftovers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_writes_the_new_bytes_with_the_usual_mode(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new bytes")
    assert target.read_bytes() == b"new bytes"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["model.bin"]


def test_an_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half of a new one")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


class FullDisk:
    """Stands in for the file object when the disk fills up mid-write."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(28, "No space left on device")


def test_a_failing_write_is_one_line_naming_the_file(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("{}")
    with pytest.raises(WriteError) as err, atomic_write(target, "w") as f:
        FullDisk(f).write("{...}")
    assert str(target) in str(err.value) and "No space left" in str(err.value)
    assert "\n" not in str(err.value)
    assert target.read_text() == "{}"
    assert os.listdir(tmp_path) == ["meta.json"]


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(WriteError, match="does not exist"), atomic_write(tmp_path / "no" / "x.bin") as f:
        f.write(b"x")


def test_remove_leftovers_clears_the_temporaries_of_a_killed_writer(tmp_path):
    target, neighbour = tmp_path / "data00.bin", tmp_path / "data01.bin"
    neighbour.write_bytes(b"another shard")
    (tmp_path / ".data01.bin.abc.tmp").write_bytes(b"another shard's write in flight")
    killed = "import os, sys; from atomicfile import atomic_write\n" \
             "with atomic_write(sys.argv[1]) as f: f.write(b'half'); f.flush(); os._exit(9)"
    done = subprocess.run([sys.executable, "-c", killed, str(target)], cwd=ROOT)
    assert done.returncode == 9 and len(os.listdir(tmp_path)) == 3  # the killed write's temporary is there
    remove_leftovers(target)
    assert sorted(os.listdir(tmp_path)) == [".data01.bin.abc.tmp", "data01.bin"]
