"""What only a GPU shows: AMP and its GradScaler across a resume, channels_last, fused
optimizers, the budget with CUDA work in flight, DDP over NCCL (or gloo on one GPU).

Every test here is marked `cuda` and skipped without a GPU; `tools/gpu_check.py` runs them on a
GPU machine (`pytest -m cuda tests/test_cuda.py`). Stages are real `rcic-stage` processes.
"""
import copy
import json
import subprocess
import time

import pytest
import torch

from rcic.config import ModelConfig, OptimConfig
from rcic.models import create_loss, create_model
from rcic.optim import OPTIMIZERS, create_optimizer, parameter_groups

from helpers import assert_same_weights, stage_argv

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

def deterministic_stage(data, out, *extra, ranks=1, share_gpu=False):
    """One real rcic-stage with deterministic CUDA kernels (`train.deterministic`), on `ranks`
    processes. share_gpu: every rank on GPU 0 over gloo (`train.ddp_backend=gloo`; NCCL refuses
    two ranks on one GPU). stage.json's `runtime` shows the worker ran as asked."""
    sets = ["train.deterministic=true", *(["train.ddp_backend=gloo"] if share_gpu else [])]
    cmd = ["rcic-stage", *stage_argv(data, out, f"--gpus={ranks}", *extra, sets=sets)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "stage.json").read_text())
    runtime = report["runtime"]
    assert runtime["deterministic"] is True and runtime["cudnn_benchmark"] is False, runtime
    assert runtime["device"].startswith("cuda") and runtime["world_size"] == ranks, runtime
    if ranks > 1:
        assert runtime["backend"] == ("gloo" if share_gpu else "nccl"), runtime
    assert report["stopped_by"] in ("done", "steps"), report
    return report


def checkpoint_state(out):
    return torch.load(next(out.glob("ckpt-*")) / "state.pt", weights_only=False)


def resumes_exactly(data, tmp_path, **launch):
    """An uninterrupted run and one split into two stages end with the same weights."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert deterministic_stage(data, whole, **launch)["done"] is True
    first = deterministic_stage(data, split, "--steps", "3", **launch)
    assert first["done"] is False and first["global_step"] == 3
    middle = checkpoint_state(split)
    assert deterministic_stage(data, split, **launch)["done"] is True
    assert_same_weights(split, whole)
    assert (split / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()
    return middle, checkpoint_state(split), checkpoint_state(whole)


def test_amp_resume_is_exact_and_carries_the_grad_scaler(tiny_data, tmp_path):
    middle, split, whole = resumes_exactly(tiny_data, tmp_path)
    scaler = middle["scaler"]
    # A disabled GradScaler saves {}: AMP was on. After 3 steps its state has moved: either
    # 3 steps without overflow counted, or an overflow halved the scale from 2**16.
    assert scaler, "the stage trained without AMP on the GPU"
    assert scaler["_growth_tracker"] > 0 or scaler["scale"] < 2.0 ** 16
    # Restarting the scaler at each resume would leave another growth count and scale.
    assert split["scaler"] == whole["scaler"]
    assert "cuda" in split["rng"][0]


def loss_and_grads(model, x, cell_types, labels, amp):
    """The loss and all gradients, flattened, in float64 (to compare them)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        loss = create_loss(ModelConfig())(model(x, cell_types), labels)
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    return loss.detach().double(), grads


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture
def full_fp32(monkeypatch):
    """fp32 convolutions and matmuls in full fp32 precision (no TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


# Stated tolerance: against the same model in float64, channels_last's relative error (of the
# loss, and of all gradients together) is at most 3x NCHW's, plus 1e-5 in fp32 or 1e-3 under
# fp16 autocast. The layout may change the order of sums, not the accuracy. (A randomly
# initialised ResNet-50 has fp32 gradient errors near 1e-3 in either layout, seen on a CPU, so
# no fixed bound fits every backbone.) Eval mode: BatchNorm with fixed statistics, as batch
# statistics of 4 images on 2x2 maps would amplify rounding far past any layout effect.
LAYOUT_FACTOR, LAYOUT_SLACK = 3.0, {False: 1e-5, True: 1e-3}


@pytest.mark.parametrize("backbone", ["resnet50", "densenet121", "efficientnet-b0"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_channels_last_is_as_accurate_as_nchw(backbone, amp, full_fp32):
    torch.manual_seed(0)
    nchw = create_model(ModelConfig(backbone=backbone), 16, 2, with_pretrained=False).cuda().eval()
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    exact = copy.deepcopy(nchw).double()
    # The copy really is channels_last:
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and not p.is_contiguous() for p in nhwc.parameters())
    x = torch.randn(4, 6, 64, 64, device="cuda")
    cell_types, labels = torch.tensor([0, 1, 0, 1], device="cuda"), torch.arange(4, device="cuda")
    loss_64, grads_64 = loss_and_grads(exact, x.double(), cell_types, labels, amp=False)
    loss_a, grads_a = loss_and_grads(nchw, x, cell_types, labels, amp)
    loss_b, grads_b = loss_and_grads(nhwc, x.contiguous(memory_format=torch.channels_last),
                                     cell_types, labels, amp)
    for ours, theirs, exact_value in ((loss_b, loss_a, loss_64), (grads_b, grads_a, grads_64)):
        error_nchw = relative_error(theirs, exact_value)
        error_nhwc = relative_error(ours, exact_value)
        assert error_nhwc <= LAYOUT_FACTOR * error_nchw + LAYOUT_SLACK[amp], (error_nhwc,
                                                                               error_nchw)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "radam"])
def test_fused_and_foreach_optimizers_agree_under_the_grad_scaler(name):
    """rcic's optimizer on a GPU (fused; RAdam: foreach) against torch's other implementation,
    fed the same scaled gradients, one of them with an inf (the step both must skip)."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="tiny"), 16, 2, with_pretrained=False).cuda()
    reference = copy.deepcopy(model)
    cfg = OptimConfig(optimizer=name, lr=1e-3, weight_decay=0.01)
    ours = create_optimizer(cfg, model)
    implementation = "fused" if ours.defaults.get("fused") else "foreach"
    assert ours.defaults.get(implementation), f"{name}: neither fused nor foreach on the GPU"
    other = {"fused": {"foreach": True}, "foreach": {"foreach": False}}[implementation]
    extra = {"momentum": cfg.momentum} if name == "sgd" else {}
    theirs = OPTIMIZERS[name](parameter_groups(reference, cfg.weight_decay), lr=cfg.lr, **other,
                              **extra)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) for _ in range(2)]
    generator = torch.Generator(device="cuda").manual_seed(1)
    for step in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        for p, q in zip(model.parameters(), reference.parameters()):
            grad = torch.randn(p.shape, device="cuda", generator=generator) * scalers[0].get_scale()
            if step == 2 and p.dim() == 4:
                grad.view(-1)[0] = float("inf")
            p.grad, q.grad = grad.clone(), grad.clone()
        for scaler, optimizer in zip(scalers, (ours, theirs)):
            scaler.scale(torch.ones((), device="cuda"))   # as scaling the loss would: sets it up
            scaler.step(optimizer)
            scaler.update()
        if step == 2:   # skipped by both, and the scale halved
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** 9
        # Stated tolerance: the same float32 arithmetic in another order.
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_budget_holds_with_cuda_work_in_flight(tiny_data, tmp_path):
    """The real rcic-stage (cuDNN autotuning on) with a model whose steps queue real GPU work,
    timed from outside: the process ends inside its budget."""
    budget = 20
    out = tmp_path / "budget"
    cmd = ["rcic-stage", *stage_argv(tiny_data, out, budget=f"{budget}s", sets=[
        "model.backbone=resnet50", "data.image_size=96", "data.batch_size=32",
        "train.epochs=1000", "train.checkpoint_every_steps=20"])]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "stage.json").read_text())
    assert elapsed < budget, f"{elapsed:.1f} s for a {budget} s budget"
    assert report["global_step"] > 0 and report["done"] is False
    # The stage stopped itself, before its supervisor's kill would have.
    assert report["stopped_by"] == "budget", report
    assert report["seconds_used"] < budget


@pytest.mark.skipif(GPUS == 1, reason="one GPU: NCCL refuses two ranks on one GPU ('Duplicate "
                    "GPU detected'); test_ddp_two_ranks_share_one_gpu_over_gloo runs instead")
def test_ddp_over_nccl_one_process_per_gpu_resumes_exactly(tiny_data, tmp_path):
    middle, split, whole = resumes_exactly(tiny_data, tmp_path, ranks=GPUS)
    assert len(split["rng"]) == GPUS and all("cuda" in rng for rng in split["rng"])
    assert split["scaler"] == whole["scaler"]


@pytest.mark.skipif(GPUS > 1, reason="more than one GPU: the NCCL test runs instead")
def test_ddp_two_ranks_share_one_gpu_over_gloo(tiny_data, tmp_path):
    middle, split, whole = resumes_exactly(tiny_data, tmp_path, ranks=2, share_gpu=True)
    assert len(split["rng"]) == 2
    assert split["scaler"] == whole["scaler"]
