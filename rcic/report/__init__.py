"""`rcic-chain report`: one picture of one chain or several, instead of their logs.

report.html (self-contained: it opens offline) and report.png (the same panels on one
picture): the curves of all stages stitched, validation accuracy per cell type, where each
stage's budget went, the GPU quota used and still needed, and the submission's accuracy or
scores. `chains.py` reads what a chain left on disk, `figures.py` draws, `page.py` writes the
page. The last stage kernel and the submission kernel write the report into their output too
(`after_stage`, `after_submit`), so it shows on Kaggle's output tab.
"""
from pathlib import Path

from rcic.atomic import write_atomic
from rcic.errors import UserError

REPORT_HTML, REPORT_PNG = "report.html", "report.png"
# What a stage kernel's budget must still hold for it to write the report after its stage
# (importing matplotlib and drawing take a few seconds; more on a busy machine).
REPORT_SECONDS = 30.0


def write_report(chains, out, title=None):
    """Write report.html and report.png for `chains` (chains.Chain) into `out`; returns the
    path of report.html."""
    from rcic.report.figures import overview_png, section_figures
    from rcic.report.page import render

    out = Path(out)
    title = title or "rcic chain report: " + ", ".join(chain.label for chain in chains)
    try:
        out.mkdir(parents=True, exist_ok=True)
        figures = section_figures(chains)
        write_atomic(out / REPORT_PNG, overview_png(chains, title))
        write_atomic(out / REPORT_HTML, render(chains, figures, title))
    except OSError as err:
        raise UserError(f"cannot write the report into {out} ({err.strerror or err}): choose "
                        f"another --out, or make it writable") from None
    return out / REPORT_HTML


def report_folders(folders, out):
    """`rcic-chain report DIR [DIR ...] --out OUT`: the chains of `folders`, side by side."""
    from rcic.report.chains import read_chain

    chains = [read_chain(folder) for folder in folders]
    labels = [chain.label for chain in chains]
    for i, chain in enumerate(chains):
        if labels.count(chain.label) > 1:   # two folders of one name: tell them apart
            chain.label = f"{chain.label} ({i + 1})"
    return write_report(chains, out)


def say(line):
    print(line, flush=True)     # a kernel's log interleaves with its stage's: no buffering


def after_stage(settings, previous, working, budget, echo=say):
    """In a stage kernel, after its stage: keep the earlier stages' reports in this output
    (the next kernel sees only this one's), and in the chain's last stage write the report
    beside them when the budget still holds it. Never fails the kernel: a failure is a line."""
    from rcic.report.chains import carry_history, kernel_chain

    who = f"rcic stage {settings['stage']}/{settings['stages']}"
    try:
        carry_history(previous, working, settings["stage"])
        if settings["stage"] != settings["stages"]:
            return
        if not budget.fits(REPORT_SECONDS):
            echo(f"{who}: no time left in the budget for {REPORT_HTML}: skipped")
            return
        path = write_report([kernel_chain(working, settings["stages"])], working)
        echo(f"{who}: the chain's report: {path}")
    except Exception as err:      # a picture must never cost the stage its output
        echo(f"{who}: the chain's report was not written ({type(err).__name__}: {err})")


def after_submit(stage_folder, working, prediction, echo=say):
    """In the submission kernel: the chain's report, from the last stage's output (attached as
    `stage_folder`) and the prediction's report. Never fails the kernel."""
    from rcic.report.chains import kernel_chain

    try:
        path = write_report([kernel_chain(stage_folder, submission=prediction)], working)
        echo(f"rcic submit kernel: the chain's report: {path}")
    except Exception as err:      # the submission is written: a picture must not undo that
        echo(f"rcic submit kernel: the chain's report was not written "
             f"({type(err).__name__}: {err})")
