"""What a rendered kernel does once rcic is installed: find its inputs, run, summarise.

Inputs are found by searching the input root, never by a hard-coded path: Kaggle has mounted
attached data at /kaggle/input/<slug>/ and at /kaggle/input/{competitions,datasets,notebooks}/...
The search (rcic/search.py) never enters the competition folder, whose image tree holds
hundreds of thousands of files.
"""
import json
import tempfile
import time
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
    """Entry point of the kernel scripts; returns the exit status."""
    run = {"stage": run_stage, "submit": run_submit, "cache": run_cache}[settings["kind"]]
    return cli_main(f"rcic {settings['kind']} kernel",
                    lambda _: run(settings, Path(input_root), Path(working)))


def gpu_count():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_stage(settings, input_root, working):
    from rcic import stage_report
    from rcic.budget import Budget, parse_duration
    from rcic.config import load_recipe
    from rcic.launch import Processes, launch_stage
    from rcic.report import after_stage

    # The kernel's budget counts from this process's start: Kaggle's clock started before it.
    budget = Budget(parse_duration(settings["budget"]))
    data = find_data_dir(input_root)
    # Resume from the attached outputs of earlier stages (each holds a stage.json), not from all
    # of the input: walking the competition's image tree would list ~500,000 files.
    previous = [str(report.parent) for report in find_shallow(input_root, stage_report.REPORT_NAME)]
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
    cache = local_cache(settings, input_root, data, f"rcic stage {settings['stage']}")
    if cache:   # data.cache is not a training field: the recipe hash, hence resume, holds
        recipe.data.cache = str(cache[0])
    # NvidiaTeslaT4 machines have two GPUs: one DDP process on each.
    status = launch_stage(recipe, data, working, budget, previous, steps,
                          processes=Processes(gpus=max(1, gpu_count())))
    r = stage_report.read(working)
    if r is not None:
        if cache:   # the expand's time is the stage's too: its report says so
            stage_report.amend(working, {"cache": cache[1]})
        speed = r.get("samples_per_second")
        print(f"rcic stage {settings['stage']}/{settings['stages']}: "
              f"{'recipe finished' if r.get('done') else 'recipe not finished'}, "
              f"step {r.get('global_step')}, epoch {r.get('epoch')}, "
              f"{r.get('seconds_used', 0):.0f}s of {r.get('budget_seconds', 0):.0f}s used"
              + (f" ({cache[1]['seconds']:.0f}s of them expanding the cache)" if cache else "")
              + (f", {speed:.1f} samples/s" if speed else ", no training this stage")
              + (f", about {r['stages_left_estimate']} more stage(s) needed"
                 if not r.get("done") and r.get("stages_left_estimate") is not None else ""),
              flush=True)
    after_stage(settings, previous, working, budget)
    return status


def run_submit(settings, input_root, working):
    from rcic.logs import setup_logging
    from rcic.predict import describe, run_prediction
    from rcic.report import after_submit
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
    cache = local_cache(settings, input_root, data, "rcic submit kernel")
    print(f"rcic submit kernel: data {data}, weights {', '.join(map(str, weights))}", flush=True)
    setup_logging()
    report = run_prediction(data, out, weights, cache=str(cache[0]) if cache else "")
    print(*(f"rcic submit kernel: {line}" for line in describe(report)), sep="\n", flush=True)
    after_submit(weights[0].parent, working, report)   # the last stage's output
    return 0


def local_cache(settings, input_root, data, who):
    """(folder, report) of the attached caches expanded onto local disk, or None without."""
    if not settings.get("cache"):
        return None
    from rcic.data.cache import MANIFEST
    from rcic.data.layout import RxRx1
    from rcic.kaggle.scratch import expand_attached

    return expand_attached(find_shallow(input_root, MANIFEST), RxRx1(data, check_images=False),
                           settings["cache"], who, echo=lambda line: print(line, flush=True))


def run_cache(settings, input_root, working):
    """Decode one split of the attached competition data into a cache in the working folder."""
    from rcic.data.cache import build_cache
    from rcic.data.layout import RxRx1
    from rcic.kaggle.limits import KAGGLE_OUTPUT_LIMIT, folder_bytes, human_bytes

    data = find_data_dir(input_root)
    split, size, fmt = settings["split"], settings["size"], settings["format"]
    out = working / f"cache-{split}-{size}px"
    print(f"rcic cache kernel: {split} sites of {data} at {size} px ({fmt}) into {out}",
          flush=True)
    started = time.monotonic()
    build_cache(RxRx1(data), out, size, format=fmt, split=split)
    size_bytes = folder_bytes(out)
    print(f"rcic cache kernel: {human_bytes(size_bytes)} in {time.monotonic() - started:.0f}s",
          flush=True)
    if size_bytes > KAGGLE_OUTPUT_LIMIT:
        raise UserError(f"the {split} cache at {size} px is {human_bytes(size_bytes)}, over "
                        f"Kaggle's {human_bytes(KAGGLE_OUTPUT_LIMIT)} output limit, so Kaggle "
                        f"will drop it: render the chain with a smaller --cache")
    return 0
