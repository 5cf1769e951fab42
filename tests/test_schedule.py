"""The schedule is a printable value: what each rank computes at each step."""

from __future__ import annotations

import pytest

from asyncdiff.engine.schedule import Schedule, StepKind


def cells(schedule, steps):
    return [[c.strip() for c in line.split("|")[1:]] for line in schedule.format(steps).splitlines()[1:]]


def test_stride_1_grid_shows_stale_inputs_after_warm_up():
    schedule = Schedule(n_stages=3, warm_up=2)
    assert [schedule.kind(t) for t in range(4)] == [StepKind.WARM_UP] * 2 + [StepKind.ASYNC] * 2
    assert [schedule.input_step(3, k) for k in range(3)] == [3, 2, 2]
    grid = cells(schedule, 4)
    assert grid[1] == ["t", "t", "t"] and grid[3] == ["t", "t (in t-1)", "t (in t-1)"]


def test_first_step_is_always_sequential():
    assert Schedule(n_stages=2, warm_up=0).kind(0) == StepKind.WARM_UP


def test_stride_2_rounds_and_reuse_steps():
    schedule = Schedule(n_stages=2, warm_up=1, stride=2)
    assert [schedule.kind(t) for t in range(5)] == ["warm-up", "round", "reuse", "round", "reuse"]
    # ranks 0 and 1 compute step s + 1's prediction, the extra rank 2 step s's, on the previous round's values
    assert [schedule.timestep_step(3, r) for r in range(3)] == [4, 4, 3]
    assert [schedule.input_step(3, r) for r in range(3)] == [3, 1, 1]
    assert [schedule.input_step(1, r) for r in range(3)] == [1, 0, 0]  # the first round reads the warm-up step
    assert cells(schedule, 3)[2] == ["-", "-", "-"]


def test_time_shift_feeds_the_previous_timestep_after_warm_up():
    schedule = Schedule(n_stages=2, warm_up=2, time_shift=True)
    assert [schedule.timestep_step(t, 1) for t in range(4)] == [0, 1, 1, 2]
    shifted = Schedule(n_stages=2, warm_up=1, stride=2, time_shift=True)
    assert [shifted.timestep_step(1, r) for r in range(3)] == [1, 1, 0]


def test_refresh_runs_every_kth_step_after_warm_up_sequentially():
    schedule = Schedule(n_stages=2, warm_up=2, refresh_every=3)
    kinds = [schedule.kind(t) for t in range(9)]
    assert kinds == ["warm-up", "warm-up", "async", "async", "refresh", "async", "async", "refresh", "async"]
    assert schedule.input_step(4, 1) == 4 and schedule.input_step(5, 1) == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"n_stages": 2, "warm_up": -1}, "warm_up=-1 must be >= 0"),
    ({"n_stages": 0, "warm_up": 1}, "n_stages=0"),
    ({"n_stages": 2, "warm_up": 1, "stride": 3}, "stride=3 must be 1 or 2"),
])
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)
