"""Note [one interpreter]: the in-process run of a plan (every rank in one process, the
in-process transport) computes what the engine computes on a process group, bit for bit, for
every schedule the engine runs: stride 2, time shift, a narrow transfer dtype, compensation."""

from __future__ import annotations

import pytest
import torch
from toys import ToyDenoiser, engine_schedule_run, fixed_calls

from pool import launch
from asyncdiff.engine.local import AsyncSimulator, LocalChannel, Mailbox
from asyncdiff.engine.schedule import Schedule
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import trace_denoiser

STEPS = 6


def _simulated(plan, steps: int, warm_up: int, **settings) -> list[torch.Tensor]:
    torch.manual_seed(0)
    toy = ToyDenoiser()
    calls = fixed_calls(steps)
    traced = trace_denoiser(toy, *calls[0], latent="sample")
    simulator = AsyncSimulator(traced, split_graph(traced, plan), toy, warm_up, settings.pop("compensate", "none"),
                               lambda step: float(steps - step), timestep_arg="timestep", **settings)
    with torch.no_grad():
        return [simulator(*args, **kwargs)[0] for args, kwargs in calls]


@pytest.mark.slow
@pytest.mark.parametrize("nprocs, settings", [
    (3, {"stride": 2}),
    (3, {"stride": 2, "time_shift": True, "transfer_dtype": "float8"}),
    (2, {"time_shift": True}),
    (3, {"transfer_dtype": "bfloat16", "compensate": "linear", "layout": "wrapped"}),
], ids=["stride2", "stride2-shift-fp8", "shift", "bf16-linear-wrapped"])
def test_the_in_process_run_is_the_engine_s_bit_for_bit(nprocs, settings):
    engine, plan = launch(engine_schedule_run, nprocs, STEPS, 1, *[settings.get(k, d) for k, d in (
        ("stride", 1), ("time_shift", False), ("transfer_dtype", None), ("compensate", "none"),
        ("layout", "contiguous"))])[0]
    settings.pop("layout", None)
    simulated = _simulated(plan, STEPS, 1, **settings)
    for step, (got, want) in enumerate(zip(simulated, engine)):
        assert torch.equal(got, want), f"step {step}: {(got - want).abs().max().item():.3g}"
    sequential = _simulated(plan, STEPS, STEPS, **settings)
    assert not torch.equal(simulated[-1], sequential[-1])  # the schedule's stale inputs do change the output


def test_stride_2_in_process_warms_up_exactly_then_goes_its_own_way():
    """One process, three ranks: a full warm-up under stride 2 is the sequential model; rounds and
    reuse steps after it are not."""
    torch.manual_seed(0)
    toy = ToyDenoiser()
    calls = fixed_calls(STEPS)
    traced = trace_denoiser(toy, *calls[0], latent="sample")
    from asyncdiff.partition.plan import Plan

    split = split_graph(traced, Plan(stages=(tuple(traced.blocks[:3]), tuple(traced.blocks[3:]))))
    with torch.no_grad():
        sequential = [toy(*args, **kwargs)[0] for args, kwargs in calls]
        exact = _simulated(split.plan, STEPS, STEPS, stride=2)
        rounds = _simulated(split.plan, STEPS, 2, stride=2)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(exact, sequential))
    assert [str(Schedule(2, 2, stride=2).kind(t)) for t in range(STEPS)] == ["warm-up"] * 2 + ["round", "reuse"] * 2
    assert torch.equal(rounds[1], exact[1]) and not torch.equal(rounds[-1], exact[-1])


def test_a_receive_without_a_send_names_the_message():
    torch.manual_seed(0)
    toy = ToyDenoiser()
    calls = fixed_calls(2)
    traced = trace_denoiser(toy, *calls[0], latent="sample")
    from asyncdiff.partition.plan import Plan

    split = split_graph(traced, Plan(stages=(tuple(traced.blocks[:3]), tuple(traced.blocks[3:]))))
    channel = LocalChannel(Mailbox(), 1, split.stages[1], len(split.segments), {0: [0], 1: [1]}, torch.device("cpu"))
    pending = channel.post({}, [], channel.recv_keys, exact=True)
    assert not channel.ready(pending)
    with pytest.raises(RuntimeError, match=r"rank 1 waits for message\(s\) \[\(0, 1\)\] that no rank has sent"):
        channel.wait(pending)
