"""Note [fidelity rule] and Note [measured plan choice]: the default plan chosen by the error the
engine predicts on the warm-up steps of the real call."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.config import EngineConfig
from asyncdiff.engine.launch import launch
from asyncdiff.engine.pilot import unmeasured
from asyncdiff.engine.drift import extrapolated_calls, predicted_error, sequential_outputs
from asyncdiff.partition.planner import Value, candidates, choose_faithful, nearby_candidates
from toys import pilot_scenarios


@pytest.mark.parametrize("world", [2, 3])
def test_the_measured_plan_runs_exactly_as_if_it_had_been_given_from_the_start(world, tmp_path):
    """The measured choice differs from the provisional (depth rule) plan the warm-up ran with,
    so every rank re-split and computed its stale inputs itself: the outputs are bitwise those of
    the same plan given from the start and of the cached plan in a later engine."""
    r = launch(pilot_scenarios, world, 6, 1, 10.0, str(tmp_path))[0]
    assert "fidelity rule: predicted error" in r["measured_source"] and "saved to" in r["measured_source"]
    assert r["measured_plan"].stages != r["depth_plan"].stages  # the switch ran
    assert r["cached_source"].startswith("cached at") and r["cached_plan"].stages == r["measured_plan"].stages
    assert r["cached_candidates"] == []  # nothing measured the second time
    for name in ("given", "cached"):
        for got, want in zip(r[name], r["measured"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert r["measured_kinds"] == r["given_kinds"] == ["WARM_UP"] + ["ASYNC"] * 5  # no extra step
    assert r["measured_released"] == r["given_released"] > 0  # the foreign weights went after the choice
    # the choice is the candidate with the least predicted error, and the errors are measured, not equal
    errors = [e for _, e in r["measured_candidates"]]
    assert len(errors) > 2 and len(set(errors)) == len(errors)
    assert r["measured_candidates"][errors.index(min(errors))][0] == r["measured_plan"].stages
    assert (r["measured"][-1] - r["sequential"][-1]).abs().max() > 0  # asynchronous, not sequential


def test_a_full_warm_up_stays_exact_under_the_fidelity_rule(tmp_path):
    r = launch(pilot_scenarios, 2, 4, 4, 10.0, str(tmp_path))[0]
    for got, want in zip(r["measured"], r["sequential"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert "provisional plan kept" not in r["measured_source"] and r["measured_candidates"] == []


def test_the_predicted_error_grows_with_how_much_the_stale_values_move():
    """Measured from the calls: a still input costs nothing, a moving one costs more the more it moves."""
    from asyncdiff.partition.plan import Plan
    from asyncdiff.partition.split import split_graph
    from asyncdiff.partition.trace import trace_denoiser

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    x = torch.randn(2, 8)
    traced = trace_denoiser(net, (x,), {})
    split = split_graph(traced, Plan(stages=(("0", "1"), ("2", "3"))))

    def error(move: float) -> float:
        calls = extrapolated_calls([[x], [x + move]], 3)
        return predicted_error(traced, split, net, calls, 1, sequential_outputs(traced, net, calls))

    assert error(0.0) == 0.0
    assert 0 < error(0.01) < error(0.1) < error(1.0)


def test_extrapolated_calls_continue_the_last_step():
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([10]), torch.ones(1)], [torch.tensor([1.5, 2.0]),
                                                                            torch.tensor([8]), torch.ones(1)]
    out = extrapolated_calls([a, b], 2)
    assert torch.equal(out[2][0], torch.tensor([2.0, 2.0])) and torch.equal(out[3][0], torch.tensor([2.5, 2.0]))
    assert torch.equal(out[3][1], torch.tensor([4])) and out[3][1].dtype == torch.int64
    assert out[3][2] is b[2]  # what did not move repeats
    with pytest.raises(ValueError, match="two recorded calls"):
        extrapolated_calls([a], 1)


def test_candidates_lie_in_the_window_fastest_first_and_the_choice_is_the_least_error():
    costs = [1.0] * 8
    chain = [Value(i, (i + 1,), 1) for i in range(7)]
    found = nearby_candidates(costs, chain, 2, max_slowdown=0.5)
    steps = [c.step for c in found]
    assert steps == sorted(steps) and max(steps) <= min(steps) * 1.5 and len(found) <= 6
    best = candidates(costs, chain, 2)
    assert {c.assignment for c in best} <= {c.assignment for c in found}  # each layout's best is measured
    assert len({c.assignment for c in found}) == len(found)
    assert nearby_candidates(costs, chain, 2, max_slowdown=0.0)[0].step == min(c.step for c in best)
    assert choose_faithful([1.0, 1.2, 1.1], [0.3, 0.1, 0.1]) == 2  # a tie goes to the faster
    with pytest.raises(ValueError, match="2 candidates but 1 predicted errors"):
        choose_faithful([1.0, 2.0], [0.1])


@pytest.mark.parametrize("fields, stage_only, reason", [
    ({}, False, None),
    ({"plan_rule": "depth"}, False, "plan_rule='depth'"),
    ({"stride": 2, "model_n": 3}, False, "stride=2"),
    ({"time_shift": True}, False, "time_shift=True"),
    ({}, True, "a stage-only load"),
    ({"warm_up": 0}, False, "warm_up=0"),
    ({"refresh_drift": 0.1}, False, "refresh_drift"),
    ({"model_n": 1}, False, "one stage"),
])
def test_where_the_fidelity_rule_cannot_measure_it_says_why(fields, stage_only, reason):
    config = EngineConfig(**{"model_n": 2, **fields})
    got = unmeasured(config, stage_only)
    assert got == reason if reason is None else reason in got


def test_bad_rule_and_window_name_the_field():
    with pytest.raises(ValueError, match="plan_rule='best' must be one of fidelity, depth"):
        EngineConfig(model_n=2, plan_rule="best")
    with pytest.raises(ValueError, match=r"max_slowdown=-1 must be a number >= 0"):
        EngineConfig(model_n=2, max_slowdown=-1)
    assert EngineConfig(model_n=2).slowdown("fidelity") == 0.15 and EngineConfig(model_n=2).slowdown("depth") == 0.05
    assert EngineConfig(model_n=2, max_slowdown=0.3).slowdown("depth") == 0.3


def test_the_mesh_takes_an_exact_option_within_the_fidelity_window():
    """An exact option (the guidance split) has no staleness error: under the fidelity rule it is
    taken up to 15 % slower, as the bench SD's (modelled 12.8 % slower); the depth rule's 5 % does not."""
    from asyncdiff.partition.hybrid import ParallelOption, choose_parallel

    options = [ParallelOption(1, 1, 2, step=1.0, depth=1), ParallelOption(2, 1, 1, step=1.128, depth=0)]
    config = EngineConfig(model_n=2)
    assert choose_parallel(options, config.slowdown("fidelity")).guidance == 2
    assert choose_parallel(options, EngineConfig(model_n=2, plan_rule="depth").slowdown("depth")).guidance == 1
