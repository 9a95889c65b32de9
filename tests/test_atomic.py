"""rcic.atomic: a write replaces the file whole, and a failed write leaves the old file and no
temporary file behind."""
import pytest

from rcic.atomic import PARTIAL, write_atomic
from rcic.errors import UserError, refuse_nonempty


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    write_atomic(path, "new\n")
    write_atomic(tmp_path / "blob.bin", b"\x00\x01")
    assert path.read_text() == "new\n"
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "out.csv"]


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"intact")

    def half_then_fail(f):
        f.write(b"half of the new file")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"intact"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pt"]
    assert not list(tmp_path.glob(f"*{PARTIAL}*"))


def test_a_writer_returns_its_result(tmp_path):
    assert write_atomic(tmp_path / "x", lambda f: f.write(b"abc")) == 3
    assert (tmp_path / "x").read_bytes() == b"abc"


def test_refuse_nonempty(tmp_path):
    refuse_nonempty(tmp_path / "new")          # absent: fine
    refuse_nonempty(tmp_path)                  # empty: fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=f"bundle folder {tmp_path} exists and is not empty"):
        refuse_nonempty(tmp_path, "bundle folder")
    with pytest.raises(UserError, match="not empty"):
        refuse_nonempty(tmp_path / "f")        # a file where a folder should be
