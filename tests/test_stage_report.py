"""rcic.stage_report: the one writer of stage.json, its units of work and the "too short" rule."""
import json

import pytest

from rcic import stage_report
from rcic.budget import minimum_budget, parse_duration, stage_budget


@pytest.mark.parametrize("work", [0.5, 4.0, 30.0, 200.0, 3600.0, 8 * 3600.0])
def test_the_minimum_budget_holds_the_work_and_no_less_would(work):
    enough = minimum_budget(work)
    # A supervised stage of that budget, just started, has `work` seconds before its margins ...
    assert stage_budget(enough, start=0.0).seconds - stage_budget(enough, start=0.0).margin >= work - 1e-9
    # ... and one of a second less has not.
    less = stage_budget(enough - 1.0, start=0.0)
    assert less.seconds - less.margin < work


def test_too_short_names_the_budget_the_reason_and_a_budget_that_holds_the_work():
    line = stage_report.too_short("r", 40.0, "one optimizer step takes about 190 s", 5.0 + 190 + 2)
    assert line.startswith("budget 40s is too short for recipe r here: one optimizer step takes "
                           "about 190 s; give it at least ")
    at_least = parse_duration(line.rsplit(" ", 1)[1])
    assert at_least >= minimum_budget(197.0)
    # Never less than the budget that was too short: at least one second more.
    assert parse_duration(stage_report.too_short("r", 600.0, "x", 1.0).rsplit(" ", 1)[1]) > 600


def test_every_unit_has_its_costs_and_the_phases_are_the_units():
    costs = stage_report.new_costs(teardown_estimate=3.0)
    for unit in stage_report.UNITS:
        if unit.phase != "teardown":        # measured by the supervisor, from outside
            assert unit.seconds_key in costs, unit
        if unit.count_key:
            assert costs[unit.count_key] == 0
    assert stage_report.PHASES == (*(u.phase for u in stage_report.UNITS), "exit")


def test_write_is_atomic_owns_the_fields_and_amend_adds_to_them(tmp_path):
    report = {"done": False, "global_step": 3, "costs": {"saves": 1}}
    stage_report.write(tmp_path, report)
    assert stage_report.read(tmp_path) == report
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]     # no temporary file left
    with pytest.raises(ValueError, match="stopped_by_signal"):
        stage_report.write(tmp_path, {**report, "stopped_by_signal": True})
    assert stage_report.read(tmp_path) == report                      # untouched by the refusal
    assert stage_report.amend(tmp_path, {"exit_seconds": 9.5}, {"teardown_seconds": 0.4})
    assert json.loads((tmp_path / "stage.json").read_text()) == {
        "done": False, "global_step": 3, "exit_seconds": 9.5,
        "costs": {"saves": 1, "teardown_seconds": 0.4}}
    assert not stage_report.amend(tmp_path / "none", {"exit_seconds": 1.0})   # nothing to amend


def test_a_deadline_report_keeps_the_newest_commit_on_disk():
    class Budget:
        seconds = 60.0

        @staticmethod
        def elapsed():
            return 57.2
    status = {"recipe": "r", "global_step": 9, "checkpoint_step": 8, "costs": {}, "bogus": 1}
    report = stage_report.deadline_report(status, "save", 2.5, 57.0, Budget, 4, on_disk=10)
    assert report["checkpoint_step"] == report["global_step"] == 10
    assert report["stopped_by"] == "deadline" and report["interrupted"] == "save"
    assert "bogus" not in report            # only stage.json's own fields
