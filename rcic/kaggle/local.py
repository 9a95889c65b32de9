"""`rcic-chain local`: run a whole chain on this machine, the way Kaggle runs it.

For every kernel of a freshly rendered chain, in order:
- a fresh input folder holding only the kernel's declared inputs, laid out as Kaggle's newer
  /kaggle/input is (datasets/<owner>/<slug>, competitions/<slug>, notebooks/<owner>/<slug>):
  the bundle and the data are linked, the previous kernel's output is copied with its files
  made read-only (as /kaggle/input is);
- a fresh, empty working folder;
- the rendered kernel script itself, in its own process, killed from outside with SIGKILL
  once its limit has passed (the stage budget plus a small grace), as Kaggle kills a session
  with no warning.
One difference, on purpose: kernels run with this Python and the rcic it already has
(RCIC_SKIP_INSTALL=1) instead of pip-installing the bundle into a fresh environment per
kernel. The offline install itself is tested on its own (tests/test_bundle_install.py).
"""
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rcic.errors import UserError, refuse_nonempty
from rcic.kaggle import chain, metadata
from rcic.kaggle.bundle import build_bundle

LOCAL_OWNER = "local"
LOCAL_PREFIX = "rcic-local"


def source_folder():
    """The rcic source checkout this package runs from, or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() else None


def link_inputs(meta, input_root, bundle, data, outputs):
    """Make `input_root` hold the kernel's declared sources and nothing else."""
    for ref in meta["dataset_sources"]:
        owner, slug = ref.split("/")
        if bundle is not None:
            dest = input_root / "datasets" / owner / slug
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(bundle.resolve(), target_is_directory=True)
    for slug in meta["competition_sources"]:
        dest = input_root / "competitions" / slug
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(Path(data).resolve(), target_is_directory=True)
    for ref in meta["kernel_sources"]:
        owner, slug = ref.split("/")
        dest = input_root / "notebooks" / owner / slug
        shutil.copytree(outputs[ref], dest)
        for path in dest.rglob("*"):
            if path.is_file():
                path.chmod(0o444)


def run_script(script, input_root, working, limit_seconds, log_path, echo):
    """Run a kernel script in its own process group; returns (exit status, seconds, killed)."""
    env = dict(os.environ, RCIC_KAGGLE_INPUT=str(input_root), RCIC_KAGGLE_WORKING=str(working),
               RCIC_SKIP_INSTALL="1", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=working, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def copy_output():
            # newline="": keep tqdm's carriage-return updates on one line, as a terminal shows.
            for line in io.TextIOWrapper(proc.stdout, newline="", errors="replace"):
                log.write(line)
                echo(line.rstrip("\n"))

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=limit_seconds)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # no warning, like Kaggle at its limit
            proc.wait()
            killed = True
        reader.join()
    return proc.returncode, time.monotonic() - start, killed


def run_local_chain(stages, budget, out, recipe=None, data=None, steps_per_stage=0,
                    grace_seconds=15.0, echo=print):
    """Render and run a chain of `stages` stages and a submission kernel under `out`.

    Returns {"kernels": [{"name", "seconds", "status"}], "submission": path}.
    """
    from rcic.budget import parse_duration
    from rcic.data.layout import RxRx1
    from rcic.data.synthetic import default_data_dir
    from rcic.submission import check_submission

    out = Path(out).absolute()   # kernels run with their working folder as cwd
    refuse_nonempty(out)
    data = Path(data) if data else default_data_dir()
    RxRx1(data)   # a broken data folder is one clear line now, not a failed first kernel
    spec = chain.ChainSpec(owner=LOCAL_OWNER, prefix=LOCAL_PREFIX, stages=stages, budget=budget,
                           recipe=Path(recipe) if recipe else None,
                           steps_per_stage=steps_per_stage)
    folders = chain.render_chain(spec, out / "kernels")
    stage_limit = parse_duration(budget) + grace_seconds

    bundle = None
    if source_folder() is not None:
        bundle = out / "bundle"
        build_bundle(bundle, LOCAL_OWNER, source_folder())
        echo(f"rcic-chain local: bundle built in {bundle}")
    else:
        echo("rcic-chain local: no rcic source folder here, so the inputs hold no bundle "
             "(kernels use the installed rcic either way)")

    outputs, results = {}, []
    for folder in folders:
        meta = metadata.check_kernel_folder(folder)
        run_dir = out / "runs" / folder.name
        input_root, working = run_dir / "input", run_dir / "working"
        input_root.mkdir(parents=True)
        working.mkdir()
        link_inputs(meta, input_root, bundle, data, outputs)
        limit = stage_limit if folder.name != "submit" else chain.KAGGLE_LIMIT_SECONDS
        echo(f"rcic-chain local: {folder.name} ({meta['id']}), hard limit {limit:.0f}s")
        status, seconds, killed = run_script(folder / meta["code_file"], input_root, working,
                                             limit, run_dir / "kernel.log", echo)
        results.append({"name": folder.name, "seconds": round(seconds, 1), "status": status})
        if killed:
            raise UserError(f"{folder.name} ran past its limit ({limit:.0f}s) and was killed, "
                            f"as Kaggle would kill it; its log: {run_dir / 'kernel.log'}")
        if status != 0:
            raise UserError(f"{folder.name} ended in ERROR (exit status {status}); its log: "
                            f"{run_dir / 'kernel.log'}")
        outputs[meta["id"]] = working
        echo(f"rcic-chain local: {folder.name} complete in {seconds:.1f}s")

    submission = out / "runs" / "submit" / "working" / "submission.csv"
    rows = check_submission(submission, data)
    shutil.copy(submission, out / "submission.csv")
    echo(f"rcic-chain local: {out / 'submission.csv'} is a valid submission ({rows} rows)")
    return {"kernels": results, "submission": out / "submission.csv"}
