"""A program that tests/test_budget.py runs as real processes (it imports no torch: fast).

    python budget_loops.py stop STEP_SECONDS
        Loops over "steps" of STEP_SECONDS under a StopRequest. When it sees a stop requested
        (between two short sleeps of a step) it prints "stop seen in step N" once, so a test
        knows the first signal has been taken before it sends a second; it stops after that
        step, printing "stopped after step N", and exits 0.
    python budget_loops.py budget DURATION MARGIN SEED
        A stage in miniature: steps of random length (0.02-0.25 s) while one more step plus
        the final save fits, then a 0.3 s "save"; prints a JSON report on its last line (with
        when it decided to stop and the seconds it then needed for a step and the save).
"""
import json
import random
import sys
import time

from rcic.budget import Budget, DurationEstimator, StopRequest, parse_duration


def stop_loop(step_seconds):
    with StopRequest() as stop:
        print("ready", flush=True)
        step, seen = 0, False
        while not stop.requested:
            step += 1
            print(f"step {step} start", flush=True)
            ends = time.monotonic() + step_seconds
            while time.monotonic() < ends:
                time.sleep(0.01)
                if stop.requested and not seen:
                    seen = True
                    print(f"stop seen in step {step}", flush=True)
            print(f"step {step} end", flush=True)
        print(f"stopped after step {step}", flush=True)


def budget_loop(duration, margin, seed):
    budget = Budget(parse_duration(duration), margin=margin)
    rng = random.Random(seed)
    estimator = DurationEstimator(warmup=2)
    estimator.seed("save", 0.5)
    steps = 0
    while True:
        needed = estimator.estimate("step", default=0.3) + estimator.estimate("save")
        stopped_at = budget.elapsed()
        if not budget.fits(needed):
            break
        with estimator.timer("step"):
            time.sleep(rng.uniform(0.02, 0.25))
        steps += 1
    with estimator.timer("save"):
        time.sleep(0.3)
    print(json.dumps({"steps": steps, "elapsed": budget.elapsed(), "start": budget.start,
                      "stopped_at": stopped_at, "needed": needed}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "stop":
        stop_loop(float(sys.argv[2]))
    else:
        budget_loop(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
