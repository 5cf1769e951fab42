"""Note [predicted drift]: the one-process simulation of asynchronous steps is the engine's
schedule, so the drift it predicts is the drift the engine adds."""

from __future__ import annotations

import pytest
import torch
from toys import ToyDenoiser, fixed_calls, fixed_input_engine

from pool import launch
from asyncdiff.engine.schedule import Layout, SegmentIO
from asyncdiff.partition.auto import auto_plan
from asyncdiff.engine.drift import predicted_drift, simulate_async
from asyncdiff.engine.local import AsyncSimulator
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.report import LINKS
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import trace_denoiser

STEPS = 5


def _split(layout: str, model_n: int):
    torch.manual_seed(0)
    toy = ToyDenoiser()
    calls = fixed_calls(STEPS)
    traced = trace_denoiser(toy, *calls[0], latent="sample")
    plan = auto_plan(traced, profile_blocks(traced, toy, *calls[0], measure_time=False), model_n, cost="flops",
                     layouts=(layout,), bandwidth=LINKS["gloo"].planner_bandwidth("flop"))  # as the engine plans
    return toy, calls, traced, split_graph(traced, plan)


@pytest.mark.parametrize("layout, model_n", [("contiguous", 2), ("contiguous", 3), ("wrapped", 2), ("wrapped", 3)])
def test_simulation_is_what_the_engine_computes(layout, model_n):
    toy, calls, traced, split = _split(layout, model_n)
    simulated = simulate_async(traced, split, toy, [traced.flatten_call(*c) for c in calls], warm_up=1)
    engine, plan = launch(fixed_input_engine, model_n, layout, STEPS, 1)[0]
    assert plan == split.plan
    for step, (got, want) in enumerate(zip(engine, simulated)):
        torch.testing.assert_close(got, want[0], rtol=1e-6, atol=1e-6, msg=f"step {step}")
    with torch.no_grad():
        sequential = [toy(*args, **kwargs)[0] for args, kwargs in calls]
    assert not torch.allclose(simulated[-1][0], sequential[-1])  # stale inputs do change the output


def test_predicted_drift_is_zero_at_full_warm_up_and_grows_with_stages():
    drifts = {}
    for model_n in (2, 3):
        toy, calls, traced, split = _split("contiguous", model_n)
        assert predicted_drift(traced, split, toy, calls, warm_up=STEPS) == 0.0
        drifts[model_n] = predicted_drift(traced, split, toy, calls)
    assert 0 < drifts[2] < drifts[3]


def test_a_schedule_that_would_hang_is_an_error():
    """The simulator executes the programs the engine executes: a rank waiting for a message that
    no rank sends in that step is a schedule the engine would hang on."""
    toy, calls, traced, split = _split("contiguous", 2)
    simulator = AsyncSimulator(traced, split, toy)
    layout = simulator.compiled[0].layout
    (head,), (tail,) = layout.stages
    for compiled in simulator.compiled:  # stage 0 never sends
        compiled.layout = Layout(((SegmentIO(head.index),), (tail,)), layout.output_stage)
    with pytest.raises(RuntimeError, match=r"the schedule hangs at step 0: every rank waits \(\{0: 'out1', 1: 'recv 0>1'\}\)"):
        simulator(*calls[0][0], **calls[0][1])
