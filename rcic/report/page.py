"""report.html: one self-contained page. Its pictures are PNGs inside the page (data: URIs), its
style is inline, and it loads nothing else, so it opens offline: from a laptop's disk, or from a
Kaggle kernel's output.
"""
import base64
import html
import time

from rcic.kaggle.cost import WEEKLY_GPU_HOURS
from rcic.kaggle.plan import hours
from rcic.report.chains import PARTS, cost_parts

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def escape(value):
    return html.escape("-" if value is None else str(value))


def number(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def seconds_text(seconds):
    if seconds is None:
        return "-"
    return hours(seconds) if seconds >= 120 else f"{seconds:.1f} s"


def table(header, rows, css_class=""):
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f'<table class="{css_class}"><tr>{head}</tr>{body}</table>'


def image(png, alt):
    return (f'<img alt="{escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def submission_text(chain):
    """The submission's accuracy (on data with an answer key) and its scores (after submit)."""
    parts = []
    accuracy = (chain.submission or {}).get("accuracy")
    if accuracy:
        plain, best = accuracy["off"]["overall"], accuracy.get("assign", accuracy["off"])["overall"]
        parts.append(f"accuracy {best:.3f} with the per-plate assignment ({plain:.3f} by plain "
                     f"argmax)")
    if chain.scores:
        parts.append(f"public score {chain.scores.get('public_score')}, private score "
                     f"{chain.scores.get('private_score')}")
    if not parts:
        parts.append("no scores yet: rcic-chain submit" if chain.submission else
                     "no submission kernel output here")
    return "; ".join(parts)


def summary_rows(chains):
    """One row per question, one column per chain: the chains side by side."""
    def newest(chain, key):
        return chain.newest.get(key) if chain.newest else None

    def reached(chain):
        return (f"{newest(chain, 'global_step')}/{newest(chain, 'total_steps')}"
                if chain.newest else "-")

    def val_acc(chain):
        val = [r for r in chain.metrics if "val_acc" in r]
        return number(val[-1]["val_acc"]) if val else "-"

    def needed(chain):
        n = chain.stages_needed()
        return ("finished" if n == 0 else "-" if n is None else
                f"{n} (about {seconds_text(n * (chain.seconds_per_stage() or 0))})")
    rows = [
        ("folder", lambda c: c.where),
        ("recipe", lambda c: newest(c, "recipe")),
        ("stages run / rendered", lambda c: f"{sum(s.report is not None for s in c.stages)}"
                                            f" / {c.planned_stages or len(c.stages)}"),
        ("optimizer steps reached", reached),
        ("newest validation accuracy", val_acc),
        ("kernel time used (GPU time on Kaggle)", lambda c: seconds_text(c.gpu_seconds())),
        ("stages the recipe still needs", needed),
        (f"left of a week's {WEEKLY_GPU_HOURS:.0f} h GPU quota after it",
         lambda c: f"{c.quota_hours()[2]:.2f} h"),
        ("submission", submission_text),
    ]
    return [(name, *(value(chain) for chain in chains)) for name, value in rows]


def stage_rows(chain):
    """A row per stage: how it ended and where its budget went."""
    rows = []
    for stage in chain.stages:
        parts = cost_parts(stage)
        if parts is None:
            rows.append((stage.name, "no stage.json here", *[""] * (len(PARTS) + 5)))
            continue
        val = (stage.get("last_eval") or {}).get("val_acc")
        rows.append((stage.name, stage.get("stopped_by"), stage.get("steps_this_stage"),
                     f"{stage.get('global_step')}/{stage.get('total_steps')}", number(val),
                     seconds_text(stage.seconds), seconds_text(stage.get("budget_seconds")),
                     *(seconds_text(parts[p]) for p in PARTS)))
    return rows


STAGE_HEADER = ("stage", "stopped by", "steps", "reached", "val acc", "kernel time", "budget",
                *PARTS)


def cell_type_rows(chains):
    from rcic.report.figures import newest_by_cell_type

    found = [newest_by_cell_type(chain) for chain in chains]
    types = sorted({t for f in found for t in f})
    return [(t, *(number(f.get(t)) for f in found)) for t in types]


def render(chains, figures, title):
    """The page, as text."""
    labels = [chain.label for chain in chains]
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="note">written {escape(time.strftime("%Y-%m-%d %H:%M:%S %Z"))} by '
            f'rcic-chain report</p>',
            "<h2>The chains</h2>", table(("", *labels), summary_rows(chains), "summary"),
            "<h2>Training and validation, all stages</h2>",
            '<p class="note">' + ("Chains side by side, on the kernel time each spent (GPU "
                                  "hours on Kaggle): steps are taken as evenly spread over each "
                                  "stage's training." if len(chains) > 1 else
                                  "Dotted lines: where each stage began.") + "</p>",
            image(figures["curves"], "loss and validation accuracy"),
            "<h2>Validation accuracy per cell type</h2>",
            image(figures["cell types"], "validation accuracy per cell type"),
            table(("cell type", *labels), cell_type_rows(chains), "cell-types"),
            "<h2>Where each stage's time went</h2>",
            '<p class="note">Each stage\'s budget, from its stage.json. Start-up counts from the '
            'kernel\'s start (installing the bundle, starting the stage, opening the data, '
            'resuming); training is what the measured units leave of the seconds used; unused '
            'is the budget after the stage\'s process ended, its safety margin included. '
            'Kaggle\'s boot and its save of the output come on top, outside the budget.</p>',
            image(figures["costs"], "where each stage's time went")]
    for chain in chains:
        body += [f"<h3>{escape(chain.label)}</h3>", table(STAGE_HEADER, stage_rows(chain), "stages")]
    body += ["<h2>GPU quota</h2>",
             f'<p class="note">Kaggle gives an account {WEEKLY_GPU_HOURS:.0f} GPU hours a week and '
             f'counts a GPU kernel\'s whole run. Used: this chain\'s kernel time; still needed: '
             f'the stages the newest stage.json estimates, at the average time of a stage that '
             f'trained. rcic-chain status shows Kaggle\'s own count for the account.</p>',
             image(figures["quota"], "GPU quota")]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
