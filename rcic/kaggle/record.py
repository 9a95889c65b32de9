"""DIR/pushes.json: what the driver sent to Kaggle, so that a driver that died can resume.

Each push is written down twice, both times before anything waits on it:

    1. its intent: the kernel and the version Kaggle had before (`before`), then the push;
    2. the version Kaggle answered with (`version`, `pushed_at`).

A driver killed between the two finds an intent without a version and asks Kaggle for the
kernel's current version: newer than `before` means the push landed, else it never did. So no
moment of death makes a kernel run twice or not at all.

    {"kernels": {"stage-01": [attempt, ...], ...},      # every push of that kernel folder
     "submission": {...},                               # see rcic.kaggle.submit
     "images": {"gpu": image, "cpu": image}}            # see rcic.kaggle.driver

An attempt: {"kernel", "before", "intent_at", "version", "pushed_at", "running_at",
"finished_at", "state", "message"}; the last one is the kernel's current run. Times are Unix
seconds. Every save replaces the file atomically, so a kill never leaves half of it.
"""
import json
import time
from pathlib import Path

from rcic.atomic import write_atomic
from rcic.errors import UserError

RECORD_FILE = "pushes.json"


class Record:
    def __init__(self, chain_dir):
        self.path = Path(chain_dir) / RECORD_FILE
        self.data = {"kernels": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise UserError(f"cannot read {self.path} ({err}): it records what was pushed; "
                                f"restore it, or delete it and rerun with --from the first "
                                f"kernel that has not completed") from None

    def save(self):
        try:
            write_atomic(self.path, json.dumps(self.data, indent=1) + "\n")
        except OSError as err:
            # The previous record is intact (atomic replace), and it ends in an intent at
            # worst, which the next run settles by asking Kaggle.
            raise UserError(f"cannot write {self.path} ({err.strerror}): free some space or "
                            f"make the folder writable, then run the same command again") from None

    def attempts(self, name):
        return self.data["kernels"].get(name, [])

    def current(self, name):
        """The kernel folder's latest push (a dict), or None when it has none to continue."""
        attempts = self.attempts(name)
        return attempts[-1] if attempts and not attempts[-1].get("forgotten") else None

    def intend(self, name, kernel, before):
        """Write down a push about to be sent; `before` is Kaggle's version of it now."""
        attempt = {"kernel": kernel, "before": before, "intent_at": time.time(),
                   "version": None, "pushed_at": None, "running_at": None,
                   "finished_at": None, "state": None, "message": ""}
        self.data["kernels"].setdefault(name, []).append(attempt)
        self.save()
        return attempt

    def update(self, attempt, **fields):
        attempt.update(fields)
        self.save()

    def drop(self, name):
        """Forget the latest attempt: an intent whose push never reached Kaggle."""
        self.data["kernels"][name].pop()
        self.save()

    def forget(self, name):
        """Keep the kernel's history (it cost GPU time) but start it anew: `push --from`."""
        attempts = self.attempts(name)
        if attempts:
            attempts[-1]["forgotten"] = True
            self.save()
