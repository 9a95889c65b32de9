"""How long a Kaggle session may run, per machine shape, and the stage budget that fits one.

Kaggle's notebook documentation ("Technical Specifications", read in the first week of
2026-12) gives CPU and GPU sessions 12 hours and TPU sessions 9; code competitions set their own
cap (often 9 hours), which `--session-limit` states. RCIC is a file-upload competition: its
kernels get the plain limit. A session past its limit is killed without warning, output lost.

A stage's budget is counted from the start of the kernel's Python process, and everything after
that is paid from it: installing the bundle, expanding the cache, training, and the final
checkpoint save (the stage reserves it; rcic.budget, rcic.deadline). What the session spends
outside the budget is:

    boot        Kaggle starts the container and attaches the inputs before the script runs.
                Kaggle reports no figure and a kernel cannot see it: BOOT_SECONDS is an
                allowance, not a measurement.
    output      after the script ends, Kaggle saves /kaggle/working: the recipe's checkpoint
                (model, optimizer state, weights file), at SAVE_BYTES_PER_SECOND.
    reserve     RESERVE_SECONDS for what neither of these covers (a slow save, a late clock).

    default budget = limit - boot - output - reserve, rounded down to 5 minutes

which gives 11h30m for a two-T4 session with the built-in recipe.
"""
import math

from rcic.errors import UserError

HOUR = 3600
# Kaggle's session limits; the source of each is the documentation named above.
GPU_CPU_LIMIT_SECONDS = 12 * HOUR
TPU_LIMIT_SECONDS = 9 * HOUR
LIMIT_SOURCE = ("Kaggle's notebook documentation, Technical Specifications (read in the first "
                "week of 2026-12)")

BOOT_SECONDS = 10 * 60
RESERVE_SECONDS = 15 * 60
SAVE_BYTES_PER_SECOND = 10 * 10**6      # a pessimistic copy rate: Kaggle publishes none
# Bytes a checkpoint holds per model parameter: float32 weights, Adam's two moments, and the
# inference weights file beside it.
CHECKPOINT_BYTES_PER_PARAMETER = 4 * 4
ROUND_SECONDS = 5 * 60


def session_limit(machine_shape, override=None):
    """(seconds, why) of the session limit of a kernel on `machine_shape` (None: a CPU kernel);
    `override` is a competition's own limit in seconds."""
    if override is not None:
        return override, "the competition's own limit (--session-limit)"
    if machine_shape and machine_shape.lower().startswith("tpu"):
        return TPU_LIMIT_SECONDS, "Kaggle's 9-hour TPU sessions"
    kind = "GPU" if machine_shape else "CPU"
    return GPU_CPU_LIMIT_SECONDS, f"Kaggle's 12-hour {kind} sessions"


def outside_budget(limit_seconds, parameters):
    """{what: seconds} a session spends outside a stage's budget (see the module's docstring)."""
    output = parameters * CHECKPOINT_BYTES_PER_PARAMETER / SAVE_BYTES_PER_SECOND
    # A short competition limit cannot spare 25 minutes: keep the same share of it instead.
    share = min(1.0, limit_seconds / GPU_CPU_LIMIT_SECONDS)
    return {"boot": BOOT_SECONDS * share, "output": output, "reserve": RESERVE_SECONDS * share}


def default_budget_seconds(limit_seconds, parameters):
    """The longest budget, in whole 5 minutes, that leaves room for what is outside it."""
    left = limit_seconds - sum(outside_budget(limit_seconds, parameters).values())
    return max(ROUND_SECONDS, math.floor(left / ROUND_SECONDS) * ROUND_SECONDS)


def format_duration(seconds):
    """'11h30m', '45m', '1h': the form --budget takes."""
    h, m = divmod(int(round(seconds / 60)), 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m or not h else "")


def check_budget(budget_seconds, budget_text, limit_seconds, why, parameters):
    """A UserError when a stage of `budget_seconds` cannot finish inside the session limit."""
    room = limit_seconds - sum(outside_budget(limit_seconds, parameters).values())
    if budget_seconds > room:
        suggestion = format_duration(default_budget_seconds(limit_seconds, parameters))
        raise UserError(f"--budget {budget_text} does not fit a {format_duration(limit_seconds)} "
                        f"session ({why}) with the {format_duration(limit_seconds - room)} "
                        f"Kaggle needs outside it to boot and save the output: use at most "
                        f"--budget {suggestion}")


def recipe_parameters(recipe):
    """Parameters of the recipe's model (built on the CPU, without pretrained weights)."""
    from rcic.models import create_model

    model = create_model(recipe.model, num_classes=1108, num_cell_types=4, with_pretrained=False)
    return sum(p.numel() for p in model.parameters())
