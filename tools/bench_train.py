"""Training step benchmark: images/s of a plain fp32 step vs the rcic step, same backbone and data.

  baseline  the seeds' way: each sample converted to float32 and normalised on the CPU inside
            the DataLoader, float batches copied unpinned, contiguous NCHW, fp32, Adam's plain
            per-parameter loop (neither fused nor foreach), the loss read back every step
  rcic      rcic.train.Trainer.train_step as rcic-stage runs it: uint8 batches (pinned,
            non-blocking) normalised on the device; on CUDA also AMP, channels_last, fused Adam,
            and no host synchronisation inside the step
  compile   (--compile) the rcic step with its model under torch.compile

Both variants read the same sites from one decoded-image cache (raw uint8) with the same
augmentations and batch order, so only the step and the per-sample work differ. "waits" is the
share of the measured time spent blocked in next(loader). On CUDA the device is synchronised
after every step, so time blocked on the loader is time the GPU sat idle (this takes a little
overlap away from the rcic step: its images/s here is a lower bound).

Variants are measured in alternating rounds (baseline, rcic, baseline, rcic, ...) after a
warm-up, and the best round of each is reported: on a shared machine the best round is the one
least disturbed by other jobs.

On CUDA it also reports each variant's peak GPU memory while measured and, with --max-batch,
the largest batch that fits: one step at the benchmark batch, doubled until it runs out of
memory or reaches --max-batch (a bounded search: "at least" when the bound is reached).

    python tools/bench_train.py                                  # CPU defaults: tiny, 64 px
    python tools/bench_train.py --backbone resnet50 --size 256   # on a GPU (the defaults there)
    python tools/bench_train.py --data DIR --max-batch 1024 --json step.json  # as gpu_check.py
"""
import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rcic.config import Recipe
from rcic.data.cache import build_cache
from rcic.data.dataset import EpochBatchSampler, Normalizer, make_loader
from rcic.data.layout import RxRx1
from rcic.data.synthetic import SynthSpec, generate
from rcic.models import create_loss, create_model
from rcic.train import Trainer


class SeedsWay(torch.utils.data.Dataset):
    """The seeds' per-sample work on rcic's samples: float32 and normalisation on the CPU."""

    def __init__(self, sites, normalize):
        self.sites, self.normalize = sites, normalize   # the same Normalizer, kept on the CPU

    def __len__(self):
        return len(self.sites)

    def __getitem__(self, key):
        item = self.sites[key]
        image = self.normalize(item["image"][None], torch.tensor([item["norm_idx"]]))[0]
        return {"image": image, "label": item["label"], "cell_type": item["cell_type"]}


class Baseline:
    """A plain fp32 training loop as the seeds wrote it, on the Trainer's model architecture."""

    def __init__(self, trainer, workers):
        recipe, device = trainer.recipe, trainer.device
        torch.manual_seed(recipe.train.seed)
        self.model = create_model(recipe.model, trainer.num_classes, len(trainer.cell_types),
                                  with_pretrained=False).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe.optim.lr,
                                          fused=False, foreach=False)
        self.criterion = create_loss(recipe.model)
        self.dataset = SeedsWay(trainer.train_set, Normalizer.for_dataset(trainer.data,
                                                                          trainer.train_set))
        self.recipe, self.device, self.workers = recipe, device, workers

    def batches(self):
        """(first batch of an epoch?, batch), epoch after epoch."""
        epoch = 0
        while True:
            sampler = EpochBatchSampler(len(self.dataset), self.recipe.data.batch_size,
                                        self.recipe.train.seed, epoch)
            loader = make_loader(self.dataset, batch_sampler=sampler, num_workers=self.workers)
            for i, batch in enumerate(loader):
                yield i == 0, batch
            epoch += 1

    def step(self, batch):
        self.model.train()
        images = batch["image"].to(self.device)
        labels = batch["label"].to(self.device)
        loss = self.criterion(self.model(images, batch["cell_type"].to(self.device)), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        loss.item()      # the seeds logged a running loss every step: one host sync per step
        return len(labels)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)


class RcicStep:
    """rcic's own step: Trainer.step_groups feeding Trainer.train_step, epoch after epoch."""

    def __init__(self, trainer):
        self.trainer = trainer

    def batches(self):
        """(first group of an epoch?, group), epoch after epoch."""
        while True:
            for i, group in enumerate(self.trainer.step_groups()):
                yield i == 0, group

    def step(self, group):
        self.trainer.train_step(group)
        return sum(len(b["label"]) for b in group)

    def zero_grad(self):
        self.trainer.optimizer.zero_grad(set_to_none=True)


class Meter:
    """Steps one variant and keeps its measured rounds.

    The first batch of every epoch waits for a new DataLoader (its worker processes start
    again). The benchmark's epochs are a few steps long, a real RxRx1 epoch ~1,270 steps, so
    that wait is reported on its own and left out of images/s and of the share waiting.
    """

    def __init__(self, name, runner, device):
        self.name, self.runner, self.device = name, runner, device
        self.source = runner.batches()
        self.rounds = []           # (images/s, share of time waiting for data)
        self.epoch_starts = []     # seconds the first batch of an epoch waited
        self.peak_bytes = None     # most GPU memory allocated while measured (CUDA only)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps):
        images, waited, elapsed = 0, 0.0, 0.0
        self.sync()
        for _ in range(steps):
            asked = time.perf_counter()
            first, batch = next(self.source)
            wait = time.perf_counter() - asked
            n = self.runner.step(batch)
            self.sync()
            if first:
                self.epoch_starts.append(wait)
            else:
                images, waited = images + n, waited + wait
                elapsed += time.perf_counter() - asked
        return (images / elapsed, waited / elapsed) if elapsed else (0.0, 0.0)

    def measure(self, steps):
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rounds.append(self.run(steps))
        if on_gpu:
            self.peak_bytes = max(self.peak_bytes or 0,
                                  torch.cuda.max_memory_allocated(self.device))

    @property
    def best(self):
        return max(self.rounds)


def synthetic_batch(variant, batch, size):
    """One batch of `batch` blank sites as the variant's loader hands it over."""
    image = (torch.zeros((batch, 6, size, size), dtype=torch.float32) if variant == "baseline"
             else torch.zeros((batch, 6, size, size), dtype=torch.uint8))
    zeros = torch.zeros(batch, dtype=torch.long)
    return {"image": image, "label": zeros, "cell_type": zeros, "norm_idx": zeros}


def largest_batch(meter, start, bound, size):
    """The largest batch one step of this variant takes without running out of GPU memory:
    `start` doubled until a step fails or `bound` is reached. (batch, True if bound reached);
    (0, False) if even `start` does not fit. Content does not change memory: blank images."""
    fits, batch = 0, start
    # Autotuning every new shape would cost seconds each: the search takes cuDNN's heuristics.
    autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        while batch <= bound:
            images = synthetic_batch(meter.name, batch, size)
            try:
                meter.runner.step(images if meter.name == "baseline" else [images])
                meter.sync()
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                del images
                meter.runner.zero_grad()
                gc.collect()
                if meter.device.type == "cuda":
                    torch.cuda.empty_cache()
            fits, batch = batch, batch * 2
    finally:
        torch.backends.cudnn.benchmark = autotune
    return fits, fits * 2 > bound


def make_recipe(folder, args):
    """(data, recipe): --data or a synthetic RxRx1 folder, and its raw uint8 cache at --size px."""
    if args.data:
        data = RxRx1(args.data)
    else:
        spec = SynthSpec(n_classes=args.classes, n_positive_controls=1, image_size=args.size,
                         train_experiments=args.experiments, test_experiments=1,
                         cell_types=["HUVEC"])
        data = RxRx1(generate(folder / "data", spec))
    cache = args.cache or build_cache(data, folder / "cache", args.size, progress=False,
                                      format="raw", split="train")
    recipe = Recipe()
    recipe.data.image_size, recipe.data.cache = args.size, str(cache)
    recipe.data.batch_size, recipe.data.num_workers = args.batch, args.workers
    recipe.data.augment = args.augment
    recipe.model.backbone = args.backbone
    recipe.train.epochs = 10 ** 6      # the schedule must not run out during the benchmark
    return data, recipe


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50" if cuda else "tiny",
                   help="any rcic backbone name (default: resnet50 on CUDA, tiny on CPU)")
    p.add_argument("--size", type=int, default=256 if cuda else 64, help="image side in px")
    p.add_argument("--batch", type=int, default=64 if cuda else 16)
    p.add_argument("--workers", type=int, default=os.cpu_count() if cuda else 0,
                   help="DataLoader processes for both variants (default: all cores on CUDA, "
                        "none on CPU, where the step itself needs every core)")
    p.add_argument("--augment", default="default", choices=("default", "light", "none"))
    p.add_argument("--classes", type=int, default=80 if cuda else 32,
                   help="synthetic treatments (a multiple of 4)")
    p.add_argument("--experiments", type=int, default=5 if cuda else 2,
                   help="synthetic train experiments, one held out: train sites = "
                        "2 x classes x (experiments - 1)")
    p.add_argument("--warmup", type=int, default=10 if cuda else 3, help="unmeasured steps")
    p.add_argument("--steps", type=int, default=40 if cuda else 10, help="steps per round")
    p.add_argument("--rounds", type=int, default=3 if cuda else 6,
                   help="alternating measured rounds per variant; the best is reported")
    p.add_argument("--compile", action="store_true",
                   help="also measure the rcic step with torch.compile (slow to start)")
    p.add_argument("--data", type=Path,
                   help="an RxRx1 folder to read instead of writing a synthetic one")
    p.add_argument("--cache", type=Path,
                   help="a raw cache of --data at --size px (rcic-cache) instead of building one")
    p.add_argument("--max-batch", type=int, default=0,
                   help="also search the largest batch that fits, up to this bound (0: no search)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    # As rcic-stage does (rcic.stage.setup_distributed): the input size never changes.
    torch.backends.cudnn.benchmark = cuda
    name = torch.cuda.get_device_name(device) if cuda else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {name}; python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"command: python tools/bench_train.py {' '.join(sys.argv[1:])}")

    with tempfile.TemporaryDirectory(prefix="rcic-bench-train-") as tmp:
        data, recipe = make_recipe(Path(tmp), args)
        trainer = Trainer(recipe, data, device, with_pretrained=False)
        if trainer.batches_per_epoch < 2 or args.steps < 2:
            sys.exit(f"bench_train: {trainer.batches_per_epoch} batch(es) an epoch and --steps "
                     f"{args.steps}: raise --classes or --experiments, and --steps, to 2 or more")
        print(f"backbone {args.backbone}, {args.size} px, batch {args.batch}, augment "
              f"{args.augment}, {args.workers} loader workers, {len(trainer.train_set)} train "
              f"sites; rcic step: amp {trainer.amp}, channels_last {trainer.channels_last}, "
              f"optimizer {'fused' if trainer.optimizer.defaults.get('fused') else 'not fused'}")
        meters = [Meter("baseline", Baseline(trainer, args.workers), device),
                  Meter("rcic", RcicStep(trainer), device)]
        if args.compile:
            compiled = Trainer(recipe, data, device, with_pretrained=False)
            compiled.model = torch.compile(compiled.model)
            meters.append(Meter("compile", RcicStep(compiled), device))
        for meter in meters:
            started = time.perf_counter()
            meter.run(args.warmup)
            print(f"{meter.name}: {args.warmup} warm-up steps in "
                  f"{time.perf_counter() - started:.1f} s")
        for _ in range(args.rounds):
            for meter in meters:
                meter.measure(args.steps)
        if args.json:   # written now too, so that a search cut short keeps the measurement
            args.json.write_text(json.dumps(report(args, trainer, meters, {}), indent=1))
        # After the measurement: a search leaves the weights changed and memory fragmented.
        searched = {meter.name: largest_batch(meter, args.batch, args.max_batch, args.size)
                    for meter in meters if args.max_batch}

    base = meters[0].best[0]
    print(f"\n{'variant':<10}{'images/s':>10}{'x baseline':>12}{'waits':>8}{'epoch start':>13}"
          f"   rounds (images/s)")
    for meter in meters:
        rate, waits = meter.best
        rounds = " ".join(f"{r:.1f}" for r, _ in meter.rounds)
        start = sum(meter.epoch_starts) / max(1, len(meter.epoch_starts))
        print(f"{meter.name:<10}{rate:>10.1f}{rate / base:>12.2f}{waits:>8.1%}{start:>12.2f}s"
              f"   {rounds}")
    print("images/s and waits leave out each epoch's first batch; 'epoch start' is what that "
          "batch waited (a new DataLoader), paid once per epoch")
    for meter in meters:
        if meter.peak_bytes is not None:
            print(f"{meter.name}: peak GPU memory {meter.peak_bytes / 2 ** 30:.2f} GiB")
    for name, (batch, bounded) in searched.items():
        print(f"{name}: largest batch that fits {'>= ' if bounded else ''}{batch} "
              f"(doubling from {args.batch}, bound {args.max_batch})")
    if args.json:
        args.json.write_text(json.dumps(report(args, trainer, meters, searched), indent=1))


def report(args, trainer, meters, searched):
    """The figures as gpu_check.py collects them."""
    base = meters[0].best[0]
    variants = {}
    for meter in meters:
        rate, waits = meter.best
        batch, bounded = searched.get(meter.name, (None, False))
        variants[meter.name] = {
            "images_per_s": round(rate, 2), "x_baseline": round(rate / base, 3) if base else None,
            "waits": round(waits, 4), "rounds": [round(r, 2) for r, _ in meter.rounds],
            "peak_memory_gib": None if meter.peak_bytes is None
            else round(meter.peak_bytes / 2 ** 30, 3),
            "largest_batch": batch, "largest_batch_at_bound": bounded}
    return {"backbone": args.backbone, "size": args.size, "batch": args.batch,
            "workers": args.workers, "train_sites": len(trainer.train_set),
            "amp": trainer.amp, "channels_last": trainer.channels_last,
            "fused": bool(trainer.optimizer.defaults.get("fused")),
            "max_batch": args.max_batch, "variants": variants}


if __name__ == "__main__":
    main()
