"""Programs that tests/test_budget.py runs as real subprocesses (they import no torch: fast).

    python helpers_budget.py stop STEP_SECONDS
        Loops over "steps" of STEP_SECONDS under a StopRequest; stops after the step in which
        a signal arrived, printing "stopped after step N", and exits 0.
    python helpers_budget.py budget DURATION MARGIN SEED
        A stage in miniature: steps of random length (0.02-0.25 s) while one more step plus
        the final save fits, then a 0.3 s "save"; prints a JSON report on its last line.
"""
import json
import random
import sys
import time

from rcic.budget import Budget, DurationEstimator, StopRequest, parse_duration


def stop_loop(step_seconds):
    with StopRequest() as stop:
        print("ready", flush=True)
        step = 0
        while not stop.requested:
            step += 1
            print(f"step {step} start", flush=True)
            time.sleep(step_seconds)  # a signal does not cut this short (PEP 475)
            print(f"step {step} end", flush=True)
        print(f"stopped after step {step}", flush=True)


def budget_loop(duration, margin, seed):
    budget = Budget(parse_duration(duration), margin=margin)
    rng = random.Random(seed)
    estimator = DurationEstimator(warmup=2)
    estimator.seed("save", 0.5)
    steps = 0
    while budget.fits(estimator.estimate("step", default=0.3) + estimator.estimate("save")):
        with estimator.timer("step"):
            time.sleep(rng.uniform(0.02, 0.25))
        steps += 1
    with estimator.timer("save"):
        time.sleep(0.3)
    print(json.dumps({"steps": steps, "elapsed": budget.elapsed(), "start": budget.start}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "stop":
        stop_loop(float(sys.argv[2]))
    else:
        budget_loop(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
