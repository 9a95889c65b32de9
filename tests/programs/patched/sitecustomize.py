"""Stand-ins and mutations for tests, put into every Python process of a test's command.

A test puts this folder on PYTHONPATH and names the patches in RCIC_TEST_PATCHES, e.g.
`slow-micro-batches=5,slow-validation-batches=1`; every interpreter of the command (the
supervisor, the worker, each torchrun rank, loader workers) applies them to rcic's own modules
as they are imported (no module is imported early: the supervisor still never loads torch).

Stand-ins (a test needs a unit of work slower than its budget on any machine, however fast):
  slow-micro-batches=S        every training micro-batch takes S seconds more
  slow-validation-batches=S   every validation batch takes S seconds more
  slow-checkpoint-writes=S    every checkpoint's state file is written S seconds late, inside
                              its temporary folder (a save long enough to be caught in the act)
Mutations (tools/mutation_check.py: the tests must catch them):
  budget-always-fits          Budget.fits says yes to everything: only the supervisor's kill
                              stops a stage
"""
import importlib.abc
import importlib.machinery
import os
import sys
import time


def slow_micro_batches(train, seconds):
    accumulate = train.Trainer.accumulate

    def slow_accumulate(self, batch):
        time.sleep(seconds)
        return accumulate(self, batch)
    train.Trainer.accumulate = slow_accumulate


def slow_validation_batches(train, seconds):
    val_batches = train.Trainer._val_batches

    def slow_val_batches(self, rows, stop=None):
        for batch in val_batches(self, rows, stop):
            time.sleep(seconds)
            yield batch
    train.Trainer._val_batches = slow_val_batches


def slow_checkpoint_writes(checkpoint, seconds):
    write_state = checkpoint._write_state

    def slow_write_state(path, state):
        time.sleep(seconds)
        return write_state(path, state)
    checkpoint._write_state = slow_write_state


def budget_always_fits(budget, _):
    budget.Budget.fits = lambda self, seconds_needed: True


# patch name -> (the module it changes, the change)
PATCHES = {
    "slow-micro-batches": ("rcic.train", slow_micro_batches),
    "slow-validation-batches": ("rcic.train", slow_validation_batches),
    "slow-checkpoint-writes": ("rcic.checkpoint", slow_checkpoint_writes),
    "budget-always-fits": ("rcic.budget", budget_always_fits),
}


def requested():
    """{module: [(change, value)]} from RCIC_TEST_PATCHES."""
    wanted = {}
    for item in filter(None, os.environ.get("RCIC_TEST_PATCHES", "").split(",")):
        name, _, value = item.partition("=")
        module, change = PATCHES[name.strip()]
        wanted.setdefault(module, []).append((change, float(value) if value else None))
    return wanted


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds a patched module as Python would, and applies the changes once it has run."""

    def __init__(self, wanted):
        self.wanted = wanted

    def find_spec(self, name, path, target=None):
        if name not in self.wanted:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for change, value in self.wanted[name]:
                change(module, value)
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("RCIC_TEST_PATCHES"):
    sys.meta_path.insert(0, PatchAfterImport(requested()))
