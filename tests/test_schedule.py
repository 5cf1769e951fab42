"""The schedule is a printable value."""

from __future__ import annotations

import pytest

from asyncdiff.engine.schedule import Schedule


def test_grid_shows_stale_inputs_after_warm_up():
    schedule = Schedule(n_stages=3, warm_up=2)
    assert [schedule.synchronous(t) for t in range(4)] == [True, True, False, False]
    assert [schedule.input_step(3, k) for k in range(3)] == [3, 2, 2]
    lines = schedule.format(3).splitlines()
    assert lines[0] == "step | stage 0 | stage 1 | stage 2"
    assert lines[3].split("|")[2].strip() == "t-1" and lines[2].split("|")[2].strip() == "t"


@pytest.mark.parametrize("kwargs, match", [
    ({"n_stages": 2, "warm_up": -1}, "warm_up=-1 must be >= 0"),
    ({"n_stages": 0, "warm_up": 1}, "n_stages=0"),
])
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)
