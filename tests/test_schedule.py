"""The schedule is the program: what each rank executes at each step, and the same thing printed."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.schedule import (Exchange, Layout, Recv, Run, Schedule, Send, Share, Signals, StepKind,
                                       decide_step, needs_drift)
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import trace_denoiser


def cells(schedule, steps, layout=None):
    """The grid's rank cells, by step."""
    return [[c.strip() for c in line.split("|")[2:]] for line in schedule.format(steps, layout).splitlines()[1:]]


def wrapped_split(model_n=2):
    """A chain of six linear blocks, planned wrapped: stage 0 holds the first and the last blocks."""
    net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
    traced = trace_denoiser(net, (torch.randn(2, 4),), {})
    stages = (("0", "5"), ("1", "2", "3", "4")) if model_n == 2 else (("0", "5"), ("1", "2"), ("3", "4"))
    return split_graph(traced, Plan(stages=stages))


def test_stride_1_grid_shows_stale_inputs_after_warm_up():
    schedule = Schedule(model_n=3, warm_up=2)
    assert [schedule.kind(t) for t in range(4)] == [StepKind.WARM_UP] * 2 + [StepKind.ASYNC] * 2
    grid = cells(schedule, 4)
    assert grid[1] == ["s0 send 0>1 out2", "recv 0>1 s1 send 1>2 out2", "recv 1>2 s2 out"]
    assert grid[3] == ["s0 send 0>1 out2", "s1[t-1] send 1>2 next 0>1 out2", "s2[t-1] next 1>2 out"]
    # the grid prints the very actions the engine executes
    assert schedule.program(3, 1).actions == (Run(1, age=1), Exchange(((1, 2),), ((0, 1),)), Share(2))
    assert schedule.program(0, 1).actions == (Recv(((0, 1),)), Run(1), Send(((1, 2),)), Share(2))


def test_wrapped_plan_grid_shows_the_tail_two_steps_behind_the_head():
    split = wrapped_split()
    layout = Layout.of(split)
    assert [[s.index for s in stage] for stage in layout.stages] == [[0, 2], [1]] and layout.output_stage == 0
    grid = cells(Schedule(model_n=2, warm_up=1), 3, layout)
    # warm-up: stage 0's tail waits for this step's values from stage 1
    assert grid[0] == ["s0 send 0>1 recv 1>2 s2 out", "recv 0>1 s1 send 1>2 out0"]
    # asynchronous: the head reads nothing stale, the tail reads stage 1's values of t-1, which
    # stage 1 computed from the head's values of t-1 at t-1: the output is two steps behind
    assert grid[2] == ["s0 s2[t-1] send 0>1 next 1>2 out", "s1[t-1] send 1>2 next 0>1 out0"]


def test_three_stage_wrapped_plan():
    grid = cells(Schedule(model_n=3, warm_up=1), 2, Layout.of(wrapped_split(3)))
    assert grid[1] == ["s0 s3[t-1] send 0>1 next 2>3 out", "s1[t-1] send 1>2 next 0>1 out0",
                       "s2[t-1] send 2>3 next 1>2 out0"]


def test_first_step_is_always_sequential():
    assert Schedule(model_n=2, warm_up=0).kind(0) == StepKind.WARM_UP


def test_stride_2_rounds_and_reuse_steps():
    schedule = Schedule(model_n=2, warm_up=1, stride=2)
    assert [schedule.kind(t) for t in range(5)] == ["warm-up", "round", "reuse", "round", "reuse"]
    grid = cells(schedule, 4)
    # ranks 0 and 1 compute step s + 1's prediction, the extra rank 2 step s's, on the previous round's
    # values (the first round: the warm-up step's); the extra rank shares the round's output
    assert grid[0] == ["s0 send 0>1 out1", "recv 0>1 s1 out", "recv 0>1 out1"]
    assert grid[1] == ["@t+1 s0 send 0>1 out2", "@t+1 s1[t-1] next 0>1 out2", "s1[t-1] next 0>1 out"]
    assert grid[3][1:] == ["@t+1 s1[t-2] next 0>1 out2", "s1[t-2] next 0>1 out"]
    assert grid[2] == ["out1", "reuse out", "out1"]  # rank 1 kept step s + 1's prediction


def test_stride_2_refuses_a_last_stage_that_sends():
    with pytest.raises(ValueError, match="last stage must send nothing"):
        Schedule(model_n=2, warm_up=1, stride=2).program(1, 0, Layout.of(wrapped_split()))


def test_time_shift_feeds_the_previous_timestep_after_warm_up():
    schedule = Schedule(model_n=2, warm_up=2, time_shift=True)
    assert [schedule.program(t, 1).timestep for t in range(4)] == [0, 1, 1, 2]
    assert cells(schedule, 3)[2][1] == "@t-1 s1[t-1] next 0>1 out"
    shifted = Schedule(model_n=2, warm_up=1, stride=2, time_shift=True)
    assert [shifted.program(1, r).timestep for r in range(3)] == [1, 1, 0]


def test_refresh_runs_every_kth_step_after_warm_up_sequentially():
    schedule = Schedule(model_n=2, warm_up=2, refresh_every=3, time_shift=True)
    kinds = [schedule.kind(t) for t in range(9)]
    assert kinds == ["warm-up", "warm-up", "async", "async", "refresh", "async", "async", "refresh", "async"]
    grid = cells(schedule, 6)
    assert grid[4][1] == "recv 0>1 s1 out" and grid[5][1] == "@t-1 s1[t-1] next 0>1 out"
    # a step the engine turns into a refresh (a late branch, adaptive refresh) runs as one, unshifted
    refresh = decide_step(schedule, 3, Signals(drift=0.5, drift_limit=0.1))
    assert str(schedule.program(3, 1, decision=refresh)) == "recv 0>1 s1 out"


def test_one_stage_runs_alone():
    assert cells(Schedule(model_n=1, warm_up=1), 2) == [["s0"], ["s0"]]


@pytest.mark.parametrize("kwargs, match", [
    ({"model_n": 2, "warm_up": -1}, "warm_up=-1 must be >= 0"),
    ({"model_n": 0, "warm_up": 1}, "model_n=0"),
    ({"model_n": 2, "warm_up": 1, "stride": 3}, "stride=3 must be 1 or 2"),
])
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_every_override_is_decided_in_one_place_with_its_reason():
    """Note [step decision]: a new loop, a late branch and drift are signals of one pure decision;
    the program carries the reason, and without signals the decision is the printed grid's."""
    s = Schedule(model_n=2, warm_up=2)
    assert [decide_step(s, t).kind for t in range(4)] == [s.kind(t) for t in range(4)]
    assert decide_step(s, 1).why == "step 1 < warm_up=2"
    loop = decide_step(s, 5, Signals(new_loop=True))
    assert (loop.step, loop.kind, loop.why) == (0, StepKind.WARM_UP, "a new loop (another call signature): "
                                                                     "step 0 < warm_up=2")
    late = decide_step(s, 4, Signals(new_branch=True, drift=0.9, drift_limit=0.1))
    assert (late.kind, late.why) == (StepKind.REFRESH, "a branch without stale values yet (Note [late branches])")
    assert decide_step(s, 1, Signals(new_branch=True)).kind == StepKind.WARM_UP  # warm-up needs no stale values
    drift = decide_step(s, 4, Signals(drift=0.12, drift_limit=0.05))
    assert (drift.kind, drift.why) == (StepKind.REFRESH, "drift 0.12 > 0.05")
    assert decide_step(s, 4, Signals(drift=0.01, drift_limit=0.05)).kind == StepKind.ASYNC
    assert needs_drift(s, 4, Signals()) and not needs_drift(s, 1, Signals())
    assert not needs_drift(s, 4, Signals(new_branch=True))
    assert s.program(4, 1, decision=drift).why == "drift 0.12 > 0.05"
    with pytest.raises(ValueError, match="stride 2 cannot start it there"):
        decide_step(Schedule(model_n=2, warm_up=1, stride=2), 3, Signals(new_branch=True))
