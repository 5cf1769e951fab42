"""Note [compensation]: stale inputs extrapolated from the last two received."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.compensation import Extrapolation, spacing_ratio
from asyncdiff.engine.config import EngineConfig
from asyncdiff.engine.launch import launch
from toys import compensation_scenarios


def _run(values: list[float], mode: str, ratio: float = 1.0) -> list[float]:
    """What each step reads, given the stale value it received (every step asynchronous)."""
    e = Extrapolation()
    return [e.step({"h": torch.tensor([v])}, mode, ratio if i >= 2 else None, asynchronous=True)["h"].item()
            for i, v in enumerate(values)]


def test_linear_extrapolates_the_trend_scaled_by_the_timestep_spacing():
    assert _run([1.0, 2.0, 3.0], "linear") == [1.0, 2.0, 4.0]
    assert _run([1.0, 2.0, 3.0], "linear", ratio=0.5) == [1.0, 2.0, 3.5]
    assert _run([1.0, 2.0, 3.0], "none") == [1.0, 2.0, 3.0]
    assert spacing_ratio([900.0, 800.0, 600.0]) == 2.0 and spacing_ratio([5.0, 5.0, 4.0]) is None
    assert spacing_ratio([None, 1.0, 0.0]) == 1.0  # no timesteps known: uniform spacing


def test_auto_extrapolates_only_a_value_whose_trend_predicted_better():
    # a line: the linear guess is exact from the third value on, so auto takes it after one score
    assert _run([1.0, 2.0, 3.0, 4.0, 5.0], "auto") == [1.0, 2.0, 3.0, 5.0, 6.0]
    # alternating: the trend predicts worse than the stale value, so auto never extrapolates
    assert _run([1.0, -1.0, 1.0, -1.0, 1.0], "auto") == [1.0, -1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("fields, message", [
    ({"compensate": "cubic"}, "compensate='cubic' must be one of none, linear, auto"),
    ({"compensate": "linear", "stride": 2}, "compensate='linear' extrapolates stale inputs one step old: it needs "
                                            "stride=1 without time_shift"),
    ({"compensate": "auto", "time_shift": True}, "needs stride=1 without time_shift"),
])
def test_bad_settings_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(model_n=3 if fields.get("stride") == 2 else 2, **fields)


def test_on_the_engine_linear_is_exact_where_values_move_linearly_and_exact_modes_stay_exact():
    """The affine-in-time toy on 2 stages: from the first asynchronous step with a trend (warm-up
    2), linear compensation gives the sequential outputs; without it, stale inputs do not; auto
    needs one scored step more (warm-up 3); warm-up covering every step is exact in every mode."""
    steps = 6
    two = launch(compensation_scenarios, 2, steps, 2)[0]
    reference = two["sequential"]
    for got, want in zip(two["linear"], reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert two["linear_kinds"] == ["WARM_UP"] * 2 + ["ASYNC"] * 4
    assert (two["none"][-1] - reference[-1]).abs().max() > 1e-2
    three = launch(compensation_scenarios, 2, steps, 3)[0]
    for got, want in zip(three["auto"], three["sequential"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exact = launch(compensation_scenarios, 2, steps, steps)[0]
    for mode in ("none", "linear", "auto"):
        for got, want in zip(exact[mode], exact["sequential"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_one_process_simulator_compensates_as_the_engine_does():
    """Note [predicted drift] runs plans in one process: with compensation too, linear is exact on
    the affine-in-time toy there as on the engine, and plain stale inputs are not."""
    from asyncdiff.partition.auto import auto_plan
    from asyncdiff.engine.local import AsyncSimulator
    from asyncdiff.partition.profile import profile_blocks
    from asyncdiff.partition.split import split_graph
    from asyncdiff.partition.trace import trace_denoiser
    from toys import AffineInTime

    torch.manual_seed(0)
    toy = AffineInTime()
    sample = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    calls = [((sample, torch.tensor([float(6 - t) * 10])), {}) for t in range(6)]
    traced = trace_denoiser(toy, *calls[0], latent="sample")
    plan = auto_plan(traced, profile_blocks(traced, toy, *calls[0], measure_time=False), 2, cost="flops")
    split = split_graph(traced, plan)
    with torch.no_grad():
        sequential = [toy(*args, **kwargs)["sample"] for args, kwargs in calls]
    for mode, exact in (("linear", True), ("none", False)):
        simulator = AsyncSimulator(traced, split, toy, warm_up=2, compensate=mode, timesteps=lambda s: (6 - s) * 10.0)
        got = [simulator(*args, **kwargs)["sample"] for args, kwargs in calls]
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, sequential)) == exact
