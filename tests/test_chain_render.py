"""rcic-chain init: rendered kernels obey Kaggle's metadata rules and carry their settings;
bad input is one line and exit 2; inputs are found by searching; plan's arithmetic."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from slugify import slugify

from rcic.budget import parse_duration
from rcic.cli.chain import main
from rcic.config import load_recipe
from rcic.errors import UserError
from rcic.kaggle import chain, metadata
from rcic.kaggle.kernel import find_data_dir, find_shallow
from rcic.kaggle.plan import plan

REPO = Path(__file__).resolve().parent.parent
RECIPE = "name: t\ndata:\n  batch_size: 8\ntrain:\n  epochs: 2\n"


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def init(tmp_path, recipe, *extra):
    out = tmp_path / "chain"
    argv = ["init", "--owner", "jdoe", "--prefix", "rcic-b0", "--stages", "3",
            "--config", str(recipe), "--out", str(out), *extra]
    return main(argv), out


def settings_of(script):
    line = next(l for l in script.read_text().splitlines() if l.startswith("SETTINGS = "))
    return ast.literal_eval(line[len("SETTINGS = "):])


def test_rendered_chain_follows_kaggle_rules(tmp_path, recipe):
    status, out = init(tmp_path, recipe)
    assert status == 0
    assert json.loads((out / "chain.json").read_text())["kernels"] == [
        "stage-01", "stage-02", "stage-03", "submit"]
    metas = {}
    for folder in chain.kernel_folders(out):
        text = (folder / metadata.KERNEL_METADATA).read_text()
        meta = json.loads(text)
        assert metadata.kernel_problems(meta, folder) == []
        # Stated explicitly, as a JSON boolean: the client's default would be true.
        assert '"enable_internet": false' in text
        assert meta["is_private"] is True and meta["enable_gpu"] is True
        assert meta["language"] == "python" and meta["kernel_type"] == "script"
        assert (folder / meta["code_file"]).is_file()
        owner, slug = meta["id"].split("/")
        assert owner == "jdoe" and len(slug) >= 5 and len(meta["title"]) >= 5
        # The client warns when a title does not slugify to the id (its own python-slugify).
        assert slugify(meta["title"]) == slug
        # Re-pushes keep the kernel's first image (the client forwards this field).
        assert meta["docker_image_pinning_type"] == "original"
        assert meta["dataset_sources"] == ["jdoe/rcic-package"]
        assert meta["competition_sources"] == ["recursion-cellular-image-classification"]
        assert meta["machine_shape"] == "NvidiaTeslaT4"
        metas[folder.name] = meta
    assert metas["stage-01"]["kernel_sources"] == []
    assert metas["stage-02"]["kernel_sources"] == ["jdoe/rcic-b0-stage-01"]
    assert metas["stage-03"]["kernel_sources"] == ["jdoe/rcic-b0-stage-02"]
    assert metas["submit"]["kernel_sources"] == ["jdoe/rcic-b0-stage-03"]
    assert metas["submit"]["code_file"] == "submit_kernel.py"


def test_scripts_carry_their_settings_and_nothing_else_changes(tmp_path, recipe):
    status, out = init(tmp_path, recipe, "--budget", "7h30m", "--machine-shape", "NvidiaTeslaA100")
    assert status == 0
    template = (REPO / "kernels" / "stage_kernel.py").read_text().splitlines()
    for k in (1, 2, 3):
        script = out / f"stage-{k:02d}" / "stage_kernel.py"
        compile(script.read_text(), str(script), "exec")
        s = settings_of(script)
        assert (s["kind"], s["stage"], s["stages"], s["budget"]) == ("stage", k, 3, "7h30m")
        assert s["recipe_yaml"] == RECIPE and s["recipe_file"] == "recipe.yaml"
        changed = [a for a, b in zip(template, script.read_text().splitlines()) if a != b]
        assert len(changed) == 1 and changed[0].startswith("SETTINGS = ")
        meta = json.loads((script.parent / metadata.KERNEL_METADATA).read_text())
        assert meta["machine_shape"] == "NvidiaTeslaA100"
    assert settings_of(out / "submit" / "submit_kernel.py")["kind"] == "submit"


def budgets(out):
    return {settings_of(out / f"stage-{k:02d}" / "stage_kernel.py")["budget"] for k in (1, 2, 3)}


def test_the_default_budget_fills_a_twelve_hour_t4_session(tmp_path, recipe, capsys):
    status, out = init(tmp_path / "t4", recipe)
    assert status == 0
    (budget,) = budgets(out)
    assert 11 * 3600 <= parse_duration(budget) <= 11.5 * 3600
    rendered = json.loads((out / "chain.json").read_text())
    assert rendered["budget"] == budget and rendered["session_limit"] == 12 * 3600
    assert "Technical Specifications" in rendered["session_limit_source"]
    assert f"a budget of {budget} in a session of at most 12h" in capsys.readouterr().out
    # A TPU session, or a competition's own limit, is 9 hours: the default follows it.
    for extra in (["--machine-shape", "TpuV5E8"], ["--session-limit", "9h"]):
        status, out = init(tmp_path / extra[0].strip("-"), recipe, *extra)
        assert status == 0
        (budget,) = budgets(out)
        assert 8 * 3600 <= parse_duration(budget) < 9 * 3600


def test_a_budget_up_to_the_room_in_the_session_is_accepted(tmp_path, recipe):
    status, out = init(tmp_path, recipe, "--budget", "11h30m")
    assert status == 0 and budgets(out) == {"11h30m"}


@pytest.mark.parametrize("prefix", ["rcic--b0", "rcic-b0-"])
def test_a_prefix_whose_titles_slugify_to_another_id_is_refused(tmp_path, recipe, capsys,
                                                                 prefix):
    argv = ["init", "--owner", "jdoe", "--prefix", prefix, "--stages", "1",
            "--config", str(recipe), "--out", str(tmp_path / "chain")]
    assert main(argv) == 2
    made = slugify(f"{prefix} stage 01")
    assert capsys.readouterr().err.strip() == (
        f"rcic-chain: error: --prefix {prefix!r}: Kaggle makes the title '{prefix} stage 01' "
        f"into the slug {made!r}, not the kernel's id '{prefix}-stage-01', and would not find "
        f"the kernel by its id: use single hyphens between letters and digits, e.g. --prefix "
        f"rcic-b0")
    assert not (tmp_path / "chain").exists()


@pytest.mark.parametrize("change, fragment", [
    (["--prefix", "ab"], "--prefix 'ab'"),
    (["--prefix", "Bad_Slug"], "not a Kaggle slug"),
    (["--stages", "0"], "at least 1 stage"),
    (["--budget", "3600"], "not a duration"),
    (["--budget", "12h30m"], "--budget 12h30m does not fit a 12h session (Kaggle's 12-hour "
                             "GPU sessions)"),
    (["--session-limit", "9x"], "not a duration"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--owner", "a/b"], "not a Kaggle user name"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, recipe, capsys, change, fragment):
    argv = ["init", "--owner", "jdoe", "--prefix", "rcic-b0", "--stages", "3",
            "--config", str(recipe), "--out", str(tmp_path / "chain")]
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err
    assert not (tmp_path / "chain").exists()


def test_existing_chain_is_not_overwritten(tmp_path, recipe, capsys):
    status, out = init(tmp_path, recipe)
    before = (out / "stage-01" / "stage_kernel.py").read_text()
    assert init(tmp_path, recipe, "--budget", "1h")[0] == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "stage-01" / "stage_kernel.py").read_text() == before


def test_metadata_checker_names_each_broken_rule(tmp_path):
    (tmp_path / "k.py").write_text("print(1)\n")
    good = metadata.kernel_metadata("jdoe", "rcic-b0-stage-01", "rcic-b0 stage 01", "k.py",
                                    gpu=True)
    assert metadata.kernel_problems(good, tmp_path) == []
    broken = [({"id": "jdoe/abc"}, "shorter than 5"), ({"title": "abc"}, "title"),
              ({"code_file": "missing.py"}, "code_file"), ({"language": "r"}, "language"),
              ({"kernel_type": "app"}, "kernel_type"), ({"enable_gpu": "true"}, "boolean"),
              ({"kernel_sources": ["nobody"]}, "kernel_sources"),
              ({"title": "rcic-b0 stage 1"}, "becomes the slug 'rcic-b0-stage-1'")]
    for change, fragment in broken:
        problems = metadata.kernel_problems({**good, **change}, tmp_path)
        assert len(problems) == 1 and fragment in problems[0], (change, problems)
    no_internet_line = {k: v for k, v in good.items() if k != "enable_internet"}
    assert "enable_internet" in metadata.kernel_problems(no_internet_line, tmp_path)[0]


def test_bundle_metadata_template_matches_the_default_bundle_slug():
    template = json.loads((REPO / "dataset-metadata.json").read_text())
    meta = metadata.dataset_metadata(template, "jdoe")
    assert meta["id"] == f"jdoe/{chain.DEFAULT_BUNDLE}" and len(meta["licenses"]) == 1
    with pytest.raises(UserError, match="title"):
        metadata.dataset_metadata({**template, "title": "rcic"}, "jdoe")


def test_importing_rcic_chain_never_imports_kaggle():
    code = ("import sys, rcic.cli.chain, rcic.kaggle.chain, rcic.kaggle.local, "
            "rcic.kaggle.kernel, rcic.kaggle.bundle, rcic.kaggle.plan, rcic.kaggle.client; "
            "assert 'kaggle' not in sys.modules, 'kaggle was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def make_data(folder):
    folder.mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (folder / name).write_text("id_code\n")


@pytest.mark.parametrize("layout", [
    {"data": "recursion-cellular-image-classification", "prev": "rcic-b0-stage-01"},
    {"data": "competitions/recursion-cellular-image-classification",
     "prev": "notebooks/jdoe/rcic-b0-stage-01"},
])
def test_inputs_are_found_by_searching_either_kaggle_layout(tmp_path, layout):
    root = tmp_path / "input"
    make_data(root / layout["data"])
    # A weights file inside the data folder's image tree must never be picked up.
    (root / layout["data"] / "train" / "HEPG2-01").mkdir(parents=True)
    (root / layout["data"] / "train" / "HEPG2-01" / "weights.pt").write_bytes(b"x")
    (root / layout["prev"]).mkdir(parents=True)
    (root / layout["prev"] / "weights.pt").write_bytes(b"w")
    assert find_data_dir(root) == root / layout["data"]
    assert find_shallow(root, "weights.pt") == [root / layout["prev"] / "weights.pt"]
    with pytest.raises(UserError, match="no RxRx1 data"):
        find_data_dir(root / layout["prev"])
    with pytest.raises(UserError, match="no RxRx1 data"):
        find_data_dir(tmp_path / "no-such-input")


def test_plan_counts_stages_from_throughput(tmp_path, recipe, capsys):
    steps = load_recipe(recipe, ["train.max_steps=1000"])   # 1000 steps x 8 samples
    p = plan(steps, samples_per_second=1.0, budget_seconds=1000.0)
    assert p.total_samples == 8000 and p.stages == 9           # 900 usable samples a stage
    by_epoch = plan(load_recipe(recipe), 10.0, 3600.0, train_samples=50_000)
    assert by_epoch.total_samples == 100_000 and by_epoch.stages == 4
    stage_json = tmp_path / "stage.json"
    stage_json.write_text(json.dumps({"samples_per_second": 10.0}))
    assert main(["plan", "--from-stage-json", str(stage_json), "--config", str(recipe),
                 "--budget", "1h", "--train-samples", "50000"]) == 0
    assert "needs 4 stage(s)" in capsys.readouterr().out
    assert main(["plan", "--config", str(recipe), "--budget", "1h", "--samples-per-second", "1",
                 "--from-stage-json", str(stage_json)]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_cache_adds_two_cpu_kernels_that_the_stages_and_submission_list(tmp_path, recipe):
    status, out = init(tmp_path, recipe, "--cache", "32")
    assert status == 0
    assert json.loads((out / "chain.json").read_text())["kernels"] == [
        "cache-train", "cache-test", "stage-01", "stage-02", "stage-03", "submit"]
    metas = {f.name: json.loads((f / metadata.KERNEL_METADATA).read_text())
             for f in chain.kernel_folders(out)}
    for split in ("train", "test"):
        meta = metas[f"cache-{split}"]
        assert metadata.kernel_problems(meta, out / f"cache-{split}") == []
        # A CPU kernel: no GPU, no accelerator shape, so no GPU quota.
        assert meta["enable_gpu"] is False and "machine_shape" not in meta
        assert meta["id"] == f"jdoe/rcic-b0-cache-{split}" and meta["kernel_sources"] == []
        assert settings_of(out / f"cache-{split}" / "cache_kernel.py") == {
            "kind": "cache", "split": split, "size": 32, "format": "zlib"}
    assert metas["stage-01"]["kernel_sources"] == ["jdoe/rcic-b0-cache-train"]
    assert metas["stage-02"]["kernel_sources"] == ["jdoe/rcic-b0-stage-01",
                                                   "jdoe/rcic-b0-cache-train"]
    assert metas["submit"]["kernel_sources"] == ["jdoe/rcic-b0-stage-03",
                                                 "jdoe/rcic-b0-cache-test"]
    assert settings_of(out / "stage-02" / "stage_kernel.py")["cache"] == 32
    assert settings_of(out / "submit" / "submit_kernel.py")["cache"] == 32


def test_which_caches_a_stage_lists_follows_the_recipe(tmp_path):
    # Pseudo-labels read the test images while training: the stages list both caches.
    pseudo = tmp_path / "pseudo.yaml"
    pseudo.write_text(RECIPE + "pseudo:\n  enabled: true\n")
    assert init(tmp_path / "p", pseudo, "--cache", "32")[0] == 0
    meta = json.loads((tmp_path / "p" / "chain" / "stage-01" / metadata.KERNEL_METADATA)
                      .read_text())
    assert meta["kernel_sources"] == ["jdoe/rcic-b0-cache-train", "jdoe/rcic-b0-cache-test"]
    # A recipe that reads a cache gets the cache kernels without --cache, at its image size.
    cached = tmp_path / "cached.yaml"
    cached.write_text("name: t\ndata:\n  image_size: 24\n  cache: /home/me/cache24\n")
    assert init(tmp_path / "c", cached)[0] == 0
    script = tmp_path / "c" / "chain" / "cache-train" / "cache_kernel.py"
    assert settings_of(script)["size"] == 24
    # No cache at all: no cache kernels.
    assert init(tmp_path / "n", pseudo)[0] == 0
    assert not (tmp_path / "n" / "chain" / "cache-train").exists()


def test_a_cache_of_another_size_than_the_recipe_is_one_line(tmp_path, recipe, capsys):
    assert init(tmp_path, recipe, "--cache", "64")[0] == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cache 64: the recipe trains at 32 px" in err
    assert not (tmp_path / "chain").exists()
