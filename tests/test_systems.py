"""Every built-in system (the nine seed systems, Wan, the trained digits model) through its
adapter, on 2 processes (stride 1) and 3 (stride 2): exact with every step a warm-up step, close
with warm-up 1, with and without time shift."""

from __future__ import annotations

import pytest
import torch

from pool import launch
from asyncdiff.models.builders import BUILDERS
from toys import system_scenarios

STEPS = 4


@pytest.mark.parametrize("stride", [1, 2], ids=["2-procs-stride-1", "3-procs-stride-2"])
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.slow
def test_system(name, stride, record_property):
    r = launch(system_scenarios, stride + 1, name, STEPS, stride)[0]
    reference = r["reference"]
    for label in ("", "shift_"):
        # with warm-up >= steps there is nothing stale and nothing shifted: the sequential result
        torch.testing.assert_close(r[f"{label}exact"], reference, rtol=1e-5, atol=1e-5)
        stale = r[f"{label}stale"]
        assert torch.isfinite(stale).all()
        deviation = ((stale - reference).norm() / reference.norm()).item()
        record_property(f"{label}deviation", deviation)
        print(f"\n{name} stride {stride} {'time shift ' if label else ''}warm-up 1 of {STEPS}: "
              f"relative deviation {deviation:.4f}")
        assert 0 < deviation < 1.0
