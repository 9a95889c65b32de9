"""The RxRx1 layout: schemas, paths, splits by experiment, controls and every kind of bad input."""
import shutil
import subprocess

import pandas as pd
import pytest

from rcic.data import layout
from rcic.data.layout import RxRx1
from rcic.data.synthetic import SynthSpec, generate
from rcic.errors import UserError


def test_schemas_match_the_competition_files(tiny_data):
    for name, columns in layout.SCHEMAS.items():
        assert list(pd.read_csv(tiny_data / name, nrows=1).columns) == columns


def test_real_sized_plates_fill_the_308_well_grid(tmp_path):
    """1,108 classes and 30 positive controls: each plate is exactly the real 308-well grid."""
    spec = SynthSpec(n_classes=1108, n_positive_controls=30, image_size=16, train_experiments=1,
                     test_experiments=1, cell_types=["U2OS"])
    data = RxRx1(generate(tmp_path / "real", spec))
    plates = data.wells.groupby(["experiment", "plate"])
    assert plates.size().eq(308).all()
    assert plates["well"].apply(lambda w: sorted(w) == sorted(layout.WELLS)).all()
    treat = data.wells[(data.wells.split == "train") & (data.wells.well_type == "treatment")]
    assert sorted(treat.sirna) == list(range(1108))     # each siRNA once per experiment
    assert data.n_treatments == 1108
    assert data.experiments("test") == ["U2OS-02"]


def test_sites_and_paths(tiny_data):
    data = RxRx1(tiny_data)
    assert len(data.sites) == 2 * len(data.wells)
    row = next(data.sites.itertuples(index=False))
    paths = data.paths(row)
    assert [p.name for p in paths] == [f"{row.well}_s{row.site}_w{c}.png" for c in range(1, 7)]
    assert paths[0].parent == tiny_data / row.split / row.experiment / f"Plate{row.plate}"
    assert data.image_size == (16, 16)
    assert set(data.wells.cell_type) == {"HUVEC", "RPE"}


def test_split_is_by_whole_experiments(tiny_data):
    data = RxRx1(tiny_data)
    train, val = data.split_sites()
    assert set(val.experiment) == {"HUVEC-02", "RPE-02"}
    assert not set(train.experiment) & set(val.experiment)
    assert (train.well_type == "treatment").all()
    train_c, _ = data.split_sites(use_controls=True)
    assert {"positive_control", "negative_control"} <= set(train_c.well_type)
    assert (train_c.split == "train").all()
    train_t, _ = data.split_sites(use_test_controls=True)
    assert (train_t[train_t.split == "test"].well_type != "treatment").all()
    only, _ = data.split_sites(cell_types=["RPE"])
    assert set(only.cell_type) == {"RPE"}


def test_class_index_puts_controls_after_treatments(tiny_data):
    data = RxRx1(tiny_data)
    assert list(data.class_index([0, 7, 1108, 1138])) == [0, 7, 8, 38]


def test_channel_stats_pool_sites_exactly(tiny_data):
    data = RxRx1(tiny_data)
    stats = data.channel_stats("experiment")
    px = pd.read_csv(tiny_data / "pixel_stats.csv")
    part = px[(px.experiment == "HUVEC-01") & (px.channel == 3)]
    assert stats["HUVEC-01"][0][2] == pytest.approx(part["mean"].mean(), rel=1e-5)
    assert set(data.channel_stats("plate")) >= {"HUVEC-01_1", "RPE-03_4"}


def bad(data_dir, *needles):
    with pytest.raises(UserError) as err:
        RxRx1(data_dir)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_folder_and_files(tmp_path, own_data):
    bad(tmp_path / "nope", "does not exist")
    (own_data / "test.csv").unlink()
    bad(own_data, "test.csv is missing")


def test_wrong_columns(own_data):
    df = pd.read_csv(own_data / "train.csv")
    df.drop(columns="well").assign(extra=1).to_csv(own_data / "train.csv", index=False)
    bad(own_data, "train.csv lacks column(s) well", "unexpected column(s) extra")


def test_duplicate_id_out_of_range_sirna_unknown_experiment(own_data):
    df = pd.read_csv(own_data / "train.csv")
    df.loc[1, "sirna"] = 1500
    df = pd.concat([df, df.iloc[[0]]])
    df.to_csv(own_data / "train.csv", index=False)
    bad(own_data, "duplicated id_code", "siRNA 1500")
    df = pd.read_csv(own_data / "test.csv")
    df.loc[0, "experiment"] = "weird_name"
    df.to_csv(own_data / "test.csv", index=False)
    bad(own_data, "unknown experiment name(s) weird_name")


def test_every_broken_image_is_reported(own_data):
    data = RxRx1(own_data)
    rows = list(data.sites.itertuples(index=False))
    missing, empty, not_png, wrong_size = (data.paths(rows[i])[0] for i in (0, 1, 2, 3))
    missing.unlink()
    empty.write_bytes(b"")
    not_png.write_text("hello")
    import cv2
    import numpy as np
    cv2.imwrite(str(wrong_size), np.zeros((20, 20), np.uint8))
    message = bad(own_data, "4 problem(s)", "missing", "empty (0 bytes)", "not a PNG file")
    assert "20x20" in message


def test_colour_png_is_rejected(own_data):
    import cv2
    import numpy as np
    data = RxRx1(own_data)
    path = data.paths(next(data.sites.itertuples(index=False)))[0]
    cv2.imwrite(str(path), np.zeros((16, 16, 3), np.uint8))
    bad(own_data, "not 8-bit grayscale")


def test_cli_reports_one_line_and_exit_2(tmp_path):
    out = tmp_path / "x"
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("precious")
    result = subprocess.run(["rcic-synth", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = subprocess.run(["rcic-synth", "--out", str(tmp_path / "y"), "--classes", "7"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "multiple of 4" in result.stderr


def test_a_missing_plate_folder_is_one_problem(own_data):
    shutil.rmtree(own_data / "train" / "RPE-02" / "Plate3")
    bad(own_data, "1 problem(s)", "train/RPE-02/Plate3 is missing (its ")


def test_large_folders_sample_headers_and_a_broken_file_is_named_when_read(own_data,
                                                                            monkeypatch):
    """Above HEADER_SAMPLE images only a spread of headers is read at open; every missing file
    is still found (from the folder listings), and a broken file outside the sample fails
    when it is read, naming the file."""
    from rcic.data.images import decode_site
    monkeypatch.setattr(layout, "HEADER_SAMPLE", 60)
    data = RxRx1(own_data)
    expected = data.expected_files()
    sample = layout.header_sample(expected, 60)
    assert 60 <= len(sample) <= 60 + len(expected)
    assert {folder for folder, _ in sample} == set(expected)          # every plate folder
    assert {name[-6:-4] for _, name in sample} == {f"w{c}" for c in range(1, 7)}
    sampled = {f"{folder}/{name}" for folder, name in sample}
    rows = list(data.sites.itertuples(index=False))
    row = next(r for r in rows if str(data.paths(r)[2].relative_to(own_data)) not in sampled)
    broken = data.paths(row)[2]
    broken.write_bytes(b"")
    assert RxRx1(own_data).image_size == (16, 16)       # opens: the file is outside the sample
    with pytest.raises(UserError, match=f"cannot decode image {broken}"):
        decode_site(data.paths(row), 16)
    broken.unlink()
    bad(own_data, f"{broken.relative_to(own_data)} is missing")
    folder, name = sample[5]
    (own_data / folder / name).write_text("hello")
    bad(own_data, f"{folder}/{name} is not a PNG file")


def test_pixel_stats_header_checked_at_open_body_when_statistics_are_needed(own_data):
    path = own_data / "pixel_stats.csv"
    good = path.read_text()
    path.write_text(good.replace(",median,", ",medium,", 1))
    bad(own_data, "pixel_stats.csv lacks column(s) median", "unexpected column(s) medium")
    lines = good.splitlines()
    fields = lines[5].split(",")
    fields[6] = "n/a?"                                      # its mean
    path.write_text("\n".join(lines[:5] + [",".join(fields)] + lines[6:]) + "\n")
    data = RxRx1(own_data)                                 # the body is not read at open
    with pytest.raises(UserError, match=f"{path} cannot be read .*data.normalization=image"):
        data.channel_stats("experiment")


def test_an_odd_sized_image_outside_the_header_sample_is_refused_when_read(own_data,
                                                                          monkeypatch):
    """The open reads a sample of headers only: an image of another size that it missed is
    refused, naming the file, when a dataset reads it, instead of being silently resized."""
    import cv2
    import numpy as np

    from rcic.config import Recipe
    from rcic.data.dataset import site_reader
    monkeypatch.setattr(layout, "HEADER_SAMPLE", 60)
    data = RxRx1(own_data)
    sampled = {f"{folder}/{name}" for folder, name in
               layout.header_sample(data.expected_files(), 60)}
    row = next(r for r in data.sites.itertuples(index=False)
               if str(data.paths(r)[4].relative_to(own_data)) not in sampled)
    odd = data.paths(row)[4]
    cv2.imwrite(str(odd), np.zeros((24, 24), np.uint8))
    data = RxRx1(own_data)
    assert data.image_size == (16, 16)                   # opens: the file is outside the sample
    recipe = Recipe()
    recipe.data.image_size = 8
    read = site_reader(data, recipe)
    with pytest.raises(UserError, match=f"image {odd} is 24x24, the folder's others 16x16"):
        read(row)
