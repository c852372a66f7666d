"""atomicfile.atomic_write: the old file or the new one, never half, and no leftovers."""

import os

import pytest

from atomicfile import WriteError, atomic_write


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
