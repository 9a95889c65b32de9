"""What several test files share: running rcic-stage as a user does, and comparing weights."""
import subprocess
from pathlib import Path

import torch

# The tiny recipe most stage tests train: 16 px, batch 4, 2 epochs (16 optimizer steps).
TINY = ["data.image_size=16", "data.batch_size=4", "train.epochs=2", "train.log_every_steps=3",
        "train.checkpoint_every_steps=2", "data.num_workers=2"]


def stage(data, out, *extra, budget="5m", sets=(), check=True):
    """Run `rcic-stage` on `data` into `out` as a real process; it must exit 0 unless `check`
    is False. Returns the CompletedProcess."""
    cmd = ["rcic-stage", "--data", str(data), "--out", str(out), "--budget", budget, "--quiet",
           "--set", *TINY, *sets, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def weights(out):
    """The model tensors of the weights.pt in stage folder `out`."""
    return torch.load(Path(out) / "weights.pt", weights_only=False)["model"]


def assert_same_weights(a, b):
    """The weights.pt of stage folders `a` and `b` hold bit-identical tensors."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"
