"""`rcic-chain local`: run a whole chain on this machine, the way Kaggle runs it.

For every kernel of a freshly rendered chain, in order:
- a fresh input folder holding only the kernel's declared inputs, laid out as Kaggle's newer
  /kaggle/input is (datasets/<owner>/<slug>, competitions/<slug>, notebooks/<owner>/<slug>):
  the bundle and the data are linked, the outputs of the kernels it lists (the previous
  stage, the caches) are copied with their files made read-only (as /kaggle/input is);
- a fresh, empty working folder;
- a scratch folder outside the working folder (RCIC_SCRATCH), as a kernel's local disk;
- the rendered kernel script itself, in its own process, killed from outside with SIGKILL
  once its limit has passed (the stage budget plus a small grace), as Kaggle kills a session
  with no warning; with the network taken away when its metadata says the internet is off;
- after it, the output cap: a working folder over the limit fails the run, as Kaggle would
  drop that output (limits.py).
One difference, on purpose: kernels run with this Python and the rcic it already has
(RCIC_SKIP_INSTALL=1) instead of pip-installing the bundle into a fresh environment per
kernel. The offline install itself is tested on its own (tests/test_bundle_install.py).
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rcic.errors import UserError, refuse_nonempty
from rcic.kaggle import chain, limits, metadata, session
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


def run_script(script, input_root, working, limit_seconds, log_path, echo, prefix=(),
               scratch=None):
    """Run a kernel script in its own process group; returns (exit status, seconds, killed).
    `prefix`: a command the script runs under (e.g. limits.offline_prefix())."""
    env = dict(os.environ, RCIC_KAGGLE_INPUT=str(input_root), RCIC_KAGGLE_WORKING=str(working),
               RCIC_SKIP_INSTALL="1", PYTHONUNBUFFERED="1")
    if scratch is not None:
        env["RCIC_SCRATCH"] = str(scratch)
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*prefix, sys.executable, str(script)], cwd=working, env=env,
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


# What Python prints when a connection fails for want of a network.
NO_NETWORK = ("Network is unreachable", "Temporary failure in name resolution",
              "Name or service not known", "No address associated with hostname")


def failure(name, status, log_path, offline):
    """The one line for a kernel that ended in error; names a network use with the internet off
    when that is what ended it: the error on the last line of its log (a library that merely
    warned it could not check for updates, earlier, is not the cause)."""
    line = f"{name} ended in ERROR (exit status {status}); its log: {log_path}"
    last = (log_path.read_text(errors="replace").strip().splitlines() or [""])[-1]
    if offline and any(text in last for text in NO_NETWORK):
        line = (f"{name} tried to use the network, but its internet is off (as on Kaggle, "
                f"where it would fail the same way): bundle what it downloads; {line}")
    return line


def run_chain(folders, runs, data, bundle, stage_limit, output_limit=limits.KAGGLE_OUTPUT_LIMIT,
              echo=print):
    """Run rendered kernel folders in order under `runs`, each as Kaggle would (see above).

    Returns one {"name", "seconds", "status", "output_bytes", "working"} per kernel.
    """
    offline, why_not = limits.offline_prefix()
    if why_not:
        echo(f"rcic-chain local: notice: {why_not}: kernels with the internet off run with the "
             f"network here")
    outputs, results = {}, []
    for folder in folders:
        meta = metadata.check_kernel_folder(folder)
        run_dir = runs / folder.name
        input_root, working, scratch = run_dir / "input", run_dir / "working", run_dir / "scratch"
        input_root.mkdir(parents=True)
        working.mkdir()
        scratch.mkdir()
        link_inputs(meta, input_root, bundle, data, outputs)
        limit = (stage_limit if chain.is_stage(folder)
                 else session.session_limit(meta.get("machine_shape"))[0])
        cut_off = offline if not meta["enable_internet"] and offline else ()
        echo(f"rcic-chain local: {folder.name} ({meta['id']}), hard limit {limit:.0f}s"
             + (", no network" if cut_off else ""))
        log_path = run_dir / "kernel.log"
        status, seconds, killed = run_script(folder / meta["code_file"], input_root, working,
                                             limit, log_path, echo, cut_off, scratch)
        if killed:
            raise UserError(f"{folder.name} ran past its limit ({limit:.0f}s) and was killed, "
                            f"as Kaggle would kill it; its log: {log_path}")
        if status != 0:
            raise UserError(failure(folder.name, status, log_path, bool(cut_off)))
        size = limits.check_output(folder.name, working, output_limit, log_path)
        shutil.rmtree(scratch)     # a kernel's local disk does not outlive it
        results.append({"name": folder.name, "seconds": round(seconds, 1), "status": status,
                        "output_bytes": size, "working": working})
        outputs[meta["id"]] = working
        echo(f"rcic-chain local: {folder.name} complete in {seconds:.1f}s "
             f"({limits.human_bytes(size)} of output)")
    return results


def run_local_chain(stages, budget, out, recipe=None, data=None, steps_per_stage=0,
                    cache_size=0, grace_seconds=15.0, output_limit=limits.KAGGLE_OUTPUT_LIMIT,
                    echo=print):
    """Render and run a chain of `stages` stages and a submission kernel under `out`.

    Returns {"kernels": [{"name", "seconds", "status", ...}], "submission": path, "table":
    lines, "report": the path of the chain's report.html}.
    """
    from rcic.budget import parse_duration
    from rcic.data.layout import RxRx1
    from rcic.data.synthetic import default_data_dir
    from rcic.report import report_folders
    from rcic.submission import check_submission

    out = Path(out).absolute()   # kernels run with their working folder as cwd
    refuse_nonempty(out)
    data = Path(data) if data else default_data_dir()
    RxRx1(data)   # a broken data folder is one clear line now, not a failed first kernel
    spec = chain.ChainSpec(owner=LOCAL_OWNER, prefix=LOCAL_PREFIX, stages=stages, budget=budget,
                           recipe=Path(recipe) if recipe else None,
                           steps_per_stage=steps_per_stage, cache_size=cache_size)
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

    results = run_chain(folders, out / "runs", data, bundle, stage_limit, output_limit, echo)
    submission = out / "runs" / "submit" / "working" / "submission.csv"
    rows = check_submission(submission, data)
    shutil.copy(submission, out / "submission.csv")
    echo(f"rcic-chain local: {out / 'submission.csv'} is a valid submission ({rows} rows)")
    report = report_folders([out], out / "report")
    echo(f"rcic-chain local: the chain's report: {report}")
    return {"kernels": results, "submission": out / "submission.csv",
            "table": summary_table(results), "report": report}


def summary_table(results):
    """What each kernel did, as lines: per stage the steps it trained, the step the recipe
    reached, the budget it used and its validation accuracy; then the submission's accuracy
    (on data with an answer key, such as the embedded data)."""
    from rcic.predict import REPORT_NAME

    lines = [f"{'kernel':12s} {'steps trained':>13s} {'reached':>11s} {'budget used':>15s} "
             f"{'val acc':>7s} {'seconds':>8s}"]
    for k in results:
        report = k["working"] / "stage.json"
        if report.is_file():
            r = json.loads(report.read_text())
            val = (r.get("last_eval") or {}).get("val_acc")
            lines.append(f"{k['name']:12s} {r['steps_this_stage']:13d} "
                         f"{r['global_step']:>5d}/{r['total_steps']:<5d} "
                         f"{r['seconds_used']:6.0f}s of {r['budget_seconds']:4.0f}s "
                         f"{'-' if val is None else f'{val:.3f}':>7s} {k['seconds']:8.1f}")
        else:
            lines.append(f"{k['name']:12s} {'':13s} {'':11s} {'':15s} {'':7s} "
                         f"{k['seconds']:8.1f}")
    prediction = results[-1]["working"] / REPORT_NAME
    accuracy = json.loads(prediction.read_text()).get("accuracy") if prediction.is_file() else None
    if accuracy:
        plain = accuracy["off"]["overall"]
        best = accuracy.get("assign", accuracy["off"])["overall"]
        lines.append(f"submission accuracy: {best:.3f} with the per-plate assignment "
                     f"({plain:.3f} by plain argmax), scored against the data's answer key")
    return lines
