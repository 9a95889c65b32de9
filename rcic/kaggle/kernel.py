"""What a rendered kernel does once rcic is installed: find its inputs, run, summarise.

Inputs are found by searching the input root, never by a hard-coded path: Kaggle has mounted
attached data at /kaggle/input/<slug>/ and at /kaggle/input/{competitions,datasets,notebooks}/...
The search (rcic/search.py) never enters the competition folder, whose image tree holds
hundreds of thousands of files.
"""
import json
import tempfile
from pathlib import Path

from rcic import search
from rcic.errors import UserError, cli_main


def shallowest_first(paths):
    return sorted(paths, key=lambda path: (len(path.parts), str(path)))


def find_shallow(root, name):
    """Files called `name` under `root`, shallowest first, outside any RxRx1 data folder.
    Symlinked folders are followed: the local dry run links its inputs."""
    return shallowest_first(folder / name for folder, files in search.walk(root) if name in files)


def find_data_dir(root):
    """The competition data folder under `root`: the shallowest holding train.csv and test.csv."""
    found = shallowest_first(folder for folder, files in search.walk(root)
                             if search.is_data_folder(files))
    if found:
        return found[0]
    raise UserError(f"no RxRx1 data (train.csv and test.csv) under {root}: attach the "
                    f"competition to the kernel (competition_sources in kernel-metadata.json)")


def run_kernel(settings, input_root, working):
    """Entry point of both kernel scripts; returns the exit status."""
    run = run_stage if settings["kind"] == "stage" else run_submit
    return cli_main(f"rcic {settings['kind']} kernel",
                    lambda _: run(settings, Path(input_root), Path(working)))


def gpu_count():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_stage(settings, input_root, working):
    from rcic.budget import Budget, parse_duration
    from rcic.config import load_recipe
    from rcic.data.layout import RxRx1
    from rcic.stage import launch_distributed, run_stage as train_stage

    budget = Budget(parse_duration(settings["budget"]))
    data = find_data_dir(input_root)
    # Resume from the attached outputs of earlier stages (each holds a stage.json), not from all
    # of the input: walking the competition's image tree would list ~500,000 files.
    previous = [str(report.parent) for report in find_shallow(input_root, "stage.json")]
    recipe_file = None
    if settings.get("recipe_yaml"):
        # The recipe travels inside the script (Kaggle uploads nothing else); the stage writes
        # it beside its checkpoint, so it is kept with the outputs either way.
        recipe_file = Path(tempfile.mkdtemp(prefix="rcic-recipe-")) / settings["recipe_file"]
        recipe_file.write_text(settings["recipe_yaml"])
    recipe = load_recipe(recipe_file)
    steps = settings.get("steps") or 0
    print(f"rcic stage {settings['stage']}/{settings['stages']}: data {data}, "
          f"budget {settings['budget']}, earlier stages: {', '.join(previous) or 'none'}",
          flush=True)
    gpus = gpu_count()
    if gpus > 1:   # NvidiaTeslaT4 machines have two: one DDP process per GPU, on this clock
        argv = ["--data", str(data), "--out", str(working), "--budget", settings["budget"],
                "--steps", str(steps), "--resume-from", *previous]
        status = launch_distributed(gpus, argv + (["--config", str(recipe_file)]
                                                  if recipe_file else []), budget.start)
    else:
        train_stage(recipe, RxRx1(data), working, budget, previous, steps)
        status = 0
    report = working / "stage.json"
    if report.is_file():
        r = json.loads(report.read_text())
        speed = r.get("samples_per_second")
        print(f"rcic stage {settings['stage']}/{settings['stages']}: "
              f"{'recipe finished' if r.get('done') else 'recipe not finished'}, "
              f"step {r.get('global_step')}, epoch {r.get('epoch')}, "
              f"{r.get('seconds_used', 0):.0f}s of {r.get('budget_seconds', 0):.0f}s used"
              + (f", {speed:.1f} samples/s" if speed else ", no training this stage")
              + (f", about {r['stages_left_estimate']} more stage(s) needed"
                 if not r.get("done") and r.get("stages_left_estimate") is not None else ""),
              flush=True)
    return status


def run_submit(settings, input_root, working):
    from rcic.logs import setup_logging
    from rcic.predict import describe, run_prediction
    from rcic.weights import WEIGHTS_NAME

    data = find_data_dir(input_root)
    weights = find_shallow(input_root, WEIGHTS_NAME)
    if not weights:
        raise UserError(f"no {WEIGHTS_NAME} under {input_root}: attach the chain's last stage "
                        f"kernel (kernel_sources) and check that it ended with a checkpoint")
    for report in find_shallow(input_root, "stage.json"):
        if not json.loads(report.read_text()).get("done"):
            print(f"rcic submit kernel: warning: {report} says the recipe is not finished; "
                  f"predicting with the weights trained so far", flush=True)
    out = working / "submission.csv"
    print(f"rcic submit kernel: data {data}, weights {', '.join(map(str, weights))}", flush=True)
    setup_logging()
    report = run_prediction(data, out, weights)
    print(*(f"rcic submit kernel: {line}" for line in describe(report)), sep="\n", flush=True)
    return 0
