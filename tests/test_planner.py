"""The planner on made-up costs: optimal against brute force; plans as data."""

from __future__ import annotations

import itertools
import random

import pytest

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.planner import Value, best_contiguous, stage_times


def brute_force(costs, values, n_stages, bandwidth):
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), n_stages - 1):
        starts = (0, *cuts)
        worst = max(stage_times(costs, values, starts, bandwidth))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 9)
    costs = [rng.uniform(0.1, 5.0) for _ in range(n)]
    values = [Value(i, tuple(sorted(rng.sample(range(i + 1, n), rng.randint(0, n - i - 1)))), rng.randint(0, 100))
              for i in range(n - 1)]
    for n_stages in range(1, min(n, 5) + 1):
        for bandwidth in (None, 50.0):
            starts = best_contiguous(costs, values, n_stages, bandwidth)
            assert len(starts) == n_stages and starts[0] == 0 and list(starts) == sorted(set(starts))
            got = max(stage_times(costs, values, starts, bandwidth))
            assert got == pytest.approx(brute_force(costs, values, n_stages, bandwidth))


def test_communication_moves_the_cut():
    # Cutting after block 1 would receive a large skip connection; with a slow link the planner
    # prefers the other, compute-wise equal cut.
    costs = [1.0, 1.0, 1.0, 1.0]
    values = [Value(0, (1, 3), 1000), Value(1, (2,), 10), Value(2, (3,), 10)]
    assert best_contiguous(costs, values, 2, None) == (0, 2)
    assert stage_times(costs, values, (0, 2), 100.0)[1] == pytest.approx(2.0 + 1010 / 100)
    assert best_contiguous(costs, values, 2, 100.0) == (0, 3)


def test_more_stages_than_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"stages=5 but the traced denoiser has only 3 blocks; use stages <= 3"):
        best_contiguous([1, 2, 3], [], 5)


def test_plan_json_round_trip_and_validation():
    plan = Plan(stages=(("a", "b"), ("c",)), costs=(2.0, 1.0), cost_unit="s")
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.stage_of("c") == 1 and plan.imbalance == pytest.approx(2.0 / 1.5)
    with pytest.raises(ValueError, match="block 'a' is in stage 0 and in stage 1"):
        Plan(stages=(("a",), ("a",)))
    with pytest.raises(ValueError, match="not in any stage"):
        plan.check_covers(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="contiguous"):
        Plan(stages=(("a", "c"), ("b",))).check_covers(["a", "b", "c"])
