"""Kaggle's session limit per machine shape, and the stage budget derived from it."""
import pytest

from rcic.budget import parse_duration
from rcic.cli.chain import main
from rcic.config import load_recipe
from rcic.errors import UserError
from rcic.kaggle import session

HOURS = 3600


@pytest.mark.parametrize("shape, hours", [("NvidiaTeslaT4", 12), ("NvidiaL4", 12), (None, 12),
                                          ("TpuV5E8", 9)])
def test_the_limit_follows_the_machine_shape(shape, hours):
    seconds, why = session.session_limit(shape)
    assert seconds == hours * HOURS and f"{hours}-hour" in why
    assert session.session_limit(shape, override=5 * HOURS)[0] == 5 * HOURS


def test_the_default_budget_leaves_room_for_boot_and_the_output_save():
    parameters = session.recipe_parameters(load_recipe(None))
    limit = 12 * HOURS
    budget = session.default_budget_seconds(limit, parameters)
    assert 11.25 * HOURS <= budget <= 11.5 * HOURS and budget % 300 == 0
    outside = session.outside_budget(limit, parameters)
    assert set(outside) == {"boot", "output", "reserve"}
    assert budget + sum(outside.values()) <= limit
    # The longest budget accepted is the room in the session, to the second.
    room = limit - sum(outside.values())
    session.check_budget(room, "room", limit, "12-hour sessions", parameters)
    with pytest.raises(UserError, match="use at most --budget 11h30m"):
        session.check_budget(room + 1, "room", limit, "12-hour sessions", parameters)


def test_a_bigger_checkpoint_takes_longer_to_save_and_shortens_the_budget():
    limit = 12 * HOURS
    small = session.default_budget_seconds(limit, 10**6)
    # 2 billion parameters: a 32 GB checkpoint, about 53 minutes at the assumed copy rate.
    big = session.default_budget_seconds(limit, 2 * 10**9)
    assert big <= small - 50 * 60
    assert session.outside_budget(limit, 2 * 10**9)["output"] > 50 * 60


def test_plan_uses_the_derived_budget_and_checks_a_given_one(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\ntrain:\n  max_steps: 100000\n")
    assert main(["plan", "--samples-per-second", "10", "--config", str(recipe)]) == 0
    assert "a 11.50 h stage trains" in capsys.readouterr().out
    assert main(["plan", "--samples-per-second", "10", "--config", str(recipe),
                 "--machine-shape", "TpuV5E8"]) == 0
    out = capsys.readouterr().out
    assert f"a {parse_duration('8h40m') / HOURS:.2f} h stage trains" in out
    assert main(["plan", "--samples-per-second", "10", "--config", str(recipe),
                 "--budget", "12h30m"]) == 2
    assert "--budget 12h30m does not fit a 12h session" in capsys.readouterr().err
