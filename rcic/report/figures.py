"""The report's pictures, one function a panel, each drawing on a matplotlib axis it is given:
the HTML page draws each on a figure of its own, report.png all of them on one.

Figures are made without pyplot (matplotlib.figure.Figure renders with the Agg canvas), so no
display and no global state are involved: a kernel or a headless machine draws them the same.
"""
import io

from rcic.kaggle.cost import WEEKLY_GPU_HOURS
from rcic.report.chains import PARTS, cost_parts, kernel_seconds_at, stage_spans

PART_COLORS = dict(zip(PARTS, ("#8c6d31", "#e7ba52", "#31a354", "#3182bd", "#9e9ac8",
                               "#e6550d", "#969696", "#f0f0f0")))
QUOTA_COLORS = {"used": "#de2d26", "still needed": "#fc9272", "left": "#e5f5e0"}


def time_unit(seconds):
    """(seconds per unit, unit) that shows `seconds` with readable numbers."""
    if seconds >= 3600:
        return 3600.0, "h"
    return (60.0, "min") if seconds >= 120 else (1.0, "s")


def new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(figure, dpi=80):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def by_time(chains):
    """Several chains are compared on the time they took (GPU hours on Kaggle); one chain is
    shown against its optimizer steps, exactly as recorded."""
    return len(chains) > 1


def draw_curves(ax_loss, ax_acc, chains):
    """Training and validation loss, and validation accuracy, of every stage stitched into one
    run; a dotted line where each stage after the first began."""
    timed = by_time(chains)
    scale, unit = time_unit(max(c.gpu_seconds() for c in chains) or 1.0)
    for i, chain in enumerate(chains):
        color, name = f"C{i}", f"{chain.label}: " if timed else ""

        def x(rows):
            return [kernel_seconds_at(chain, r["step"]) / scale if timed else r["step"]
                    for r in rows]
        train = [r for r in chain.metrics if "train_loss" in r]
        val = [r for r in chain.metrics if "val_acc" in r]
        ax_loss.plot(x(train), [r["train_loss"] for r in train], color=color, alpha=0.8,
                     label=f"{name}train loss")
        ax_loss.plot(x(val), [r["val_loss"] for r in val], "o--", color=color, markersize=4,
                     label=f"{name}validation loss")
        ax_acc.plot(x(val), [r["val_acc"] for r in val], "o-", color=color, markersize=4,
                    label=chain.label)
        for stage, first, _, began in stage_spans(chain)[1:]:
            where = began / scale if timed else first
            for ax in (ax_loss, ax_acc):
                ax.axvline(where, color=color if timed else "0.5", linestyle=":", linewidth=1)
            if not timed:
                ax_acc.annotate(stage.name, (where, 1.0), xycoords=("data", "axes fraction"),
                                xytext=(2, -10), textcoords="offset points", fontsize=8,
                                color="0.35")
    label = f"kernel time ({unit}; GPU time on Kaggle)" if timed else "optimizer step"
    ax_loss.set(xlabel=label, ylabel="loss", title="loss, all stages")
    ax_acc.set(xlabel=label, ylabel="accuracy", title="validation accuracy (held-out experiments)")
    ax_loss.legend(fontsize=8)
    if timed:
        ax_acc.legend(fontsize=8)
    if not any(chain.metrics for chain in chains):
        ax_loss.text(0.5, 0.5, "no metrics.csv found", ha="center", transform=ax_loss.transAxes)


def newest_by_cell_type(chain):
    """{cell type: accuracy} of the chain's newest validation that recorded them."""
    for row in reversed(chain.metrics):
        found = {k[len("val_acc_"):]: v for k, v in row.items() if k.startswith("val_acc_")}
        if found:
            return found
    return {}


def draw_cell_types(ax, chains):
    """The newest validation accuracy of each cell type, a bar for each chain."""
    found = [newest_by_cell_type(chain) for chain in chains]
    types = sorted({t for f in found for t in f})
    width = 0.8 / len(chains)
    for i, (chain, accuracy) in enumerate(zip(chains, found)):
        ax.bar([k + i * width for k in range(len(types))], [accuracy.get(t, 0) for t in types],
               width, color=f"C{i}", label=chain.label)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(types))], types)
    ax.set(ylim=(0, 1), ylabel="accuracy", title="validation accuracy per cell type (newest)")
    if len(chains) > 1:
        ax.legend(fontsize=8)
    if not types:
        # metrics.csv written before rcic recorded cell types, or none at all
        ax.text(0.5, 0.5, "no validation per cell type recorded", ha="center",
                transform=ax.transAxes, fontsize=9)


def draw_costs(ax, chains):
    """Each stage's budget as a bar, split into where its time went (chains.PARTS)."""
    from matplotlib.patches import Patch

    rows = [(f"{chain.label} {stage.name}" if len(chains) > 1 else stage.name, cost_parts(stage))
            for chain in chains for stage in chain.stages]
    longest = max((sum(p.values()) for _, p in rows if p), default=1.0)
    scale, unit = time_unit(longest)
    for y, (name, parts) in enumerate(rows):
        left = 0.0
        for part, seconds in (parts or {}).items():
            ax.barh(y, seconds / scale, left=left, color=PART_COLORS[part], edgecolor="0.6",
                    linewidth=0.3)
            left += seconds / scale
        if parts is None:
            ax.text(0, y, " no stage.json here", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)      # the first stage on top
    ax.set(xlabel=f"{unit} of the stage's budget", title="where each stage's budget went")
    ax.legend(handles=[Patch(facecolor=PART_COLORS[p], edgecolor="0.6", label=p) for p in PARTS],
              fontsize=8, ncol=len(PARTS), loc="upper center", bbox_to_anchor=(0.5, -0.2))


def draw_quota(ax, chains):
    """The week's GPU quota: what each chain used, what its recipe still needs, what is left."""
    for y, chain in enumerate(chains):
        used, needed, left = chain.quota_hours()
        start = 0.0
        for part, hours in (("used", used), ("still needed", needed), ("left", max(0.0, left))):
            ax.barh(y, hours, left=start, height=0.5, color=QUOTA_COLORS[part],
                    edgecolor="0.6", linewidth=0.3, label=part if y == 0 else None)
            start += hours
        ax.text(WEEKLY_GPU_HOURS, y, f" {used:.2f} h used, {needed:.2f} h more needed",
                va="center", fontsize=8)
    ax.set_yticks(range(len(chains)), [chain.label for chain in chains])
    ax.set_ylim(len(chains) - 0.4, -0.6)
    ax.set(xlim=(0, WEEKLY_GPU_HOURS * 1.6), xlabel="GPU hours",
           title=f"a week's GPU quota ({WEEKLY_GPU_HOURS:.0f} h): this chain's share")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))


def section_figures(chains):
    """{section: PNG bytes} of the HTML page's pictures."""
    figures = {}
    fig = new_figure(12, 4)
    draw_curves(*fig.subplots(1, 2), chains)
    figures["curves"] = png_bytes(fig)
    fig = new_figure(6, 3.5)
    draw_cell_types(fig.subplots(), chains)
    figures["cell types"] = png_bytes(fig)
    n_rows = sum(len(chain.stages) for chain in chains)
    fig = new_figure(12, 1.6 + 0.4 * n_rows)
    draw_costs(fig.subplots(), chains)
    figures["costs"] = png_bytes(fig)
    fig = new_figure(10, 2 + 0.5 * len(chains))
    draw_quota(fig.subplots(), chains)
    figures["quota"] = png_bytes(fig)
    return figures


def overview_png(chains, title):
    """report.png: every panel on one picture."""
    n_rows = sum(len(chain.stages) for chain in chains)
    fig = new_figure(14, 9 + 0.4 * n_rows)
    grid = fig.add_gridspec(3, 2, height_ratios=(3, 2.5, 1.5 + 0.4 * n_rows))
    draw_curves(fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), chains)
    draw_cell_types(fig.add_subplot(grid[1, 0]), chains)
    draw_quota(fig.add_subplot(grid[1, 1]), chains)
    draw_costs(fig.add_subplot(grid[2, :]), chains)
    fig.suptitle(title)
    return png_bytes(fig)
