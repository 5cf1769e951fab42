"""The planner on made-up costs: optimal against brute force; plans as data."""

from __future__ import annotations

import itertools
import random

import pytest

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.planner import (
    Value,
    best_assignment,
    best_contiguous,
    best_wrapped,
    candidates,
    main_path_depth,
    stage_times,
)


def contiguous_assignments(n, model_n):
    for cuts in itertools.combinations(range(1, n), model_n - 1):
        bounds = (0, *cuts, n)
        yield tuple(k for k, (i, j) in enumerate(zip(bounds, bounds[1:])) for _ in range(i, j))


def wrapped_assignments(n, model_n):
    # stage 0 = [0, a) + [b, n); stages 1.. split [a, b)
    for a in range(1, n):
        for b in range(a + 1, n):
            for middle in contiguous_assignments(b - a, model_n - 1):
                yield (0,) * a + tuple(s + 1 for s in middle) + (0,) * (n - b)


def brute_force(costs, values, model_n, bandwidth, layouts=("contiguous",)):
    candidates = []
    if "contiguous" in layouts:
        candidates += list(contiguous_assignments(len(costs), model_n))
    if "wrapped" in layouts and model_n >= 2:
        candidates += list(wrapped_assignments(len(costs), model_n))
    return min(max(stage_times(costs, values, a, bandwidth)) for a in candidates)


def starts_to_assignment(starts, n):
    bounds = list(starts) + [n]
    return tuple(k for k, (i, j) in enumerate(zip(bounds, bounds[1:])) for _ in range(i, j))


def random_problem(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 9)
    costs = [rng.uniform(0.1, 5.0) for _ in range(n)]
    values = [Value(i, tuple(sorted(rng.sample(range(i + 1, n), rng.randint(0, n - i - 1)))), rng.randint(0, 100))
              for i in range(n - 1)]
    return n, costs, values


@pytest.mark.parametrize("seed", range(20))
def test_contiguous_dp_matches_brute_force(seed):
    n, costs, values = random_problem(seed)
    for model_n in range(1, min(n, 5) + 1):
        for bandwidth in (None, 50.0):
            starts = best_contiguous(costs, values, model_n, bandwidth)
            assert len(starts) == model_n and starts[0] == 0 and list(starts) == sorted(set(starts))
            got = max(stage_times(costs, values, starts_to_assignment(starts, n), bandwidth))
            assert got == pytest.approx(brute_force(costs, values, model_n, bandwidth))


@pytest.mark.parametrize("seed", range(20))
def test_wrapped_and_best_layout_match_brute_force(seed):
    n, costs, values = random_problem(seed)
    for model_n in range(2, min(n - 1, 4) + 1):
        for bandwidth in (None, 50.0):
            time, assignment = best_wrapped(costs, values, model_n, bandwidth)
            assert assignment[0] == 0 and assignment[-1] == 0 and set(assignment) == set(range(model_n))
            assert max(stage_times(costs, values, assignment, bandwidth)) == pytest.approx(time)
            assert time == pytest.approx(brute_force(costs, values, model_n, bandwidth, ("wrapped",)))
            best = best_assignment(costs, values, model_n, bandwidth, max_slowdown=0.0)
            assert max(stage_times(costs, values, best, bandwidth)) == pytest.approx(
                brute_force(costs, values, model_n, bandwidth, ("contiguous", "wrapped")))


def test_wrapped_keeps_a_long_skip_connection_local():
    # block 0 feeds block 5 with a large tensor (a UNet's conv_in -> last up block)
    costs = [1.0] * 6
    values = [Value(0, (1, 5), 1000)] + [Value(i, (i + 1,), 1) for i in range(1, 5)]
    assert best_assignment(costs, values, 3, None, ("contiguous",)) == (0, 0, 1, 1, 2, 2)
    assert best_assignment(costs, values, 3, 10.0) == (0, 0, 1, 1, 2, 0)


def test_main_path_depth_counts_stage_crossings():
    chain = [Value(i, (i + 1,), 1) for i in range(5)]
    for model_n in (2, 3, 4):  # contiguous: N - 1 crossings; wrapped: N (out of stage 0 and back)
        contiguous = tuple(i * model_n // 6 for i in range(6))
        assert main_path_depth(chain, contiguous) == model_n - 1
        wrapped = (0, *(1 + i * (model_n - 1) // 4 for i in range(4)), 0)
        assert main_path_depth(chain, wrapped) == model_n
    # a skip connection from block 0 to block 5 is one crossing: not deeper than the main path
    skip = chain + [Value(0, (5,), 1000)]
    assert main_path_depth(skip, (0, 0, 0, 1, 1, 1)) == 1
    assert main_path_depth(skip, (0, 0, 0, 0, 0, 0)) == 0


def test_default_plan_is_the_least_stale_within_five_percent_of_the_fastest():
    # a skip connection 0 -> 5 that a contiguous 2-stage plan must send; the wrapped plan keeps it local
    costs = [1.0] * 6
    values = [Value(0, (1, 5), 1000)] + [Value(i, (i + 1,), 1) for i in range(1, 5)]
    for slower, want in ((0.03, "contiguous"), (0.10, "wrapped")):
        bandwidth = 1001 / (3 * slower)  # the contiguous plan's step is 3 * (1 + slower)
        found = {c.layout: c for c in candidates(costs, values, 2, bandwidth)}
        assert found["contiguous"].step == pytest.approx(3 * (1 + slower))
        assert (found["contiguous"].depth, found["wrapped"].depth) == (1, 2)
        assert found["wrapped"].step < found["contiguous"].step
        assert best_assignment(costs, values, 2, bandwidth) == found[want].assignment
        assert best_assignment(costs, values, 2, bandwidth, max_slowdown=0.0) == found["wrapped"].assignment
        assert best_assignment(costs, values, 2, bandwidth, max_slowdown=1.0) == found["contiguous"].assignment
    with pytest.raises(ValueError, match=r"max_slowdown=-0.1 must be >= 0"):
        best_assignment(costs, values, 2, max_slowdown=-0.1)


def test_communication_moves_the_cut():
    # Cutting after block 1 would receive a large skip connection; with a slow link the planner
    # prefers the other, compute-wise equal cut.
    costs = [1.0, 1.0, 1.0, 1.0]
    values = [Value(0, (1, 3), 1000), Value(1, (2,), 10), Value(2, (3,), 10)]
    assert best_contiguous(costs, values, 2, None) == (0, 2)
    assert stage_times(costs, values, (0, 0, 1, 1), 100.0)[1] == pytest.approx(2.0 + 1010 / 100)
    assert best_contiguous(costs, values, 2, 100.0) == (0, 3)


def test_more_stages_than_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"stages=5 but the traced denoiser has only 3 blocks; use stages <= 3"):
        best_contiguous([1, 2, 3], [], 5)
    with pytest.raises(ValueError, match=r"layouts=\('diagonal',\)"):
        best_assignment([1, 2, 3], [], 2, layouts=("diagonal",))


def test_plan_json_round_trip_and_validation():
    plan = Plan(stages=(("a", "b"), ("c",)), costs=(2.0, 1.0), cost_unit="s")
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.stage_of("c") == 1 and plan.imbalance == pytest.approx(2.0 / 1.5)
    with pytest.raises(ValueError, match="block 'a' is in stage 0 and in stage 1"):
        Plan(stages=(("a",), ("a",)))
    with pytest.raises(ValueError, match="not in any stage"):
        plan.check_covers(["a", "b", "c", "d"])
    Plan(stages=(("a", "c"), ("b",))).check_covers(["a", "b", "c"])  # a wrapped plan is valid


def test_a_byte_plan_balances_the_weights_a_flop_plan_does_not():
    """cost="bytes": each stage holds about its share of the weights (a UNet's weights sit in its
    low-resolution blocks, its FLOPs in the high-resolution ones)."""
    from asyncdiff.adapters.capture import capture_denoiser_call
    from asyncdiff.models.sd import build_sd15
    from asyncdiff.partition.auto import auto_plan
    from asyncdiff.partition.profile import profile_blocks
    from asyncdiff.partition.trace import trace_denoiser

    pipe = build_sd15("bench", 0)
    args, kwargs = capture_denoiser_call(pipe, "unet", prompt="a cat")
    traced = trace_denoiser(pipe.unet, args, kwargs)
    costs = profile_blocks(traced, pipe.unet, args, kwargs, measure_time=False)
    total = sum(c.param_bytes for c in costs.values())
    share = {}
    for cost in ("flops", "bytes"):
        plan = auto_plan(traced, costs, 2, cost=cost, layouts=("contiguous",))
        share[cost] = max(sum(costs[b].param_bytes for b in stage) for stage in plan.stages) / total
        assert plan.cost_unit == {"flops": "flop", "bytes": "byte"}[cost]
    assert share["bytes"] <= 0.55 < share["flops"]
