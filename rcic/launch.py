"""The one way to start a stage: the supervisor, torchrun where there is more than one process,
then the worker.

    launch_stage(...)                                   this process: the supervisor
      python -m rcic.cli.stage_worker REQUEST           one process: the worker
      python -m torch.distributed.run ... -m rcic.cli.stage_worker REQUEST
                                                        more: torchrun, one worker a rank

rcic-stage, the Kaggle stage kernel and `run_stage` (Python) all call `launch_stage`. The
supervisor (rcic/deadline.py) never imports torch; it ends the worker's whole process tree at
the deadline whatever it is doing. The worker (rcic/cli/stage_worker.py, then rcic/stage.py)
trains and stops on its own before then whenever it can.

What the worker is asked to do travels as a `StageRequest`, a JSON file beside the recipe's
YAML (written exactly as given, overrides included) in a temporary folder that lives as long as
the supervisor. Every rank reads the same request: the same recipe, data, budget and clock.
"""
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rcic import deadline, stage_report
from rcic.config import check_process_count, save_recipe
from rcic.errors import UserError


@dataclass
class StageRequest:
    """What a stage's worker does; the same in every rank."""
    recipe_file: str            # the recipe, as YAML
    data: str | None            # the RxRx1 folder; None: the embedded synthetic data
    out: str                    # the output folder
    budget_seconds: float
    start: float                # epoch seconds the budget counts from: the supervisor's start
    max_steps: int = 0          # stop after that many optimizer steps (0: no limit)
    resume_roots: list = field(default_factory=list)
    quiet: bool = False
    events: str | None = None   # the FIFO the worker reports to (its supervisor's)

    def save(self, path):
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path):
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class Processes:
    """How many workers a stage runs, and where: `gpus` on each of `nnodes` machines.

    On one machine torchrun runs standalone. On several, every machine runs rcic-stage with the
    same `nnodes` and `rdzv_endpoint` (HOST:PORT of machine 0, which hosts the rendezvous) and
    its own `node_rank`; torchrun's static rendezvous joins them, and global rank 0 (on machine
    0) writes the checkpoint. Each machine's supervisor holds the deadline of its own tree."""
    gpus: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""

    @property
    def total(self):
        return self.gpus * self.nnodes

    def check(self):
        if self.gpus < 1 or self.nnodes < 1:
            raise UserError(f"--gpus {self.gpus} --nnodes {self.nnodes}: both must be 1 or more")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (machine 0's "
                            f"address and a free port), the same on every machine")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is not one of 0..{self.nnodes - 1} "
                            f"(--nnodes {self.nnodes})")

    def command(self, request_file):
        """The worker's command line: itself, or torchrun over `gpus` of it on each machine."""
        worker = ["-m", "rcic.cli.stage_worker", str(request_file)]
        if self.total == 1:
            return [sys.executable, *worker]
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.gpus}"]
        if self.nnodes == 1:
            return [*torchrun, "--standalone", *worker]
        return [*torchrun, f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
                "--rdzv-backend=static", f"--rdzv-endpoint={self.rdzv_endpoint}", *worker]


def check_writable(out):
    """Fail before any work if the output folder cannot take files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".rcic-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output folder {out} is not writable ({err.strerror}): pass a writable --out")


def launch_stage(recipe, data_root, out, budget, resume_roots, max_steps=0, quiet=False,
                 processes=None):
    """Run one stage of `recipe` on the RxRx1 folder `data_root` (None: the embedded data) into
    `out`, supervised, on the clock of `budget` (a rcic.budget.Budget); returns the exit status
    (0: trained or stopped in time with a committed checkpoint; 2: said why in one line)."""
    out = Path(out)
    processes = processes or Processes()
    processes.check()
    check_process_count(recipe, processes.total)
    check_writable(out)
    folder = Path(tempfile.mkdtemp(prefix="rcic-stage-request-"))
    try:
        save_recipe(recipe, folder / "recipe.yaml")
        request = StageRequest(
            recipe_file=str(folder / "recipe.yaml"),
            data=None if data_root is None else str(data_root), out=str(out),
            budget_seconds=budget.seconds, start=budget.start, max_steps=max_steps,
            resume_roots=[str(root) for root in resume_roots], quiet=quiet)

        def command(events):
            request.events = str(events)
            request.save(folder / "request.json")
            return processes.command(folder / "request.json")

        # The worker's own output (its summary line, its one-line errors) goes to ours.
        return deadline.supervise(command, budget, out, recipe.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_stage(recipe, data_root, out, budget, resume_roots, max_steps=0, quiet=False, gpus=1):
    """Train one stage from Python, as rcic-stage does; returns its report (stage.json).
    `budget`: a rcic.budget.Budget, by default counted from this process's start. A stage that
    failed has said why on stderr: SystemExit with its status."""
    status = launch_stage(recipe, data_root, out, budget, resume_roots, max_steps, quiet,
                          Processes(gpus))
    if status:
        raise SystemExit(status)
    return stage_report.read(out)
