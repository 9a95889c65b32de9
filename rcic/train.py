"""The training state and one optimizer step: model, optimizer, data position, RNG, metrics.

`Trainer` owns everything an exact continuation needs and hands it out as one `state_dict()`.
It knows nothing about budgets or files: `stage.py` decides when to step, evaluate and save.

One optimizer step = `accumulation_steps` micro-batches (`begin_step`, `accumulate` each,
`finish_step`); the stage may give a step up between micro-batches (`abandon_step`), which undoes
everything the step changed. Checkpoints are only taken between optimizer steps, so no
half-accumulated gradient ever needs saving.
"""
import contextlib
import hashlib
import random

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Subset

from rcic.adabn import plate_rows, plate_statistics
from rcic.budget import Interrupted, interruptible
from rcic.config import check_process_count
from rcic.data.layout import N_CONTROL_CLASSES, plate_key
from rcic.data.dataset import EpochBatchSampler, Normalizer, SiteDataset, make_loader
from rcic.errors import UserError
from rcic.models import create_loss, create_model, set_backbone_trainable, sync_batchnorm
from rcic.optim import create_ema, create_optimizer, create_scheduler
from rcic.pseudo import (choose_pseudo_labels, labels_from_lists, labels_to_lists, pseudo_sites,
                         schedule_fraction)


def rng_state():
    """Every generator's state as tensors and plain values (a checkpoint holds nothing else):
    numpy's key array becomes a list of ints, the rest of its tuple is plain already."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (str(name), keys.tolist(), int(position), int(has_gauss),
                       float(cached_gaussian)),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss,
                         cached_gaussian))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, recipe, data, device, world=1, rank=0, with_pretrained=True):
        self.recipe, self.data, self.device = recipe, data, device
        self.world, self.rank = world, rank
        check_process_count(recipe, world)
        self.on_gpu = device.type == "cuda"
        self.amp = self.on_gpu and recipe.optim.amp
        # The order below is part of the result: the seeds, then everything that draws from
        # them (the model's initial weights), exactly as every earlier run did it.
        seed_everything(recipe.train.seed)
        self.cell_types = sorted(data.wells["cell_type"].unique())
        self.base_train_sites, val_sites = self.split()
        self.pseudo_labels = None     # DataFrame id_code, sirna, confidence (pseudo.py)
        self.pseudo_epoch = -1        # the epoch whose start chose pseudo_labels
        self.build_train_set(verify_cache=True)
        self.build_val_set(val_sites)
        self.num_classes = self.count_classes()
        self.raw_model = self.build_model(with_pretrained)
        if world > 1 and recipe.model.sync_batchnorm:
            self.raw_model = sync_batchnorm.convert(self.raw_model, self.on_gpu)
        self.model = self.wrap_distributed(self.raw_model)
        self.criterion = create_loss(recipe.model)
        self.optimizer = create_optimizer(recipe.optim, self.raw_model)
        self.accum = max(1, recipe.optim.accumulation_steps)
        self.batches_per_epoch = self.count_batches_per_epoch()
        self.steps_per_epoch = -(-self.batches_per_epoch // self.accum)
        self.total_steps = recipe.train.max_steps or recipe.train.epochs * self.steps_per_epoch
        self.scheduler = create_scheduler(recipe.optim, self.optimizer, self.steps_per_epoch,
                                          self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.ema = create_ema(self.raw_model, recipe.optim.ema_decay)
        self.reset_progress()

    # -- building ---------------------------------------------------------------------------
    def split(self):
        """(train sites, validation sites): validation holds out whole experiments."""
        d = self.recipe.data
        return self.data.split_sites(d.val_experiments, d.cell_types, d.use_controls,
                                     d.use_test_controls)

    def build_train_set(self, verify_cache=False):
        """The labelled train sites plus the current pseudo-labelled test sites.
        verify_cache: read the whole cache once to check it (the first build only)."""
        sites = pd.concat([self.base_train_sites, pseudo_sites(self.data, self.pseudo_labels)],
                          ignore_index=True)
        self.train_set = SiteDataset(self.data, sites, self.recipe, train=True,
                                     cell_types=self.cell_types, verify_cache=verify_cache)
        self.normalize_train = Normalizer.for_dataset(self.data, self.train_set).to(self.device)
        self.groups = plate_key(sites).to_numpy() if self.recipe.data.plate_batches else None

    def build_val_set(self, sites):
        # The training set has just verified the same cache.
        self.val_set = SiteDataset(self.data, sites, self.recipe, train=False,
                                   cell_types=self.cell_types, verify_cache=False)
        self.normalize_val = Normalizer.for_dataset(self.data, self.val_set).to(self.device)

    def count_classes(self):
        """The treatments, plus the control classes when controls are trained on."""
        d = self.recipe.data
        with_controls = d.use_controls or d.use_test_controls
        return self.data.n_treatments + (N_CONTROL_CLASSES if with_controls else 0)

    def build_model(self, with_pretrained):
        model = create_model(self.recipe.model, self.num_classes, len(self.cell_types),
                             with_pretrained).to(self.device)
        self.channels_last = self.on_gpu and self.recipe.optim.channels_last
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def wrap_distributed(self, model):
        """The model the training step calls: under DDP, the wrapper that syncs gradients."""
        if self.world == 1:
            return model
        # Head-only epochs leave the backbone without gradients, which DDP must be told.
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.on_gpu else None,
            find_unused_parameters=self.recipe.optim.freeze_backbone_epochs > 0)

    def count_batches_per_epoch(self):
        """Micro-batches of one epoch. The labelled set fixes it: pseudo-labels change what an
        epoch draws from, never how many steps it has, so the LR schedule stays the same."""
        n = len(self._sampler(0, 0, limit=None).batches)
        if n == 0:
            raise UserError(f"data.batch_size {self.recipe.data.batch_size} is larger than the "
                            f"{len(self.train_set)} training sites: lower it with "
                            f"--set data.batch_size=N")
        return n

    def reset_progress(self):
        self.global_step = 0          # optimizer steps done
        self.epoch = 0
        # Micro-batches of this epoch already consumed: the recipe's micro-batches, the same on
        # any number of processes (each rank takes a share of each), so it is a global position.
        self.batch_in_epoch = 0
        self.processes = [self.world]  # the process counts the run has trained on, in order
        # A running digest of the sample ids of every step so far, in order: two runs that saw
        # the same samples in the same order, on any process counts, have the same digest.
        self.samples_digest = ""
        self._order = None            # the micro-batches of the open epoch (all ranks' shares)
        self.samples_seen = 0
        self.pending_eval = False     # an epoch ended but its validation has not run yet
        self.history = []             # one dict per logged step or evaluation
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        self._micro_done = 0          # micro-batches of the step in progress
        self._undo = None             # what abandon_step restores (begin_step keeps it)

    @property
    def pending_pseudo(self):
        """At the start of an epoch that uses pseudo-labels, before they are chosen."""
        return (schedule_fraction(self.recipe.pseudo, self.epoch) > 0 and self.batch_in_epoch == 0
                and self.pseudo_epoch != self.epoch and self.global_step < self.total_steps)

    def refresh_pseudo(self, stop=None):
        """Choose this epoch's pseudo-labels with the current weights (rank 0 decides). `stop()`
        is asked by rank 0 before each batch; when it says so every rank raises Interrupted."""
        labels = [None]
        if self.rank == 0:
            before = rng_state()
            try:
                labels[0] = choose_pseudo_labels(
                    self.inference_model(), self.data, self.recipe, self.cell_types, self.device,
                    schedule_fraction(self.recipe.pseudo, self.epoch),
                    self.recipe.data.batch_size * 2, stop=stop)
            except Interrupted:
                # The pass drew from the RNG (its loader's seed): undo that, so that the pass
                # the next stage makes draws the same. labels[0] stays None: every rank stops.
                set_rng_state(before)
        if self.world > 1:
            dist.broadcast_object_list(labels, src=0)
        if labels[0] is None:
            raise Interrupted()
        self.pseudo_labels, self.pseudo_epoch = labels[0], self.epoch
        self.build_train_set()
        return len(labels[0])

    # -- state ------------------------------------------------------------------------------
    def state_dict(self):
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            # Every rank's RNG (a collective under DDP: all ranks must call state_dict).
            "rng": self.gather_rng(),
            "counters": {"global_step": self.global_step, "epoch": self.epoch,
                         "batch_in_epoch": self.batch_in_epoch, "samples_seen": self.samples_seen,
                         "pending_eval": self.pending_eval, "processes": list(self.processes),
                         "samples_digest": self.samples_digest,
                         # the running loss of an unfinished log interval, so that the metric
                         # history of a split run matches an uninterrupted one
                         "loss_sum": self._loss_sum.item(), "loss_count": self._loss_count},
            "history": list(self.history),
            "pseudo": {"labels": labels_to_lists(self.pseudo_labels), "epoch": self.pseudo_epoch},
            # The recipe, its hash and the rcic version are in the checkpoint's manifest.
        }

    def load_state_dict(self, state):
        counters = dict(state["counters"])
        if "processes" not in counters and len(state["rng"]) > 1:
            # Before 0.2 each of N processes drew whole micro-batches of its own, and the epoch
            # position counted them: it means other samples now.
            raise UserError(f"this checkpoint was written by rcic before 0.2 on "
                            f"{len(state['rng'])} processes, whose data position counts each "
                            f"process's own micro-batches: finish its run with the rcic that "
                            f"wrote it, or start a new one")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        rng = state["rng"]
        # Each rank continues its own random stream; a rank the writer did not have (more
        # processes now) takes rank 0's. Exact only on an unchanged process count.
        set_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        counters.setdefault("processes", [len(rng)])
        counters.setdefault("samples_digest", "")
        if counters["processes"][-1] != self.world:
            counters["processes"] = [*counters["processes"], self.world]
        self._loss_sum = torch.tensor(counters.pop("loss_sum"), device=self.device)
        self._loss_count = counters.pop("loss_count")
        for key, value in counters.items():
            setattr(self, key, value)
        self.history = list(state["history"])
        pseudo = state.get("pseudo") or {"labels": None, "epoch": -1}
        self.pseudo_labels, self.pseudo_epoch = labels_from_lists(pseudo["labels"]), pseudo["epoch"]
        self.build_train_set()

    def gather_rng(self):
        if self.world == 1:
            return [rng_state()]
        states = [None] * self.world
        dist.all_gather_object(states, rng_state())
        return states

    def init_from_weights(self, weights_state):
        """Two-step training: start from another recipe's final weights (heads may differ)."""
        own = self.raw_model.state_dict()
        usable = {k: v for k, v in weights_state.items() if k in own and own[k].shape == v.shape}
        self.raw_model.load_state_dict(usable, strict=False)
        return sorted(set(own) - set(usable))

    def inference_model(self):
        """The weights to predict with: the EMA copy when the recipe keeps one."""
        return self.ema.module if self.ema else self.raw_model

    @property
    def finished(self):
        return self.global_step >= self.total_steps and not self.pending_eval

    # -- training ---------------------------------------------------------------------------
    def _sampler(self, epoch, start, limit):
        """The batches of `epoch` from batch `start`, at most `limit` (None: all there are)."""
        return EpochBatchSampler(len(self.train_set), self.recipe.data.batch_size,
                                 self.recipe.train.seed, epoch, start, self.groups,
                                 self.world, self.rank, limit=limit)

    def _loader(self, dataset, **kwargs):
        # A private generator: creating a loader iterator must not draw from the global torch
        # RNG, or an extra evaluation in one stage would shift dropout in the next.
        return make_loader(dataset, num_workers=self.recipe.data.num_workers,
                           pin_memory=self.on_gpu, generator=torch.Generator(), **kwargs)

    def micro_batches(self):
        """An iterator over this rank's shares of the micro-batches of the rest of this epoch
        (one loader for them)."""
        set_backbone_trainable(self.raw_model, self.epoch >= self.recipe.optim.freeze_backbone_epochs)
        sampler = self._sampler(self.epoch, self.batch_in_epoch, self.batches_per_epoch)
        self._order = sampler.batches
        return iter(self._loader(self.train_set, batch_sampler=sampler))

    @property
    def micro_batches_per_step(self):
        """How many micro-batches the next optimizer step takes (fewer at an epoch's end)."""
        return min(self.accum, self.batches_per_epoch - self.batch_in_epoch)

    def _to_device(self, batch):
        images = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images, batch["label"].to(self.device, non_blocking=True),
                batch["cell_type"].to(self.device, non_blocking=True),
                batch["norm_idx"].to(self.device, non_blocking=True))

    def begin_step(self):
        """Start an optimizer step. What its micro-batches change before the optimizer runs (the
        RNG, BatchNorm statistics, the running loss) is kept aside, so `abandon_step` can undo it."""
        self.model.train()
        self._micro_done = 0
        self._undo = None
        if self.micro_batches_per_step > 1:
            self._undo = {"rng": rng_state(), "loss_sum": self._loss_sum.clone(),
                          "loss_count": self._loss_count, "samples_seen": self.samples_seen,
                          "buffers": [b.detach().clone() for b in self.raw_model.buffers()]}

    def accumulate(self, batch):
        """Forward and backward of one micro-batch; the gradients add up until `finish_step`."""
        n = self.micro_batches_per_step
        last = self._micro_done == n - 1
        images, labels, cell_types, norm_idx = self._to_device(batch)
        # Under DDP, gradients are only all-reduced on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync()
        with sync, torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            x = self.normalize_train(images, norm_idx)
            loss = self.criterion(self.model(x, cell_types), labels) / n
        with sync:
            self.scaler.scale(loss).backward()
        self._loss_sum += loss.detach() * n
        self._loss_count += 1
        self.samples_seen += len(labels) * self.world      # every rank's equal share
        self._micro_done += 1
        return last

    def abandon_step(self):
        """Drop an unfinished step: its gradients and side effects never reach a checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)
        undo, self._undo = self._undo, None
        if undo is not None:
            set_rng_state(undo["rng"])
            self._loss_sum, self._loss_count = undo["loss_sum"], undo["loss_count"]
            self.samples_seen = undo["samples_seen"]
            with torch.no_grad():
                for buffer, saved in zip(self.raw_model.buffers(), undo["buffers"]):
                    buffer.copy_(saved)

    def finish_step(self):
        """The optimizer step over the accumulated micro-batches."""
        self._undo = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler:
            self.scheduler.step()
        if self.ema:
            self.ema.update_parameters(self.raw_model)
        self.global_step += 1
        self.note_samples(self._order[self.batch_in_epoch:self.batch_in_epoch + self._micro_done])
        self.batch_in_epoch += self._micro_done
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self.pending_eval = True
        if self.global_step % self.recipe.train.log_every_steps == 0 or self.pending_eval:
            self.log_train()

    def note_samples(self, micro_batches):
        """Fold the sample ids of one step (every rank's shares) into `samples_digest`."""
        digest = hashlib.sha256(self.samples_digest.encode())
        for batch in micro_batches:
            digest.update(np.asarray(batch, dtype=np.int64).tobytes())
        self.samples_digest = digest.hexdigest()[:16]

    def log_train(self):
        """Reads the running loss (one host sync per log interval, not per step)."""
        if self._loss_count == 0:
            return
        loss = self._loss_sum.item() / self._loss_count
        self._loss_sum.zero_()
        self._loss_count = 0
        self.history.append({"step": self.global_step, "epoch": self.epoch,
                             "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss})

    # -- evaluation -------------------------------------------------------------------------
    def _val_batches(self, rows, stop):
        """(normalised images, labels, cell types) of some validation rows, batch by batch."""
        loader = self._loader(Subset(self.val_set, rows), batch_size=self.recipe.data.batch_size * 2)
        for batch in interruptible(loader, stop):
            images, labels, cell_types, norm_idx = self._to_device(batch)
            yield self.normalize_val(images, norm_idx), labels, cell_types

    @torch.inference_mode()
    def evaluate(self, stop=None):
        """Loss and accuracy on the held-out experiments (site level). Every rank evaluates
        the whole validation set, so no collective is needed here. A plate-batch recipe is
        evaluated as it will predict: each plate with its own BatchNorm statistics (AdaBN).
        `stop()` is asked before each batch; when it says so the pass raises Interrupted and
        changes nothing (a pending evaluation stays pending)."""
        model = self.inference_model()
        model.eval()
        parts = (plate_rows(self.val_set.sites) if self.recipe.data.plate_batches
                 else [np.arange(len(self.val_set))])
        total, correct, loss_sum = 0, 0, 0.0
        right, seen = torch.zeros(len(self.cell_types)), torch.zeros(len(self.cell_types))
        for rows in parts:
            measured = ((x, c) for x, _, c in self._val_batches(rows, stop))
            statistics = (plate_statistics(model, measured) if self.recipe.data.plate_batches
                          else contextlib.nullcontext())
            with statistics:
                for x, labels, cell_types in self._val_batches(rows, stop):
                    with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                        logits = model.logits(model(x, cell_types)).float()
                    loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                    hits = logits.argmax(1) == labels
                    correct += hits.sum().item()
                    total += len(labels)
                    right += torch.bincount(cell_types[hits], minlength=len(right)).cpu()
                    seen += torch.bincount(cell_types, minlength=len(seen)).cpu()
        self.pending_eval = False
        row = {"step": self.global_step, "epoch": self.epoch,
               "val_loss": loss_sum / max(total, 1), "val_acc": correct / max(total, 1)}
        # Per cell type too (val_acc_HUVEC, ...): batch effects differ between them.
        row.update({f"val_acc_{name}": (r / n).item()
                    for name, r, n in zip(self.cell_types, right, seen) if n})
        self.history.append(row)
        return row
