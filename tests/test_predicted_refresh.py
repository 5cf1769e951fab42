"""Note [predicted refresh]: an asynchronous step runs sequentially where the error predicted from
the output's motion and the fidelity rule's measurement is above ``refresh_error``."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.config import EngineConfig
from asyncdiff.engine.launch import launch
from asyncdiff.engine.refresh import PredictedRefresh
from asyncdiff.engine.schedule import Schedule, Signals, StepKind, decide_step
from toys import predicted_refresh_scenarios

STEPS = 8


def test_the_prediction_is_the_motion_times_the_measured_error_per_motion():
    refresh = PredictedRefresh(limit=0.1)
    notes = {"error_per_motion": 0.5, "predicted_error": 0.3}
    refresh.observe(torch.ones(3), step=0)
    assert refresh.predicted(notes) == 0.3  # no motion seen yet: the error measured for these steps
    refresh.observe(torch.full((3,), 1.5), step=1)
    assert refresh.predicted(notes) == pytest.approx(0.25)  # moved by 0.5
    refresh.observe(torch.full((3,), 1.5), step=0)  # a new loop: nothing seen in it yet
    assert refresh.predicted(notes) == 0.3
    assert refresh.predicted({}) is None and refresh.warned  # no measurement: says so, predicts nothing


def test_the_step_decision_refreshes_only_an_asynchronous_step_above_the_limit():
    s = Schedule(model_n=2, warm_up=2)
    over, under = Signals(error=0.2, error_limit=0.1), Signals(error=0.05, error_limit=0.1)
    assert decide_step(s, 3, over).kind == StepKind.REFRESH
    assert decide_step(s, 3, over).why == "predicted error 0.2 > 0.1"
    assert decide_step(s, 3, under).kind == StepKind.ASYNC
    assert decide_step(s, 1, over).kind == StepKind.WARM_UP


@pytest.mark.parametrize("fields, message", [
    ({"refresh_error": -0.1}, "refresh_error=-0.1 must be a number >= 0"),
    ({"refresh_error": 0.1, "stride": 2}, "with stride=1 \\(stride=2\\)"),
    ({"refresh_error": 0.1, "plan_rule": "depth"}, "plan_rule='fidelity' \\(plan_rule='depth'"),
])
def test_settings_it_cannot_run_with_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model_n=2, **fields)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return launch(predicted_refresh_scenarios, 2, STEPS, [None, 0.0, "middle", 1e9],
                  str(tmp_path_factory.mktemp("plans")))


def test_a_limit_of_zero_refreshes_every_step_and_gives_the_sequential_outputs(runs):
    r = runs[0]
    outputs, decisions, notes = r[0.0]
    assert notes["error_per_motion"] > 0 and notes["predicted_error"] > 0  # measured on the first call, cached
    assert [kind for kind, _ in decisions] == ["warm-up"] + ["refresh"] * (STEPS - 1)
    assert all(why.startswith("predicted error ") and why.endswith(" > 0") for _, why in decisions[1:])
    for got, want in zip(outputs, r["sequential"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_limit_no_step_reaches_changes_nothing(runs):
    r = runs[0]
    for got, want in zip(r[1e9][0], r[None][0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [kind for kind, _ in r[1e9][1]] == ["warm-up"] + ["async"] * (STEPS - 1)


def test_a_limit_between_refreshes_the_steps_predicted_above_it_on_every_rank(runs):
    r = runs[0]
    decisions = r["middle"][1]
    kinds = [kind for kind, _ in decisions]
    assert "refresh" in kinds and "async" in kinds, kinds
    assert all(why.startswith("predicted error") and float(why.split()[2]) > r["middle_limit"]
               for kind, why in decisions if kind == "refresh")
    assert all(other["middle"][1] == decisions for other in runs.values())  # one decision on every rank
    fewer = (r["middle"][0][-1] - r["sequential"][-1]).norm()
    assert fewer < (r[None][0][-1] - r["sequential"][-1]).norm()  # closer to sequential than none


def test_a_plan_without_the_measurement_warns_and_runs_without_refresh(runs):
    _, kinds, warned = runs[0]["bare"]
    assert warned and kinds == ["warm-up"] + ["async"] * (STEPS - 1)
