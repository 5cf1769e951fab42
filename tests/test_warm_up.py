"""Note [relative warm-up]: ``warm_up`` as a count (the seed's meaning), as a fraction of each
denoising loop's steps, or ``"auto"``; resolved per loop, so a call of another length gets its own."""

from __future__ import annotations

import math

import pytest
import torch

from pool import launch
from asyncdiff.cli import main
from asyncdiff.engine.config import AUTO_WARM_UP, EngineConfig, warm_up_steps
from asyncdiff.engine.runtime import AsyncEngine
from toys import ToyDenoiser, warm_up_scenarios

STEPS = 4


def test_a_fraction_is_rounded_up_and_at_least_one_step():
    assert [warm_up_steps(0.1, n) for n in (4, 8, 25, 50)] == [1, 1, 3, 5]
    assert [warm_up_steps(0.25, n) for n in (4, 8, 25)] == [1, 2, 7]
    assert warm_up_steps(0.5, 4) == 2 and warm_up_steps(0.99, 4) == 4
    assert [warm_up_steps("auto", n) for n in (1, 2, 4, 8, 25, 50)] == [1, 1, 2, 2, 3, 5]  # the table's choice
    assert warm_up_steps("auto", 100) == math.ceil(AUTO_WARM_UP * 100)
    assert warm_up_steps(3, 50) == 3 and warm_up_steps(0, 50) == 0  # a count keeps the seed's meaning
    assert warm_up_steps(0.5, None) == 1  # not known yet: one sequential step


@pytest.mark.parametrize("value", [1.5, -1, 0.0, 1.0, "soon", True])
def test_other_values_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=f"warm_up={value!r} must be an integer >= 0 .*a fraction 0 < f < 1"):
        EngineConfig(model_n=2, warm_up=value)


def test_an_engine_not_told_its_loop_length_refuses_a_fraction():
    with pytest.raises(ValueError, match="warm_up=0.2 is relative to the steps of each denoising loop.*pass loop_steps"):
        AsyncEngine(ToyDenoiser(), EngineConfig(model_n=1, warm_up=0.2), latent="sample")
    engine = AsyncEngine(ToyDenoiser(), EngineConfig(model_n=1, warm_up=2), latent="sample")
    with pytest.raises(ValueError, match="warm_up='auto' is relative"):
        engine.reset_state(warm_up="auto")


def test_the_command_line_takes_a_fraction_and_auto(capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse: usage and the error, rc 2
        main(["generate", "--pipeline", "digits", "--devices", "1", "--steps", "1", "--warm-up", "1.5"])
    assert stopped.value.code == 2
    assert "warm_up=1.5 must be an integer >= 0" in capsys.readouterr().err
    from asyncdiff.cli import _warm_up

    assert _warm_up("0.25") == 0.25 and _warm_up("auto") == "auto" and _warm_up("3") == 3


@pytest.fixture(scope="module", params=[2, 3], ids=["2-procs", "3-procs"])
def runs(request):
    return launch(warm_up_scenarios, request.param, STEPS)


def test_a_fraction_runs_the_count_it_means_in_each_call(runs):
    for r in runs.values():
        half, kinds = r["0.5"]
        assert kinds[:3] == ["warm-up", "warm-up", "async"]  # 0.5 of 4 steps
        assert torch.equal(half, r["count_half"][0]) and kinds == r["count_half"][1]
        long, kinds = r["0.5_long"]
        assert kinds.count("warm-up") == STEPS  # 0.5 of 8 steps, in the next call
        assert torch.equal(long, r["count_long"][0]) and kinds == r["count_long"][1]


def test_auto_is_its_fraction_and_a_fraction_near_one_is_exact(runs):
    r = runs[0]
    assert r["auto"][1].count("warm-up") == warm_up_steps("auto", STEPS)
    assert r["auto_long"][1].count("warm-up") == warm_up_steps("auto", 2 * STEPS)
    assert r["warm_up_steps"] == warm_up_steps("auto", 2 * STEPS)  # what the last loop ran, in the summary
    exact, kinds = r["0.99"]
    assert kinds == ["warm-up"] * STEPS
    torch.testing.assert_close(exact, r["reference"][0], rtol=1e-6, atol=1e-6)


def test_the_fidelity_rule_measures_the_warm_up_a_fraction_means(runs):
    for r in runs.values():
        count, fraction = r[f"measured_{STEPS // 2}"], r["measured_0.5"]
        assert "fidelity rule: predicted error" in fraction[1] and fraction[1] == count[1]
        assert torch.equal(fraction[0], count[0])
