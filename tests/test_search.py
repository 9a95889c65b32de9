"""Searching Kaggle's inputs: any depth, each folder once, never inside a data folder."""
import os

from rcic.search import walk


def test_walk_finds_any_depth_skips_data_folders_and_loops(tmp_path):
    deep = tmp_path / "notebooks" / "me" / "stage-01" / "ckpt-000000003"
    deep.mkdir(parents=True)
    data = tmp_path / "competitions" / "rxrx1"
    (data / "train" / "HUVEC-01" / "ckpt-000000009").mkdir(parents=True)
    (data / "train.csv").write_text("x")
    (data / "test.csv").write_text("x")
    os.symlink(tmp_path / "notebooks", tmp_path / "notebooks" / "me" / "loop")
    folders = [folder for folder, _ in walk([tmp_path, tmp_path / "notebooks"])]
    assert deep in folders
    assert data in folders                                  # the folder itself, not its tree
    assert not any(str(f).startswith(str(data / "train")) for f in folders)
    assert len(folders) == len(set(f.resolve() for f in folders))
