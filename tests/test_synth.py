"""rcic-synth: the competition's shape (--preset rxrx1) and parallel writing that keeps the bytes."""
import filecmp
import os

import numpy as np
import pandas as pd

from rcic.cli import synth
from rcic.data import layout
from rcic.data.synthetic import SynthSpec, generate, plate_jobs, rxrx1_spec, write_plate


def test_preset_has_the_competitions_experiments_and_plates():
    jobs = plate_jobs(rxrx1_spec(32))
    exps = {split: sorted({exp for s, exp, _, _ in jobs if s == split}) for split in ("train", "test")}
    by_cell = {split: pd.Series(names).str.split("-").str[0].value_counts().to_dict()
               for split, names in exps.items()}
    assert by_cell["train"] == {"HUVEC": 16, "HEPG2": 7, "RPE": 7, "U2OS": 3}
    assert by_cell["test"] == {"HUVEC": 8, "HEPG2": 4, "RPE": 4, "U2OS": 2}
    assert [e for e in exps["test"] if e.startswith("HEPG2")] == [f"HEPG2-{k:02d}" for k in range(8, 12)]
    assert "U2OS-05" in exps["test"] and "U2OS-04" not in exps["train"]
    assert len(jobs) == 51 * 4
    controls = list(range(layout.FIRST_CONTROL, layout.LAST_CONTROL + 1))
    groups = {}
    for split, exp, plate, sirnas in jobs:
        assert len(sirnas) == 308 == len(layout.WELLS)
        assert sorted(sirnas[277:]) == controls          # 30 positive controls + the negative
        groups.setdefault((split, plate), set()).add(tuple(sirnas[:277]))
    group_sets = {g for gs in groups.values() for g in gs}
    assert len(group_sets) == 4                           # 4 fixed groups ...
    assert sorted(s for g in group_sets for s in g) == list(range(1108))   # ... partitioning the siRNAs
    # train shows 3 of the 4 rotations: each plate position holds 3 groups across train
    assert all(len(groups[("train", plate)]) == 3 for plate in layout.PLATES)


def test_preset_fraction_keeps_the_first_experiments_of_each_cell_type():
    names = rxrx1_spec(32, fraction=0.25).experiments
    assert names["train"] == ["HEPG2-01", "HEPG2-02", "HUVEC-01", "HUVEC-02", "HUVEC-03",
                              "HUVEC-04", "RPE-01", "RPE-02", "U2OS-01"]
    assert names["test"] == ["HEPG2-08", "HUVEC-17", "HUVEC-18", "RPE-08", "U2OS-04"]


def test_one_preset_plate_fills_the_grid(tmp_path):
    spec = rxrx1_spec(16)
    job = plate_jobs(spec)[0]
    rows, stats = write_plate(tmp_path, spec, job)
    wells = pd.DataFrame(rows, columns=["split", "id_code", "experiment", "plate", "well",
                                        "sirna", "well_type"])
    assert sorted(wells.well) == sorted(layout.WELLS)
    assert wells.well_type.value_counts().to_dict() == {
        "treatment": 277, "positive_control": 30, "negative_control": 1}
    folder = tmp_path / "train" / "HEPG2-01" / "Plate1"
    assert len(os.listdir(folder)) == 308 * 2 * 6
    assert stats.count("\n") == 308 * 2 * 6
    first = stats.splitlines()[0].split(",")
    import cv2
    img = cv2.imread(str(folder / f"{first[3]}_s1_w1.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (16, 16) and float(first[6]) == round(img.mean(), 4)


def test_same_bytes_whatever_the_worker_count(tmp_path):
    spec = SynthSpec(n_classes=8, n_positive_controls=2, image_size=16, cell_types=["HUVEC"],
                     experiments={"train": ["HUVEC-01", "HUVEC-02"], "test": ["HUVEC-03"]})
    one = generate(tmp_path / "one", spec, workers=1)
    two = generate(tmp_path / "two", spec, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 3 * 4 * (2 + 2 + 1) * 2 * 6 + 8
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(one, two, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    stats = pd.read_csv(one / "pixel_stats.csv")
    assert len(stats) == 3 * 4 * 5 * 2 * 6 and list(stats.columns) == layout.SCHEMAS["pixel_stats.csv"]
    assert np.isclose(stats["mean"], stats["mean"].round(4)).all()


def test_cli_preset_refuses_shape_options(tmp_path, capsys):
    assert synth.main(["--preset", "rxrx1", "--classes", "8", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave out --classes" in err
    assert not (tmp_path / "x").exists()
    assert synth.main(["--fraction", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--fraction needs --preset rxrx1" in capsys.readouterr().err
    assert synth.main(["--preset", "rxrx1", "--fraction", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--fraction 0.0" in capsys.readouterr().err
