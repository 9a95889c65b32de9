"""The memory plan: a recipe's per-GPU peak of one training step, computed on the CPU in seconds.

    plan = plan_memory(recipe, micro_batch_per_gpu(recipe, gpus), gpu_bytes, gpus)
    print("\\n".join(plan.describe()))

What one GPU holds at the peak of a training step, item by item:
- parameters and buffers, float32;
- gradients, float32, counted as held through the whole step (they are, from the second
  micro-batch of an accumulated step on);
- optimizer state: two float32 copies of the parameters for Adam, AdamW and RAdam, one for SGD
  with momentum;
- the EMA copy of the weights, when optim.ema_decay is set;
- DDP's gradient buckets, a second copy of the gradients, when a machine has more than one GPU;
- the micro-batch itself: the uint8 images and their normalised float32 copy;
- the activations kept for the backward pass, and the most the backward adds on top of them
  (activation gradients, recomputed blocks under activation checkpointing). Both are counted,
  not estimated: the model's real forward and backward run once on fake tensors (torch's
  FakeTensorMode: shapes and dtypes, no data, so DenseNet201 at 512 px takes seconds), and a
  dispatch mode adds up every storage an operation creates and every one that is freed.
  Mixed precision (optim.amp) runs that pass under CPU autocast with float16: like CUDA's,
  it runs convolutions and linear layers in half precision, and what follows them (BatchNorm,
  activations) stays half; a recipe without amp runs it in float32. Not counted: cuDNN's
  choice of algorithms (their workspace is in the allowance).
The sum is what `torch.cuda.max_memory_allocated` should report. A GPU needs more than that:
the allowance adds ALLOCATOR_SHARE of it (the caching allocator rounds blocks up and fragments)
and CONTEXT_BYTES (the CUDA context, cuDNN's and cuBLAS's workspaces), which the allocator's
counters do not see. tools/gpu_memory_check.py compares the sum with the measurement on a GPU.

Activations grow linearly with the micro-batch, so two passes (the recipe's micro-batch and two
samples) give the largest micro-batch that fits, with and without activation checkpointing
(StepModel).
"""
import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from rcic.data.layout import N_CONTROL_CLASSES, N_TREATMENTS

GIB = 2**30
# What nvidia-smi reports as the memory of one GPU (MiB), per Kaggle machine shape, and how
# many GPUs it has. The stage runs one process per GPU.
MACHINE_SHAPES = {"NvidiaTeslaT4": (2, 15360 * 2**20), "NvidiaTeslaP100": (1, 16280 * 2**20)}
T4_BYTES = MACHINE_SHAPES["NvidiaTeslaT4"][1]
ALLOCATOR_SHARE = 0.10
CONTEXT_BYTES = 1 * GIB
CELL_TYPES = 4                      # RxRx1's HEPG2, HUVEC, RPE, U2OS
INPUT_BYTES_PER_PIXEL = 1 + 4       # the uint8 batch and its normalised float32 copy
OPTIMIZER_COPIES = {"adam": 2, "adamw": 2, "radam": 2, "sgd": 1}


def gib(n):
    return f"{n / GIB:.2f} GiB"


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages operations create, while they are alive, and their peak.
    Storages that exist before (parameters, gradients, the input) are passed as `known`:
    a view of them (a transposed weight) allocates nothing."""

    def __init__(self, known=()):
        super().__init__()
        self.sizes = {id_of(t): 0 for t in known}
        self.alive = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t.untyped_storage())
        self.peak = max(self.peak, self.alive)
        return out

    def track(self, storage):
        # The storage's own address (a fake storage's data_ptr is 0 for all of them); it is
        # unique while the storage lives, and a finalizer forgets it when it dies.
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.alive += self.sizes[key]
        weakref.finalize(storage, self.free, key)

    def free(self, key):
        self.alive -= self.sizes.pop(key)


def id_of(tensor):
    return tensor.untyped_storage()._cdata


@dataclass
class StepMemory:
    """Bytes of one micro-batch's forward and backward beyond the model's own tensors."""
    micro_batch: int
    kept: int          # alive when the forward (and the loss) is done: what backward needs
    peak: int          # the most alive at once, forward and backward
    scaled: bool = False   # scaled from smaller real passes, not counted at this size


def planned_classes(recipe):
    """The competition's classes for this recipe: the model's last layer is sized by them."""
    d = recipe.data
    return N_TREATMENTS + (N_CONTROL_CLASSES if d.use_controls or d.use_test_controls else 0)


def with_fake_tensors(run, instead):
    """run(FakeTensorMode()): shapes and dtypes without data. A model that cannot be built or
    run that way (timm's ViTs read a value while they initialise) gets instead() with real
    tensors on the CPU; a real error in the recipe shows again there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        return run(FakeTensorMode())
    except Exception:   # whatever FakeTensorMode refuses
        return instead()


def measure_steps(recipe, micro_batches, checkpointing):
    """A StepMemory per micro-batch size: one training micro-batch of the recipe's model on
    fake tensors, its memory counted. Where fake tensors fail, real passes on the CPU at
    micro-batches of 2 and 4 only, larger ones scaled from those (StepModel; `scaled`)."""
    def real_and_scaled():
        small = passes(recipe, [2, 4], checkpointing, contextlib.nullcontext())
        model = StepModel(*small)
        return [small[n // 2 - 1] if n in (2, 4) else
                StepMemory(n, int(model.kept(n)), int(model.peak(n)), scaled=True)
                for n in micro_batches]

    return with_fake_tensors(lambda mode: passes(recipe, micro_batches, checkpointing, mode),
                             real_and_scaled)


def passes(recipe, micro_batches, checkpointing, mode):
    """measure_steps' passes, with tensors made under `mode`."""
    from rcic.models import create_loss, create_model

    model_cfg = dataclasses.replace(recipe.model, activation_checkpointing=checkpointing)
    size = recipe.data.image_size
    with mode:
        model = create_model(model_cfg, planned_classes(recipe), CELL_TYPES,
                             with_pretrained=False).train()
        criterion = create_loss(model_cfg)
        for p in model.parameters():        # accumulating: backward adds into them
            p.grad = torch.zeros_like(p)
        steps = []
        for n in micro_batches:
            x = torch.zeros(n, 6, size, size)
            labels = torch.zeros(n, dtype=torch.long)
            cell_type = torch.zeros(n, dtype=torch.long)
            known = [*model.parameters(), *(p.grad for p in model.parameters()),
                     *model.buffers(), x, labels, cell_type]
            with LiveBytes(known) as live:
                with torch.autocast("cpu", dtype=torch.float16, enabled=recipe.optim.amp):
                    loss = criterion(model(x, cell_type), labels)
                kept = live.alive
                loss.backward()
            steps.append(StepMemory(n, kept, live.peak))
            del loss
        return steps


@dataclass
class StepModel:
    """The step's peak at any micro-batch n, from passes at two micro-batches (small < large).

    What is kept for the backward pass grows exactly linearly with n: a line through both.
    What the backward adds on top is the larger of a part that does not grow with n (weight
    gradients being added) and one that does (activation gradients): a convex function of n,
    so between the two passes the chord is above it. Beyond the larger pass it is taken to
    grow in proportion to n (a line through the two passes would undercount it there). An
    estimate all the same: tests/test_memory_plan.py finds it at most 2% under a measured
    pass, and at most 10% over."""
    small: StepMemory
    large: StepMemory

    def kept(self, n):
        s, l = self.small, self.large
        slope = (l.kept - s.kept) / (l.micro_batch - s.micro_batch)
        return s.kept + slope * (n - s.micro_batch)

    def extra(self, n):
        s, l = self.small, self.large
        e_small, e_large = s.peak - s.kept, l.peak - l.kept
        if n <= s.micro_batch:
            return e_small
        if n <= l.micro_batch:
            share = (n - s.micro_batch) / (l.micro_batch - s.micro_batch)
            return e_small + (e_large - e_small) * share
        return e_large * n / l.micro_batch

    def peak(self, n):
        return self.kept(n) + self.extra(n)


def model_bytes(recipe):
    """(parameters and buffers, gradients, optimizer state, EMA) in bytes, from the shapes."""
    from rcic.models import create_model

    def count(mode):
        with mode:
            model = create_model(recipe.model, planned_classes(recipe), CELL_TYPES,
                                 with_pretrained=False)
            return (sum(p.nbytes for p in model.parameters()),
                    sum(b.nbytes for b in model.buffers()))

    params, buffers = with_fake_tensors(count, lambda: count(contextlib.nullcontext()))
    o = recipe.optim
    copies = OPTIMIZER_COPIES.get(o.optimizer, 2)
    if o.optimizer == "sgd" and not o.momentum:
        copies = 0
    return params + buffers, params, copies * params, (params + buffers) if o.ema_decay else 0


@dataclass
class Fit:
    """The step's memory with or without activation checkpointing, and what micro-batch fits."""
    checkpointing: bool
    at_recipe: StepMemory       # measured at the recipe's micro-batch
    model: StepModel            # the step's peak at other micro-batches
    largest: int                # the largest micro-batch that fits the GPU (0: none)


@dataclass
class MemoryPlan:
    recipe_name: str
    micro_batch: int            # per GPU (per process)
    accumulation: int
    gpus: int
    gpu_bytes: int
    checkpointing: bool         # the recipe's setting
    fixed: dict                 # item -> bytes that do not depend on the micro-batch
    fits: dict                  # checkpointing (bool) -> Fit
    image_size: int

    @property
    def global_batch(self):
        """Samples per optimizer step over all processes: data.batch_size x accumulation."""
        return self.micro_batch * self.gpus * self.accumulation

    def items(self, checkpointing=None):
        """Every item of the peak at the recipe's micro-batch, in bytes."""
        fit = self.fits[self.checkpointing if checkpointing is None else checkpointing]
        step = fit.at_recipe
        batch = self.input_bytes(self.micro_batch)
        return {**self.fixed,
                "micro-batch (uint8 images, normalised float32)": batch,
                "activations kept for backward": step.kept,
                "backward on top of them": step.peak - step.kept}

    def input_bytes(self, n):
        return input_bytes(n, self.image_size)

    def peak(self, checkpointing=None):
        return sum(self.items(checkpointing).values())

    def need(self, checkpointing=None):
        return needed(self.peak(checkpointing))

    def fits_gpu(self, checkpointing=None):
        return self.need(checkpointing) <= self.gpu_bytes

    def suggestion(self, checkpointing):
        """(data.batch_size, optim.accumulation_steps) whose share per GPU fits and that keep
        the global batch, the largest such micro-batch; or None."""
        largest = self.fits[checkpointing].largest
        for m in range(min(largest, self.global_batch // self.gpus), 0, -1):
            if self.global_batch % (m * self.gpus) == 0:
                return m * self.gpus, self.global_batch // (m * self.gpus)
        return None

    def describe(self):
        own = self.checkpointing
        shared = f" ({self.gpus} GPUs share each micro-batch)" if self.gpus > 1 else ""
        lines = [f"memory plan of {self.recipe_name} per GPU: micro-batch {self.micro_batch} at "
                 f"{self.image_size} px x {self.accumulation} accumulated{shared}, activation "
                 f"checkpointing {'on' if own else 'off'}"]
        for name, n in self.items().items():
            lines.append(f"  {name:<48} {gib(n):>11}")
        peak = self.peak()
        lines.append(f"  {'peak of a training step':<48} {gib(peak):>11}")
        lines.append(f"  {'+ allowance (allocator, CUDA context)':<48} "
                     f"{gib(self.need() - peak):>11}")
        verdict = "fits" if self.fits_gpu() else "does NOT fit"
        lines.append(f"  {'= needed':<48} {gib(self.need()):>11}  {verdict} "
                     f"{gib(self.gpu_bytes)}")
        for checkpointing in sorted(self.fits):
            label = "with" if checkpointing else "without"
            pair = self.suggestion(checkpointing)
            keep = (f" (the same global batch of {self.global_batch}: data.batch_size={pair[0]} "
                    f"optim.accumulation_steps={pair[1]})" if pair else "")
            peak = ("" if checkpointing == own else f"; the peak at micro-batch "
                    f"{self.micro_batch}: {gib(self.peak(checkpointing))}")
            lines.append(f"largest micro-batch per GPU {label} activation checkpointing: "
                         f"{self.fits[checkpointing].largest}{keep}{peak}")
        if any(fit.at_recipe.scaled for fit in self.fits.values()):
            lines.append("(this model cannot run on fake tensors: its activations were counted "
                         "at micro-batches 2 and 4 on the CPU and scaled)")
        return lines

    def refusal(self, gpu_name="the GPU"):
        """One line when the recipe's micro-batch does not fit, else None."""
        if self.fits_gpu():
            return None
        own = self.checkpointing
        pair = self.suggestion(own)
        line = (f"recipe {self.recipe_name} needs {gib(self.need())} per GPU at micro-batch "
                f"{self.micro_batch} ({self.image_size} px), more than the "
                f"{gib(self.gpu_bytes)} of {gpu_name}: ")
        if pair:
            line += (f"set data.batch_size={pair[0]} and optim.accumulation_steps={pair[1]} "
                     f"(micro-batch {pair[0] // self.gpus} per GPU, the same global batch of "
                     f"{self.global_batch})")
        else:
            line += "not even a micro-batch of 1 fits; lower data.image_size"
        other = self.suggestion(True) if not own and True in self.fits else None
        if other and other[0] > (pair[0] if pair else 0):
            line += (f", or set model.activation_checkpointing=true with data.batch_size="
                     f"{other[0]} optim.accumulation_steps={other[1]}")
        return line + " (rcic-chain plan --config shows the items)"


def input_bytes(micro_batch, image_size):
    return micro_batch * 6 * image_size ** 2 * INPUT_BYTES_PER_PIXEL


def needed(peak):
    """GPU memory a step with this peak of allocated bytes needs, the allowance included."""
    return int(peak * (1 + ALLOCATOR_SHARE) + CONTEXT_BYTES)


def largest_fitting(fits, most=2**20):
    """The largest n in 0..most with fits(n), for a fits() that is true up to some n."""
    low, high = 0, most + 1            # fits(low) holds (or low is 0); fits(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def micro_batch_per_gpu(recipe, gpus):
    """The samples one process (one GPU) trains on per micro-batch: the processes share each
    of the recipe's micro-batches (data.batch_size), so that the global batch, data.batch_size
    x optim.accumulation_steps, is the recipe's on any number of them. A share that does not
    divide is rounded up (the stage refuses it; the plan stays on the safe side)."""
    return -(-recipe.data.batch_size // gpus)


def fixed_items(recipe, gpus):
    """The items of the peak that do not depend on the micro-batch, in bytes."""
    params, grads, optimizer, ema = model_bytes(recipe)
    fixed = {"parameters and buffers (float32)": params, "gradients (float32)": grads,
             f"optimizer state ({recipe.optim.optimizer})": optimizer}
    if ema:
        fixed["EMA copy of the weights"] = ema
    if gpus > 1:
        fixed["DDP gradient buckets"] = grads
    return fixed


def plan_memory(recipe, micro_batch, gpu_bytes=T4_BYTES, gpus=1, modes=(False, True),
                measured=()):
    """The memory plan of one of `gpus` GPUs running `micro_batch` samples of the recipe per
    micro-batch (its share: micro_batch_per_gpu),
    with the largest micro-batch that fits `gpu_bytes` for each activation-checkpointing
    setting in `modes` (the recipe's own setting is always planned). `measured`: StepMemory
    passes already made, as (checkpointing, StepMemory) pairs."""
    done = {(checkpointing, m.micro_batch): m for checkpointing, m in measured}
    fixed = fixed_items(recipe, gpus)
    plan = MemoryPlan(recipe.name, micro_batch, max(1, recipe.optim.accumulation_steps), gpus,
                      gpu_bytes, recipe.model.activation_checkpointing, fixed, {},
                      recipe.data.image_size)
    for checkpointing in sorted({*modes, recipe.model.activation_checkpointing}):
        # 2, not 1: a BatchNorm1d neck cannot train on one sample
        sizes = [micro_batch, 2 if micro_batch != 2 else 4]
        missing = [n for n in sizes if (checkpointing, n) not in done]
        for m in measure_steps(recipe, missing, checkpointing) if missing else ():
            done[checkpointing, m.micro_batch] = m
        at_recipe, other = (done[checkpointing, n] for n in sizes)
        model = StepModel(*sorted((at_recipe, other), key=lambda m: m.micro_batch))

        def fits(n, model=model):
            return needed(sum(fixed.values()) + plan.input_bytes(n) + model.peak(n)) <= gpu_bytes

        plan.fits[checkpointing] = Fit(checkpointing, at_recipe, model, largest_fitting(fits))
    return plan


def planned_peak(recipe, micro_batch, gpus=1):
    """The plan's peak of a training step in bytes (without the allowance), from one pass
    with the recipe's own activation-checkpointing setting; and that pass."""
    (step,) = measure_steps(recipe, [micro_batch], recipe.model.activation_checkpointing)
    peak = (sum(fixed_items(recipe, gpus).values())
            + input_bytes(micro_batch, recipe.data.image_size) + step.peak)
    return peak, step


def machine_refusal(recipe, machine_shape):
    """One line if the recipe's micro-batch cannot fit a GPU of `machine_shape`, else None.
    A shape rcic knows no memory for is not checked. One pass when it fits, a plan when not."""
    if machine_shape not in MACHINE_SHAPES:
        return None
    gpus, gpu_bytes = MACHINE_SHAPES[machine_shape]
    micro_batch = micro_batch_per_gpu(recipe, gpus)
    peak, step = planned_peak(recipe, micro_batch, gpus)
    if needed(peak) <= gpu_bytes:
        return None
    return plan_memory(recipe, micro_batch, gpu_bytes, gpus,
                       measured=[(recipe.model.activation_checkpointing, step)]).refusal(
                           f"a GPU of machine shape {machine_shape}")
