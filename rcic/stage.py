"""One stage: resume, train while the budget allows, save, report.

The stage never runs past its budget. Two layers keep that promise:

- Here, before each unit of work (a micro-batch, an optimizer step, a batch of a validation or
  pseudo-label pass, a save) the loop asks whether that work *plus the final save* still fits,
  using measured durations. A step is given up between micro-batches (and undone); a long pass
  stops at a batch boundary; the stage's first micro-batch is measured before a step is trusted.
- Around it, the supervisor (rcic/deadline.py) kills the stage's whole process tree at the
  deadline when a unit of work never returns (a hung loader worker, a stalled save, a dead rank).

Whatever happens the newest committed checkpoint stays in the output folder; a stage that ends
by itself also leaves the inference weights, `stage.json`, `metrics.csv`, `curves.png` and
`stage.log` there.
"""
import csv
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rcic import checkpoint, stage_report
from rcic.budget import USABLE_FRACTION, DurationEstimator, Interrupted, StopRequest
from rcic.config import differing_training_fields, from_dict, save_recipe
from rcic.deadline import Reporter
from rcic.errors import UserError
from rcic.logs import setup_logging
from rcic.progress import latest, progress
from rcic.train import Trainer
from rcic.weights import WEIGHTS_NAME, find_weights, read_weights, save_weights

log = logging.getLogger("rcic")


def train_stage(recipe, data, out, budget, resume_roots, max_steps=0, quiet=False,
                reporter=None):
    """Train one stage of `recipe` on `data` (an RxRx1) into `out` in this process (a rank of
    it under torchrun: rank 0 alone writes); returns its report (the content of stage.json).

    This is the worker's function: rcic-stage and the kernels reach it through the launcher
    (rcic/launch.py), which supervises it; tests that are not about processes call it directly.
    budget: a rcic.budget.Budget; resume_roots: folders searched for this recipe's newest
    checkpoint (`out` is added); max_steps: stop after that many optimizer steps even with
    budget left (0: no limit); reporter: the supervisor's rcic.deadline.Reporter, if any.
    """
    out = Path(out)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(out / "stage.log" if rank == 0 else None, quiet or rank > 0)
    # The first rank on each machine tells that machine's supervisor (on more than one machine
    # each holds the deadline of its own process tree).
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        reporter = None
    return Stage(recipe, data, out, budget, [*resume_roots, out], max_steps, reporter).run()


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


BACKENDS = ("auto", "nccl", "gloo")


def setup_distributed(train):
    """(world, rank, device, runtime) for the recipe's `train` settings: one process per GPU
    under torchrun, else a single process. `runtime` says how it runs (stage.json keeps it).

    Rank r takes GPU r modulo the GPUs it sees: with `ddp_backend: gloo` several ranks may
    share one GPU (NCCL refuses that), which a test on a one-GPU machine needs."""
    if train.ddp_backend not in BACKENDS:
        raise UserError(f"recipe field train.ddp_backend is {train.ddp_backend!r}: expected one "
                        f"of {', '.join(BACKENDS)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if train.deterministic:
        # cuBLAS needs its workspace fixed before the first CUDA call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some backward kernels (adaptive average pooling) have no deterministic
        # twin and only warn, naming the op that breaks exactness.
        torch.use_deterministic_algorithms(True, warn_only=True)
    backend = None
    if world > 1:
        backend = train.ddp_backend if train.ddp_backend != "auto" else "nccl" if cuda else "gloo"
        dist.init_process_group(backend)
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        # The input size never changes within a run: let cuDNN pick its fastest kernels, unless
        # the run must be deterministic (autotuning may pick other kernels in another process).
        torch.backends.cudnn.benchmark = not train.deterministic
    runtime = {"device": str(device), "world_size": world, "backend": backend,
               "deterministic": train.deterministic,
               "cudnn_benchmark": bool(cuda and not train.deterministic)}
    return world, rank, device, runtime


def all_agree(flag, world, device):
    """True only if every rank says True: all ranks stop on the same step, or none does."""
    if world == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class Stage:
    """Train one stage of a recipe: what happens next is always one of eval, pseudo, step, save
    or stop (`train_loop`), each asked of the budget first."""

    def __init__(self, recipe, data, out, budget, resume_roots, max_steps=0, reporter=None):
        self.recipe, self.data, self.out, self.budget = recipe, data, Path(out), budget
        self.max_steps = max_steps    # optimizer steps this stage may take (0 = no limit)
        self.resume_roots = resume_roots
        self.times = DurationEstimator()
        self.world, self.rank, self.device, self.runtime = setup_distributed(recipe.train)
        self.is_main = self.rank == 0
        self.reporter = reporter or Reporter()   # nobody to tell without a supervisor
        self.stop = None              # the StopRequest while run() runs
        self.stopped_by = None        # "done", "budget", "signal" or "steps"
        self.steps_this_stage = 0
        self.samples_this_stage = 0
        self.train_seconds = 0.0
        self.resumed_from = None
        self.checkpoint_step = None   # the step of the newest checkpoint committed in `out`
        self.changed = False          # trained or evaluated anything in this stage
        # Where the budget went: the fixed costs of a stage, besides its steps.
        self.costs = stage_report.new_costs(teardown_estimate=self.budget.margin)

    # -- run --------------------------------------------------------------------------------
    def run(self):
        # SIGTERM / SIGINT become a polite stop for exactly as long as the stage trains.
        with StopRequest() as self.stop:
            trainer = self.start()
            try:
                self.train(trainer)
            except UserError:
                # Bad data found mid-run (a PNG whose body is corrupt): keep the steps trained so
                # far, then report. A step that was under way has been abandoned (`step`).
                if self.changed and self.world == 1:
                    try:
                        self.save(trainer)
                    except UserError:
                        pass      # the save itself failed (e.g. a full disk): report the first error
                raise
            self.finish(trainer)
        return self.report(trainer)

    def start(self):
        """The trainer, resumed from the newest checkpoint of the recipe (carried into `out` at
        once, so the newest commit is in place whatever happens later) or freshly initialised."""
        self.tell("startup")
        ref = find_resume_point(self.resume_roots, self.recipe)
        # Pretrained weights matter only for a fresh start: a resumed stage (or a Kaggle kernel
        # without the weights file attached) takes every weight from the checkpoint.
        fresh = ref is None and not self.recipe.train.init_from
        trainer = Trainer(self.recipe, self.data, self.device, self.world, self.rank, fresh)
        if ref is not None:
            trainer.load_state_dict(checkpoint.load_state(ref))
            self.resumed_from = ref
            log.info("resumed from %s (step %d, epoch %d)", ref.path, trainer.global_step, trainer.epoch)
            if self.is_main and ref.path.parent.resolve() != self.out.resolve():
                checkpoint.copy_checkpoint(ref, self.out)
            self.checkpoint_step = ref.step
        elif self.recipe.train.init_from:
            self.init_from(trainer)
        else:
            log.info("no checkpoint of recipe %s found: starting from scratch", self.recipe.name)
        # A save writes about 3x the weights: a guess until the first save is measured.
        n_bytes = sum(p.numel() * p.element_size() for p in trainer.raw_model.parameters())
        self.times.seed("save", 1.0 + 3 * n_bytes / 50e6)
        return trainer

    def init_from(self, trainer):
        source = Path(self.recipe.train.init_from)
        candidates = [source] if source.is_file() else find_weights([source, *self.resume_roots])
        if not candidates:
            raise UserError(f"train.init_from {source}: no weights.pt found there; point it at the "
                            f"weights.pt of the first-step recipe")
        skipped = trainer.init_from_weights(read_weights(candidates[0])["model"])
        log.info("initialised from %s (not taken: %s)", candidates[0], ", ".join(skipped) or "nothing")

    def train(self, trainer):
        # A live bar in a terminal; in a kernel log, a plain line every 30 s or so.
        with progress(trainer.total_steps, min(trainer.global_step, trainer.total_steps),
                      desc="rcic stage", disable=not self.is_main,
                      status=lambda: {"loss": latest(trainer.history, "train_loss"),
                                      "samples/s": self.samples_this_stage / self.train_seconds
                                      if self.train_seconds else None}) as bar:
            self.train_loop(trainer, bar)
        if trainer.finished:
            self.stopped_by = "done"

    def train_loop(self, trainer, bar):
        """Until the recipe is done: evaluate, choose pseudo-labels or take a step, whichever is
        due, once the budget says it may start; save and evaluate on the recipe's schedule."""
        self.costs["startup_seconds"] = round(self.budget.elapsed(), 3)
        batches = None                 # the open epoch's micro-batches (one loader an epoch)
        while not trainer.finished:
            unit = "eval" if trainer.pending_eval else "pseudo" if trainer.pending_pseudo else "step"
            if not self.may_start(unit):
                return
            if unit == "eval":
                if not self.evaluate(trainer):
                    return
            elif unit == "pseudo":
                if not self.refresh_pseudo(trainer):
                    return
                batches = None         # the training set has changed
            else:
                fresh = batches is None
                batches = trainer.micro_batches() if fresh else batches
                if not self.step(trainer, batches, bar, fresh):
                    return
                if trainer.batch_in_epoch == 0:
                    batches = None     # the epoch is over
                if self.due(trainer, self.recipe.train.checkpoint_every_steps) and self.fits("save"):
                    self.save(trainer)
                if self.due(trainer, self.recipe.train.eval_every_steps) and self.fits("eval") \
                        and not self.evaluate(trainer):
                    return

    # -- the budget ---------------------------------------------------------------------------
    def fits(self, kind, count=1):
        """Do `count` more units of `kind` and the final save fit in the budget (all ranks)?"""
        need = count * self.times.estimate(kind, default=0.0) + self.times.estimate("save")
        return all_agree(self.budget.fits(need), self.world, self.device)

    def may_start(self, unit):
        """May one more `unit` start? When not, `stopped_by` says why."""
        if self.stop.requested:
            reason = "signal"
        elif unit == "step" and self.max_steps and self.steps_this_stage >= self.max_steps:
            reason = "steps"
        elif not self.budget.fits(self.times.estimate(unit, default=0.0) + self.times.estimate("save")):
            reason = "budget"
        else:
            reason = None
        if all_agree(reason is None, self.world, self.device):
            return True
        self.stopped_by = reason or "budget"     # another rank ran out of budget first
        if self.stopped_by == "budget" and not self.changed:
            # Start-up left no room for any work: this budget can never make progress.
            # The unit was never measured: count it as long as start-up, at the least.
            startup = self.costs["startup_seconds"]
            work = startup + max(self.times.estimate(unit, 0.0), startup) + self.times.estimate("save")
            raise UserError(stage_report.too_short(
                self.recipe.name, self.budget.seconds,
                f"start-up took {startup:.0f} s and left no time for a {unit} and a save", work))
        return False

    def batch_stop(self, kind, collective=True):
        """`stop()` for a long pass: it times the pass's batches (the gap between two asks) as
        `kind` and says stop when one more batch and the final save no longer fit."""
        last = [None]

        def stop():
            now = time.perf_counter()
            if last[0] is not None:
                self.times.record(kind, now - last[0])
            last[0] = now
            fits = self.budget.fits(self.times.estimate(kind, 0.0) + self.times.estimate("save"))
            return not (all_agree(fits, self.world, self.device) if collective else fits)
        return stop

    @staticmethod
    def due(trainer, every):
        return bool(every) and trainer.global_step % every == 0

    def tell(self, phase, trainer=None):
        """Tell the supervisor (rcic.deadline) what starts now, and the stage's numbers so far."""
        self.reporter.tell(phase, self.summary(trainer) if trainer is not None else
                           {"recipe": self.recipe.name, "checkpoint_step": self.checkpoint_step,
                            "budget_seconds": self.budget.seconds, "costs": dict(self.costs)})

    # -- the units of work ----------------------------------------------------------------------
    def step(self, trainer, batches, bar, fresh_loader):
        """One optimizer step, micro-batch by micro-batch. Between micro-batches the budget is
        asked whether the rest of the step and the final save fit; if not, the step is undone
        and False returned. The stage's first micro-batch is measured before the step is
        trusted: when not even one step fits in this budget, that is one line (UserError)."""
        self.tell("step", trainer)
        began, seen = time.perf_counter(), trainer.samples_seen
        n = trainer.micro_batches_per_step
        trainer.begin_step()
        for k in range(n):
            if k and not self.fits("micro-batch", n - k):
                return self.give_up_step(trainer, n)
            waiting = time.perf_counter()
            try:
                batch = next(batches)
                computing = time.perf_counter()
                trainer.accumulate(batch)
            except BaseException:
                trainer.abandon_step()   # e.g. bad data: the state stays that of the last step
                raise
            # A micro-batch costs its wait for data too, except the first of a new loader,
            # whose wait (the workers starting) is paid once, not by every micro-batch.
            first = fresh_loader and k == 0
            self.times.record("micro-batch", time.perf_counter() - (computing if first else waiting))
        if self.steps_this_stage == 0 and n == 1 and not self.fits("micro-batch", 0):
            return self.give_up_step(trainer, n)
        trainer.finish_step()
        self.changed = True
        seconds = time.perf_counter() - began
        self.times.record("step", seconds)
        if self.steps_this_stage == 0:
            self.costs["first_step_seconds"] = round(seconds, 3)
        self.train_seconds += seconds
        self.steps_this_stage += 1
        self.samples_this_stage += trainer.samples_seen - seen
        bar.update(1)
        bar.set_postfix(epoch=trainer.epoch, left=f"{self.budget.remaining() / 60:.1f}m")
        return True

    def give_up_step(self, trainer, n):
        """Undo the step under way. In a stage that has done nothing yet, the budget cannot hold
        even one step: say so, and how much it would take, instead of saving nothing new."""
        trainer.abandon_step()
        if not self.changed:
            micro = self.times.estimate("micro-batch")
            step = micro * trainer.accum
            parts = f" ({trainer.accum} micro-batches of ~{micro:.0f} s)" if trainer.accum > 1 else ""
            # The budget must hold what start-up took, a step and a save.
            save = self.times.estimate("save")
            work = self.costs["startup_seconds"] + step + save
            raise UserError(stage_report.too_short(
                self.recipe.name, self.budget.seconds,
                f"after {self.costs['startup_seconds']:.0f} s of start-up, one optimizer step "
                f"takes about {step:.0f} s{parts} and a save about {save:.0f} s", work))
        self.stopped_by = "budget"
        log.info("stopped before the end of step %d: the rest of it no longer fits in the budget",
                 trainer.global_step + 1)
        return False

    def evaluate(self, trainer):
        """A validation pass; False when the budget stopped it at a batch boundary (an epoch's
        validation then stays pending: the next stage runs it from the start)."""
        row = self.run_pass("eval", lambda stop: trainer.evaluate(stop=stop), trainer,
                            stopped=f"validation at step {trainer.global_step} stopped")
        if row is not None:
            log.info("step %d epoch %d: val_loss %.4f val_acc %.4f", row["step"], row["epoch"],
                     row["val_loss"], row["val_acc"])
        return row is not None

    def refresh_pseudo(self, trainer):
        """Choose this epoch's pseudo-labels; False when the budget stopped the pass (the labels
        stay due: the next stage chooses them from the start, with the same weights). Rank 0
        alone predicts, so it alone asks the budget (no collective per batch)."""
        n = self.run_pass("pseudo", lambda stop: trainer.refresh_pseudo(stop=stop), trainer,
                          stopped="pseudo-labelling stopped", collective=False)
        if n is not None:
            log.info("epoch %d: %d pseudo-labelled test wells join the training set",
                     trainer.epoch, n)
        return n is not None

    def run_pass(self, phase, run, trainer, stopped, collective=True):
        """Run a long pass, `run(stop)`, as unit `phase` (rcic.stage_report.UNITS), asking the
        budget before each batch; its result, or None when the budget stopped it (`stopped`
        says which pass in the log). Its seconds and count go to the stage's costs."""
        unit = stage_report.UNIT[phase]
        self.tell(phase, trainer)
        started = time.perf_counter()
        try:
            with self.times.timer(phase):
                result = run(self.batch_stop(f"{phase}-batch", collective))
        except Interrupted:
            self.stopped_by = "budget"
            log.info("%s: the rest of it no longer fits in the budget", stopped)
            return None
        finally:
            self.costs[unit.seconds_key] += time.perf_counter() - started
        self.costs[unit.count_key] += 1
        self.changed = True
        return result

    # -- saving -----------------------------------------------------------------------------
    def save(self, trainer):
        """Every rank gathers the state (it holds every rank's RNG); rank 0 alone writes."""
        self.tell("save", trainer)
        started = time.perf_counter()
        with self.times.timer("save"):
            state = trainer.state_dict()
            if self.is_main:
                checkpoint.save_checkpoint(
                    self.out, state, step=trainer.global_step, epoch=trainer.epoch,
                    recipe_hash=self.recipe.training_hash(), done=trainer.finished,
                    info={"recipe": self.recipe.to_dict(), "name": self.recipe.name,
                          "processes": list(trainer.processes)})
                save_weights(self.out / WEIGHTS_NAME, trainer.inference_model(), self.recipe,
                             self.weights_meta(trainer))
            self.checkpoint_step = trainer.global_step
        unit = stage_report.UNIT["save"]
        self.costs[unit.seconds_key] += time.perf_counter() - started
        self.costs[unit.count_key] += 1

    def weights_meta(self, trainer):
        return {"n_treatments": self.data.n_treatments, "num_classes": trainer.num_classes,
                "cell_types": trainer.cell_types, "step": trainer.global_step,
                "done": trainer.finished}

    def finish(self, trainer):
        """The final save. A stage that changed nothing has its checkpoint in `out` already
        (carried at start), so the next kernel of a chain (which sees only this kernel's
        output) finds it; it writes the inference weights beside it."""
        if self.changed or self.resumed_from is None:
            self.save(trainer)
        elif self.is_main:
            save_weights(self.out / WEIGHTS_NAME, trainer.inference_model(), self.recipe,
                         self.weights_meta(trainer))
        if self.world > 1:
            dist.barrier()

    # -- reports ----------------------------------------------------------------------------
    def summary(self, trainer):
        """The stage's numbers: what stage.json holds, and what the supervisor keeps of it."""
        steps_left = max(0, trainer.total_steps - trainer.global_step)
        step_time = self.times.estimate("step") if self.steps_this_stage else 0.0
        usable = max(1.0, self.budget.seconds * USABLE_FRACTION)
        costs = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.costs.items()}
        return {
            "done": trainer.finished,
            "recipe": self.recipe.name,
            "recipe_hash": self.recipe.training_hash(),
            "global_step": trainer.global_step,
            "total_steps": trainer.total_steps,
            "epoch": trainer.epoch,
            "steps_this_stage": self.steps_this_stage,
            "checkpoint_step": self.checkpoint_step,
            "seconds_used": round(self.budget.elapsed(), 3),
            "budget_seconds": self.budget.seconds,
            "samples_per_second": round(self.samples_this_stage / self.train_seconds, 2)
            if self.train_seconds else None,
            "stages_left_estimate": 0 if trainer.finished else
            (math.ceil(steps_left * step_time / usable) if step_time else None),
            "resumed_from": str(self.resumed_from.path) if self.resumed_from else None,
            "last_eval": next((r for r in reversed(trainer.history) if "val_acc" in r), None),
            "stopped_by": self.stopped_by,
            "costs": costs,
            "runtime": self.runtime,
            "processes": list(trainer.processes),
            "samples_digest": trainer.samples_digest,
        }

    def report(self, trainer):
        self.tell("teardown", trainer)
        report = self.summary(trainer)
        if self.is_main:
            self.write_reports(trainer, report)
        return report

    def write_reports(self, trainer, report):
        save_recipe(self.recipe, self.out / "recipe.yaml")
        stage_report.write(self.out, report)
        rows = trainer.history
        keys = ["step", "epoch", "lr", "train_loss", "val_loss", "val_acc"]
        keys += sorted({k for row in rows for k in row if k.startswith("val_acc_")})
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
