"""rcic-chain report: one self-contained page and one picture of a chain, or of several.

One 2-stage local chain (with its cache kernels) is run once for the module, about half a
minute of CPU; every test reads it. A second chain, laid out as a pushed chain's folder after
`rcic-chain output` and `submit`, is made from the same outputs.
"""
import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from rcic import stage_report
from rcic.budget import Budget
from rcic.cli.chain import main as chain_main
from rcic.cli.common import open_data
from rcic.config import load_recipe
from rcic.kaggle import chain as chain_files
from rcic.kaggle.local import run_local_chain
from rcic.kaggle.record import Record
from rcic.report import after_stage
from rcic.report.chains import HISTORY, PARTS, Chain, Stage, kernel_seconds_at
from rcic.train import Trainer
from test_local_chain import RECIPE    # the local chain's tiny recipe: 12 steps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def local_chain(tmp_path_factory, tiny_data):
    """A finished 2-stage dry run: (its folder, run_local_chain's result). Each stage stops
    after 6 steps, long before its budget (which leaves room for the last one's report)."""
    root = tmp_path_factory.mktemp("report")
    (root / "recipe.yaml").write_text(RECIPE)
    result = run_local_chain(2, "10m", root / "chain-a", recipe=root / "recipe.yaml",
                             data=tiny_data, steps_per_stage=6, cache_size=16,
                             echo=lambda line: None)
    return root / "chain-a", result


class Page(HTMLParser):
    """The parts of report.html a test looks at: tables (as rows of cell texts), images,
    every src and href, and the tags used."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self.links, self.tags, self.h3 = [], [], [], set(), []
        self._cell, self._in_h3 = None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        self._in_h3 = tag == "h3"

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        self._in_h3 = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_h3:
            self.h3.append(data)

    def table(self, first_header):
        return next(t for t in self.tables if t[0][0] == first_header)


UNIT_SECONDS = {"s": 1, "min": 60, "h": 3600}


def seconds_of(text):
    """'2.9 min' -> 174.0: the page's durations back into seconds."""
    value, unit = text.split()
    return float(value) * UNIT_SECONDS[unit]


def rounding(texts):
    """How far the sum of durations shown with one decimal may be from the true sum."""
    return sum(UNIT_SECONDS[text.split()[1]] * 0.05 for text in texts) + 1e-6


def png_size(data):
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


def check_self_contained(page):
    """Every picture inside the page, and nothing anywhere that a browser would fetch."""
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        width, height = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width >= 300 and height >= 150
    assert not [link for link in page.links if not link.startswith("data:")]
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}


def test_a_local_chain_reports_each_stage_and_its_costs(local_chain, tmp_path, capsys):
    folder, result = local_chain
    # The dry run wrote its report and named it.
    assert result["report"] == folder / "report" / "report.html"
    assert result["report"].is_file()

    assert chain_main(["report", str(folder), "--out", str(tmp_path / "R")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'R' / 'report.html'}"
    page = Page((tmp_path / "R" / "report.html").read_text())
    check_self_contained(page)

    # A row per stage, and where its budget went: the parts up to the process's end add up to
    # when it ended, the rest of the 10-minute budget is unused; the cache expand and start-up
    # are those stage.json measured. (Seconds show with 0.1 s, minutes with 0.1 min.)
    stages = page.table("stage")
    header, rows = stages[0], stages[1:]
    assert [row[0] for row in rows] == ["stage-01", "stage-02"]
    for row in rows:
        cells = dict(zip(header, row))
        report = stage_report.read(folder / "runs" / cells["stage"] / "working")
        assert cells["budget"] == "10.0 min"
        spent = [cells[part] for part in PARTS if part != "unused"]
        assert sum(map(seconds_of, spent)) == pytest.approx(report["exit_seconds"],
                                                             abs=rounding(spent))
        assert seconds_of(cells["unused"]) == pytest.approx(600 - report["exit_seconds"],
                                                            abs=rounding([cells["unused"]]))
        startup = [cells["start-up"], cells["cache expand"]]
        assert seconds_of(cells["cache expand"]) == pytest.approx(report["cache"]["seconds"],
                                                                  abs=rounding(startup[1:]))
        assert sum(map(seconds_of, startup)) == pytest.approx(report["costs"]["startup_seconds"],
                                                              abs=rounding(startup))
        assert cells["reached"] == f"{report['global_step']}/12"
    assert [dict(zip(header, row))["stopped by"] for row in rows] == ["steps", "done"]

    # The chain's summary: both stages ran, the recipe is finished, and the submission's
    # accuracy is the one the submission kernel measured against the answer key.
    summary = {row[0]: row[1:] for row in page.table("")[1:]}
    assert summary["stages run / rendered"] == ["2 / 2"]
    assert summary["stages the recipe still needs"] == ["finished"]
    predicted = json.loads((folder / "runs" / "submit" / "working" /
                            "predict_report.json").read_text())["accuracy"]
    assert summary["submission"][0].startswith(
        f"accuracy {predicted['assign']['overall']:.3f} with the per-plate assignment")

    # Validation accuracy per cell type: one row per cell type of the data.
    assert [row[0] for row in page.table("cell type")[1:]] == ["HUVEC", "RPE"]

    picture = (tmp_path / "R" / "report.png").read_bytes()
    width, height = png_size(picture)
    assert width >= 800 and height >= 600 and len(picture) > 20_000


def test_the_last_stage_and_the_submission_kernel_write_the_report(local_chain):
    folder, _ = local_chain
    runs = folder / "runs"
    # Every stage keeps the reports of those before it: a kernel sees only the previous output.
    carried = json.loads((runs / "stage-02" / "working" / HISTORY / "stage-01.json").read_text())
    assert carried == stage_report.read(runs / "stage-01" / "working")
    assert not (runs / "stage-01" / "working" / "report.html").exists()
    for kernel in ("stage-02", "submit"):
        page = Page((runs / kernel / "working" / "report.html").read_text())
        check_self_contained(page)
        assert [row[0] for row in page.table("stage")[1:]] == ["stage-01", "stage-02"]
        assert (runs / kernel / "working" / "report.png").read_bytes()[:8] == PNG_MAGIC
        assert "the chain's report: " in (runs / kernel / "kernel.log").read_text()
    # The submission kernel's report has the submission; the stage's has none yet.
    summary = {row[0]: row[1] for row in Page(
        (runs / "submit" / "working" / "report.html").read_text()).table("")[1:]}
    assert summary["submission"].startswith("accuracy ")


def pushed_copy(local, tmp_path):
    """The same chain as a pushed chain's folder: rendered by init, its outputs where
    `rcic-chain output` puts them, its runs and scores in pushes.json (written through the
    driver's own Record). Stage k ran for k hours, as the driver saw it."""
    spec = chain_files.ChainSpec(owner="someone", prefix="rcic-pushed", stages=2, budget="10m",
                                 recipe=local.parent / "recipe.yaml", cache_size=16)
    pushed = tmp_path / "chain-b"
    chain_files.render_chain(spec, pushed)
    record = Record(pushed)
    for k, name in enumerate(["cache-train", "cache-test", "stage-01", "stage-02", "submit"]):
        if name.startswith("stage") or name == "submit":
            shutil.copytree(local / "runs" / name / "working", pushed / name / "output")
        hours = int(name[-1]) if name.startswith("stage") else 0.5
        attempt = record.intend(name, chain_files.kernel_id(pushed / name), None)
        record.update(attempt, version=1, pushed_at=1000.0, running_at=1000.0,
                      finished_at=1000.0 + hours * 3600, state="complete")
    record.data["submission"] = {"version": 1, "sent_at": 2000.0, "ref": 7, "message": "",
                                 "public_score": "0.812", "private_score": "0.797"}
    record.save()
    return pushed


def test_two_chains_side_by_side(local_chain, tmp_path):
    local, _ = local_chain
    pushed = pushed_copy(local, tmp_path)
    assert chain_main(["report", str(local), str(pushed), "--out", str(tmp_path / "R")]) == 0
    page = Page((tmp_path / "R" / "report.html").read_text())
    check_self_contained(page)
    summary = page.table("")
    assert summary[0] == ["", "chain-a", "chain-b"]
    summary = {row[0]: row[1:] for row in summary[1:]}
    # The pushed chain's GPU time is the driver's: 1 h + 2 h of stages and the half-hour
    # submission kernel (the cache kernels ran on CPUs); what is left of the 30 h follows.
    assert summary["kernel time used (GPU time on Kaggle)"][1] == "3.50 h"
    assert summary[next(k for k in summary if k.startswith("left of a week"))][1] == "26.50 h"
    assert "public score 0.812, private score 0.797" in summary["submission"][1]
    assert [h.strip() for h in page.h3] == ["chain-a", "chain-b"]
    # The chains' stage rows follow one another in the costs picture, and both have a table.
    assert [t[0][0] for t in page.tables].count("stage") == 2


def test_a_folder_that_is_not_a_chain_is_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert chain_main(["report", str(tmp_path / "notes"), "--out", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'notes'} is not a chain folder" in err
    assert not (tmp_path / "R").exists()


def rendered_chain(tmp_path):
    """A chain as rcic-chain init leaves it: nothing pushed, no output downloaded."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    spec = chain_files.ChainSpec(owner="someone", prefix="rcic-fresh", stages=2, budget="10m",
                                 recipe=recipe)
    chain_files.render_chain(spec, tmp_path / "fresh")
    return tmp_path / "fresh"


def test_a_chain_with_no_output_yet_shows_its_stages_as_missing(tmp_path):
    fresh = rendered_chain(tmp_path)
    assert chain_main(["report", str(fresh), "--out", str(tmp_path / "R")]) == 0
    page = Page((tmp_path / "R" / "report.html").read_text())
    check_self_contained(page)
    assert [row[:2] for row in page.table("stage")[1:]] == [["stage-01", "no stage.json here"],
                                                           ["stage-02", "no stage.json here"]]
    summary = {row[0]: row[1:] for row in page.table("")[1:]}
    assert summary["stages run / rendered"] == ["0 / 2"]
    assert summary["submission"] == ["no submission kernel output here"]


def test_an_unwritable_report_folder_is_one_line(tmp_path, capsys):
    fresh = rendered_chain(tmp_path)
    (tmp_path / "R").write_text("a file, not a folder")
    assert chain_main(["report", str(fresh), "--out", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the report into" in err
    assert (tmp_path / "R").read_text() == "a file, not a folder"


def test_a_report_that_fails_never_fails_the_stage_kernel(tmp_path):
    lines = []
    settings = {"stage": 2, "stages": 2}
    # The previous stage's output lacks its stage.json: nothing to carry, nothing to draw.
    after_stage(settings, [tmp_path / "missing"], tmp_path, Budget(600), echo=lines.append)
    assert len(lines) == 1 and "the chain's report was not written" in lines[0]


def test_steps_are_placed_on_the_chain_clock_within_their_stage():
    # Stage 1: steps 0-100 trained from 10 s (its start-up's end) to 110 s, and its kernel ran
    # 120 s; stage 2: steps 100-300 from 20 s to 220 s of its own clock.
    def stage(name, step, startup, used, seconds):
        return Stage(name, {"global_step": step, "seconds_used": used,
                            "costs": {"startup_seconds": startup}}, seconds)
    chain = Chain("c", "c", [stage("stage-01", 100, 10, 110, 120),
                             stage("stage-02", 300, 20, 220, 240)])
    assert [kernel_seconds_at(chain, step) for step in (0, 50, 100, 101, 200, 300)] == \
        pytest.approx([10, 60, 110, 120 + 20 + 1, 120 + 20 + 100, 120 + 220])


def test_validation_accuracy_per_cell_type_adds_up_to_the_whole(tiny_data):
    recipe = load_recipe(None, ["data.image_size=16", "data.batch_size=4",
                                "data.num_workers=0"])
    trainer = Trainer(recipe, open_data(tiny_data), torch.device("cpu"), with_pretrained=False)
    row = trainer.evaluate()
    counts = trainer.val_set.sites["cell_type"].value_counts()
    assert sorted(k for k in row if k.startswith("val_acc_")) == \
        sorted(f"val_acc_{t}" for t in counts.index)
    weighted = sum(row[f"val_acc_{t}"] * n for t, n in counts.items()) / counts.sum()
    assert weighted == pytest.approx(row["val_acc"])


# Counts the page's images a browser did not decode whole: a PNG cut short still shows its top
# rows, but its last pixel stays transparent (the report's pictures are opaque).
CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const whole = image => {
    if (!image.complete || image.naturalWidth === 0) return false;
    const canvas = document.createElement("canvas");
    [canvas.width, canvas.height] = [image.naturalWidth, image.naturalHeight];
    const context = canvas.getContext("2d");
    context.drawImage(image, 0, 0);
    return context.getImageData(canvas.width - 1, canvas.height - 1, 1, 1).data[3] === 255;
  };
  const images = [...document.images];
  document.title = `images ${images.length} broken ${images.filter(i => !whole(i)).length}`;
});
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (Debian package)")
def test_a_real_browser_opens_the_report_offline(local_chain, tmp_path):
    folder, result = local_chain
    page = result["report"]
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", "--window-size=1400,2400"]
    shot = tmp_path / "shot.png"
    run = subprocess.run([*browser, f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 50_000
    assert "Uncaught" not in run.stderr and "Failed to load resource" not in run.stderr
    # The page's own images decode in the browser: a copy with a script that counts them.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_IMAGES + "</body>"))
    run = subprocess.run([*browser, "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=180)
    found = re.search(r"<title>images (\d+) broken (\d+)</title>", run.stdout)
    assert found, run.stdout[:2000]
    assert int(found.group(1)) == len(Page(page.read_text()).images) and found.group(2) == "0"
