"""One stage: resume, train while the budget allows, save, report.

The contract (README.md): the stage never runs past its budget. Before each optimizer step,
each validation and each periodic save it asks whether that work *plus the final save* still
fits, using measured durations. Whatever happens it leaves a committed checkpoint, the
inference weights, `stage.json`, `metrics.csv`, `curves.png` and `stage.log` in its folder.
"""
import csv
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from rcic import checkpoint
from rcic.budget import USABLE_FRACTION, DurationEstimator, StopRequest
from rcic.config import differing_training_fields, from_dict, save_recipe
from rcic.errors import UserError
from rcic.logs import setup_logging
from rcic.train import Trainer
from rcic.weights import WEIGHTS_NAME, find_weights, read_weights, save_weights

log = logging.getLogger("rcic")
SUMMARY_KEYS = ("done", "global_step", "total_steps", "epoch", "seconds_used",
                "samples_per_second", "stages_left_estimate")


def run_stage(recipe, data, out, budget, resume_roots, max_steps=0, quiet=False):
    """Train one stage of `recipe` on `data` (an RxRx1) into `out`; returns its report (the
    content of stage.json). Under torchrun this is one rank of the stage: rank 0 alone writes.

    resume_roots: folders searched for this recipe's newest checkpoint (`out` is added).
    max_steps: stop after that many optimizer steps even with budget left (0: no limit).
    """
    out = Path(out)
    roots = [*resume_roots, out]
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        check_writable(out)
    setup_logging(out / "stage.log" if rank == 0 else None, quiet or rank > 0)
    return Stage(recipe, data, out, budget, roots, max_steps).run()


def launch_distributed(gpus, stage_argv, start):
    """Run the rcic-stage command `stage_argv` under torchrun, one process per GPU, all on the
    clock that started at `start` (epoch seconds); returns its exit status."""
    env = dict(os.environ, RCIC_START_TIME=repr(start))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", "-m", "rcic.cli.stage", *stage_argv]
    return subprocess.run(cmd, env=env).returncode


def check_writable(out):
    """Fail before any work if the output folder cannot take files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".rcic-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {out} is not writable ({err.strerror}): pass a writable --out")


def find_resume_point(roots, recipe):
    """The newest valid checkpoint of this recipe; refuse one of the same run with other fields."""
    wanted = recipe.training_hash()
    found = checkpoint.find_checkpoints(roots)
    mine = [ref for ref in found if ref.recipe_hash == wanted]
    if mine:
        return mine[0]
    for ref in found:
        theirs = from_dict(ref.manifest["info"]["recipe"], str(ref.path))
        if theirs.name == recipe.name:
            fields = ", ".join(differing_training_fields(theirs, recipe))
            raise UserError(f"checkpoint {ref.path} is of recipe {recipe.name!r} with other training "
                            f"fields ({fields}): resume with the same recipe, or train into a new "
                            f"--out without --resume-from that folder")
        log.info("ignoring checkpoint %s of another recipe (%s)", ref.path, theirs.name)
    return None


def setup_distributed():
    """(world, rank, device): one process per GPU under torchrun, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        # The input size never changes within a run: let cuDNN pick its fastest kernels.
        torch.backends.cudnn.benchmark = True
        return world, rank, torch.device("cuda", local)
    return world, rank, torch.device("cpu")


def all_agree(flag, world, device):
    """True only if every rank says True: all ranks stop on the same step, or none does."""
    if world == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class Stage:
    def __init__(self, recipe, data, out, budget, resume_roots, max_steps=0):
        self.recipe, self.data, self.out, self.budget = recipe, data, Path(out), budget
        self.max_steps = max_steps    # optimizer steps this stage may take (0 = no limit)
        self.resume_roots = resume_roots
        self.times = DurationEstimator()
        self.stop = StopRequest()
        self.world, self.rank, self.device = setup_distributed()
        self.is_main = self.rank == 0
        self.steps_this_stage = 0
        self.samples_this_stage = 0
        self.train_seconds = 0.0
        self.resumed_from = None
        self.changed = False          # trained or evaluated anything in this stage
        self.save_seconds = 0.0

    # -- budget -----------------------------------------------------------------------------
    def fits(self, kind):
        """Does one more unit of `kind` plus the final save still fit in the budget?"""
        # Before the first step is measured nothing is known about it; the final save is.
        default = self.times.estimate("eval", 0.0) * self.n_test_per_val if kind == "pseudo" else 0.0
        need = self.times.estimate(kind, default=default) + self.times.estimate("save")
        return all_agree(self.budget.fits(need) and not self.stop.requested, self.world, self.device)

    # -- run --------------------------------------------------------------------------------
    def run(self):
        if self.is_main:
            check_writable(self.out)
        ref = find_resume_point(self.resume_roots, self.recipe)
        # Pretrained weights matter only for a fresh start: a resumed stage (or a Kaggle kernel
        # without the weights file attached) takes every weight from the checkpoint.
        fresh = ref is None and not self.recipe.train.init_from
        trainer = Trainer(self.recipe, self.data, self.device, self.world, self.rank, fresh)
        if ref is not None:
            trainer.load_state_dict(checkpoint.load_state(ref))
            self.resumed_from = ref
            log.info("resumed from %s (step %d, epoch %d)", ref.path, trainer.global_step, trainer.epoch)
        elif self.recipe.train.init_from:
            self.init_from(trainer)
        else:
            log.info("no checkpoint of recipe %s found: starting from scratch", self.recipe.name)
        self.seed_estimates(trainer)
        try:
            self.train(trainer)
        except UserError:
            # Bad data found mid-run (a PNG whose body is corrupt): keep the steps trained so
            # far, then report. The error surfaces while a step's batches are being read, so
            # the trainer holds the state after its last whole step.
            if self.changed and self.world == 1:
                try:
                    self.save(trainer)
                except UserError:
                    pass          # the save itself failed (e.g. a full disk): report the first error
            raise
        finally:
            self.stop.restore()
        self.finish(trainer)
        return self.report(trainer)

    def init_from(self, trainer):
        source = Path(self.recipe.train.init_from)
        candidates = [source] if source.is_file() else find_weights([source, *self.resume_roots])
        if not candidates:
            raise UserError(f"train.init_from {source}: no weights.pt found there; point it at the "
                            f"weights.pt of the first-step recipe")
        skipped = trainer.init_from_weights(read_weights(candidates[0])["model"])
        log.info("initialised from %s (not taken: %s)", candidates[0], ", ".join(skipped) or "nothing")

    def seed_estimates(self, trainer):
        """Guesses used until the first real measurements: a save writes about 3x the weights."""
        n_bytes = sum(p.numel() * p.element_size() for p in trainer.raw_model.parameters())
        self.times.seed("save", 1.0 + 3 * n_bytes / 50e6)
        self.times.seed("eval", 0.0)
        # Choosing pseudo-labels predicts the test set: guessed from the validation time.
        n_test = len(self.data.test_sites(self.recipe.data.cell_types))
        self.n_test_per_val = n_test / max(1, len(trainer.val_set))

    def train(self, trainer):
        with tqdm(total=trainer.total_steps, initial=min(trainer.global_step, trainer.total_steps),
                  disable=not self.is_main, unit="step", dynamic_ncols=True) as bar:
            self.train_loop(trainer, bar)

    def train_loop(self, trainer, bar):
        interval = self.recipe.train.checkpoint_every_steps
        eval_every = self.recipe.train.eval_every_steps
        while not trainer.finished:
            if trainer.pending_eval:
                if not self.fits("eval"):
                    break
                self.evaluate(trainer)
                continue
            if trainer.pending_pseudo:
                if not self.fits("pseudo"):
                    break
                with self.times.timer("pseudo"):
                    n = trainer.refresh_pseudo()
                self.changed = True
                log.info("epoch %d: %d pseudo-labelled test wells join the training set",
                         trainer.epoch, n)
                continue
            stopped = False
            last = time.perf_counter()
            for group in trainer.step_groups():
                if trainer.global_step >= trainer.total_steps:
                    break
                if not self.fits("step") or self.steps_this_stage == (self.max_steps or -1):
                    stopped = True
                    break
                trainer.train_step(group)
                self.changed = True
                now = time.perf_counter()
                # The step's duration includes waiting for its data: that is what the budget pays.
                self.times.record("step", now - last)
                self.train_seconds += now - last
                self.steps_this_stage += 1
                self.samples_this_stage += sum(len(b["label"]) for b in group) * self.world
                bar.update(1)
                bar.set_postfix(epoch=trainer.epoch, left=f"{self.budget.remaining() / 60:.1f}m")
                if interval and trainer.global_step % interval == 0 and self.fits("save"):
                    self.save(trainer)
                if eval_every and trainer.global_step % eval_every == 0 and self.fits("eval"):
                    self.evaluate(trainer)
                last = time.perf_counter()
                if trainer.pending_eval:
                    break
            if stopped:
                break
            if trainer.global_step >= trainer.total_steps and not trainer.pending_eval:
                break

    def evaluate(self, trainer):
        with self.times.timer("eval"):
            row = trainer.evaluate()
        self.changed = True
        log.info("step %d epoch %d: val_loss %.4f val_acc %.4f", row["step"], row["epoch"],
                 row["val_loss"], row["val_acc"])

    # -- saving -----------------------------------------------------------------------------
    def save(self, trainer):
        """Every rank gathers the state (it holds every rank's RNG); rank 0 alone writes."""
        started = time.perf_counter()
        with self.times.timer("save"):
            state = trainer.state_dict()
            if not self.is_main:
                return
            checkpoint.save_checkpoint(
                self.out, state, step=trainer.global_step, epoch=trainer.epoch,
                recipe_hash=self.recipe.training_hash(), done=trainer.finished,
                info={"recipe": self.recipe.to_dict(), "name": self.recipe.name})
            save_weights(self.out / WEIGHTS_NAME, trainer.inference_model(), self.recipe,
                         self.weights_meta(trainer))
        self.save_seconds += time.perf_counter() - started

    def weights_meta(self, trainer):
        return {"n_treatments": self.data.n_treatments, "num_classes": trainer.num_classes,
                "cell_types": trainer.cell_types, "step": trainer.global_step,
                "done": trainer.finished}

    def finish(self, trainer):
        """The final save; a stage that changed nothing carries its checkpoint forward, so the
        next kernel of a chain (which sees only this kernel's output) still finds it."""
        if self.changed or self.resumed_from is None:
            self.save(trainer)
        elif self.is_main:
            if self.resumed_from.path.parent.resolve() != self.out.resolve():
                checkpoint.copy_checkpoint(self.resumed_from, self.out)
            save_weights(self.out / WEIGHTS_NAME, trainer.inference_model(), self.recipe,
                         self.weights_meta(trainer))
        if self.world > 1:
            dist.barrier()

    # -- reports ----------------------------------------------------------------------------
    def report(self, trainer):
        steps_left = max(0, trainer.total_steps - trainer.global_step)
        step_time = self.times.estimate("step") if self.steps_this_stage else 0.0
        usable = max(1.0, self.budget.seconds * USABLE_FRACTION)
        report = {
            "done": trainer.finished,
            "recipe": self.recipe.name,
            "recipe_hash": self.recipe.training_hash(),
            "global_step": trainer.global_step,
            "total_steps": trainer.total_steps,
            "epoch": trainer.epoch,
            "steps_this_stage": self.steps_this_stage,
            "seconds_used": round(self.budget.elapsed(), 3),
            "budget_seconds": self.budget.seconds,
            "samples_per_second": round(self.samples_this_stage / self.train_seconds, 2)
            if self.train_seconds else None,
            "stages_left_estimate": 0 if trainer.finished else
            (math.ceil(steps_left * step_time / usable) if step_time else None),
            "resumed_from": str(self.resumed_from.path) if self.resumed_from else None,
            "last_eval": next((r for r in reversed(trainer.history) if "val_acc" in r), None),
            "stopped_by_signal": self.stop.requested,
            "seconds_saving": round(self.save_seconds, 3),
        }
        if self.is_main:
            self.write_reports(trainer, report)
        return report

    def write_reports(self, trainer, report):
        save_recipe(self.recipe, self.out / "recipe.yaml")
        (self.out / "stage.json").write_text(json.dumps(report, indent=1))
        rows = trainer.history
        keys = ["step", "epoch", "lr", "train_loss", "val_loss", "val_acc"]
        with open(self.out / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        # The plot is a nicety: importing matplotlib alone can take seconds on a busy machine.
        if self.budget.fits(self.times.estimate("plot", default=3.0)):
            with self.times.timer("plot"):
                plot_curves(rows, self.out / "curves.png", self.recipe.name)
        else:
            log.warning("no time left in the budget for curves.png: skipped")


def plot_curves(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_acc" in r]
    ax1.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train loss")
    ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax1.set_xlabel("optimizer step")
    ax1.legend()
    ax2.plot([r["step"] for r in val], [r["val_acc"] for r in val], "o-", color="C2")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("validation accuracy (held-out experiments)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
