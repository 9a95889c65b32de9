"""The worker of a stage: what rcic-stage's supervisor starts, once or in each torchrun rank.

    python -m rcic.cli.stage_worker REQUEST.json

Not a command for people: rcic-stage (rcic/launch.py) writes the request and supervises this
process. It opens the data, trains (rcic/stage.py), prints the stage's summary line (rank 0)
and tells its supervisor it has ended; errors are one line and exit 2, as in every command.
"""
import json
import logging
import os
import sys

from rcic import stage_report
from rcic.budget import stage_budget
from rcic.cli.common import open_data
from rcic.config import load_recipe
from rcic.deadline import Reporter
from rcic.errors import cli_main
from rcic.launch import StageRequest


def work(recipe, data_root, out, budget, resume_roots, max_steps=0, quiet=False, reporter=None):
    """Train one stage in this process (a rank of it under torchrun); returns 0. Bad input and a
    budget too short for any work raise UserError."""
    data = open_data(data_root)
    from rcic.stage import train_stage   # torch loads only once the data is checked
    report = train_stage(recipe, data, out, budget, resume_roots, max_steps, quiet, reporter)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: report[k] for k in stage_report.SUMMARY_KEYS}), flush=True)
    return 0


def run(request, reporter):
    recipe = load_recipe(request.recipe_file)
    world = int(os.environ.get("WORLD_SIZE", "1"))      # torchrun's, in every rank
    return work(recipe, request.data, request.out,
                stage_budget(request.budget_seconds, request.start, world), request.resume_roots,
                request.max_steps, request.quiet, reporter)


def main(argv=None):
    """Run the request, then end the process at once (see below); never returns."""
    request = StageRequest.load((argv or sys.argv[1:])[0])
    reporter = Reporter(request.events)
    status = cli_main("rcic-stage", lambda _: run(request, reporter), [])
    # A torch interpreter's own exit, freeing every module, takes seconds on a busy machine and
    # the budget counts it: skip it, once everything is written (and the loader workers joined),
    # and tell the supervisor the stage has ended.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    reporter.tell("exit", {"returncode": status})
    os._exit(status)


if __name__ == "__main__":
    main()
