"""Checkpoints cross environments: only tensors and plain values inside, the versions that wrote
them in the manifest, and one plain notice when a resume runs under other versions."""
import json
import platform
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rcic.portable import check_portable
from test_pseudo import PSEUDO
from helpers import stage, stage_argv, stage_here

NOTICE = "the continuation is exact only up to those differences"
OTHER_PYTHON = os.environ.get("RCIC_OTHER_PYTHON")


def test_only_tensors_and_plain_values_pass():
    check_portable({"w": torch.ones(2), "rng": (3, (1, 2), None), "h": [{"lr": 0.1, "ok": True}],
                    "b": b"x", 7: "int keys are plain too"})
    for bad, where in [({"labels": pd.DataFrame({"a": [1]})}, "state['labels']"),
                       ({"rng": ("MT19937", np.zeros(3, np.uint32))}, "state['rng'][1]"),
                       ({"h": [{"loss": np.float64(0.5)}]}, "state['h'][0]['loss']"),
                       ({"p": Path("x")}, "state['p']")]:
        with pytest.raises(TypeError, match=rf"^{re.escape(where)} is a "):
            check_portable(bad)


def last_state(out):
    ckpt = max(out.glob("ckpt-*"))
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    return torch.load(ckpt / "state.pt", weights_only=True), manifest


def test_the_manifest_records_the_versions_and_a_resume_under_others_says_so_once(tiny_data,
                                                                                   tmp_path):
    out = tmp_path / "out"
    stage_here(tiny_data, out, "--steps", "2")
    state, manifest = last_state(out)
    # Each read from the library itself, not from the function that wrote the manifest.
    import albumentations
    import cv2
    assert manifest["versions"]["numpy"] == np.__version__
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["python"] == platform.python_version()
    assert manifest["versions"]["albumentations"] == albumentations.__version__
    assert manifest["versions"]["opencv"].split(".")[:3] == cv2.__version__.split(".")[:3]
    assert manifest["versions"]["cuda"] == torch.version.cuda
    # As if written elsewhere (versions no CI environment has, Kaggle's image included).
    manifest["versions"].update(numpy="1.99.0", torch="2.10.0+cu128")
    (max(out.glob("ckpt-*")) / "MANIFEST.json").write_text(json.dumps(manifest))
    result = stage(tiny_data, out, "--steps", "1")
    notices = [line for line in result.stderr.splitlines() if NOTICE in line]
    assert len(notices) == 1, result.stderr
    assert f"numpy 1.99.0 -> {np.__version__}" in notices[0]
    assert f"torch 2.10.0+cu128 -> {torch.__version__}" in notices[0]
    assert "python" not in notices[0]           # only what differs is named
    assert NOTICE in (out / "stage.log").read_text()
    # The checkpoint it wrote carries this environment's versions: no notice next time.
    result = stage(tiny_data, out, "--steps", "1")
    assert NOTICE not in result.stderr and last_state(out)[0]["counters"]["global_step"] == 4


def other_stage(data, out, steps):
    """rcic-stage of the other CI environment, same recipe as test_stage's `stage`."""
    cmd = [str(Path(OTHER_PYTHON).parent / "rcic-stage"),
           *stage_argv(data, out, "--steps", steps, sets=PSEUDO)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def assert_one_notice_naming(result, written_under, running_under):
    """A resume says once which versions differ from those that wrote the checkpoint."""
    changed = [name for name, version in running_under.items() if written_under[name] != version]
    notices = [line for line in result.stderr.splitlines() if NOTICE in line]
    assert len(notices) == (1 if changed else 0), result.stderr
    for name in changed:
        assert f"{name} {written_under[name]} -> {running_under[name]}" in notices[0], notices


@pytest.mark.skipif(not OTHER_PYTHON, reason="RCIC_OTHER_PYTHON is unset: .ci/run sets it to the "
                    "python of its second environment (Kaggle's versions) so that this test "
                    "resumes there a stage written here, and back")
def test_a_stage_with_pseudo_labels_continues_in_the_other_environment_and_back(tiny_data,
                                                                                  tmp_path):
    out = tmp_path / "out"
    probe = subprocess.run([OTHER_PYTHON, "-c", "import pandas; print(pandas.__version__)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() != pd.__version__, "the other environment has the same pandas"
    # here -> other -> here -> other: the pseudo-labels are chosen in the second part and
    # again at the start of epoch 2, so they cross in both directions.
    stage(tiny_data, out, "--steps", "5", sets=PSEUDO)
    _, manifest = last_state(out)
    result = other_stage(tiny_data, out, 4)
    other_state, other_manifest = last_state(out)
    assert_one_notice_naming(result, manifest["versions"], other_manifest["versions"])
    assert other_state["pseudo"]["labels"]["id_code"], "no pseudo-labels were chosen"
    assert other_state["counters"]["global_step"] == 9
    result = stage(tiny_data, out, "--steps", "2", sets=PSEUDO)
    assert_one_notice_naming(result, other_manifest["versions"], manifest["versions"])
    state, manifest = last_state(out)
    assert state["counters"]["global_step"] == 11 and state["pseudo"]["labels"]["id_code"]
    result = other_stage(tiny_data, out, 0)          # to the end of the recipe
    assert_one_notice_naming(result, manifest["versions"], other_manifest["versions"])
    final, _ = last_state(out)
    assert final["counters"]["global_step"] > 11 and final["pseudo"]["epoch"] == 2
