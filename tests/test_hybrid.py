"""Guidance- and batch-parallel slices composed with stale stages (Note [hybrid mesh]), and the
automatic choice between them (Note [choosing the mesh])."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.launch import launch as launch_fresh
from pool import launch
from asyncdiff.engine.mesh import concat_chunks, split_batch, verify_batch_split
from asyncdiff.engine.runtime import EngineConfig, stages_for
from asyncdiff.partition.hybrid import ParallelOption, choose_parallel, format_options, parallel_degrees
from toys import ToyDenoiser, hybrid_scenarios, hybrid_variants, two_call_hybrid

STEPS = 4
# A split batch changes GEMM shapes, so the last bits may differ (Note [batch split]); over 4
# steps of the tiny UNet (latents of magnitude ~3) that is ~1e-4, far below what a stale input does (~0.9).
SPLIT_NOISE = 1e-3


def test_degrees_of_a_world():
    assert parallel_degrees(2, 1, 2, guided=True) == [(1, 1, 2), (2, 1, 1)]
    assert parallel_degrees(2, 1, 1, guided=False) == [(1, 1, 2)]  # an odd batch cannot split
    assert parallel_degrees(4, 1, 4, guided=True) == [(1, 1, 4), (2, 1, 2), (2, 2, 1)]
    assert parallel_degrees(4, 1, 4, guided=None) == [(1, 1, 4), (1, 2, 2), (1, 4, 1)]
    assert parallel_degrees(4, 2, 2, guided=True) == [(1, 1, 3)]  # stride 2 needs 2 stages in a slice
    assert parallel_degrees(4, 1, 1, guided=True) == [(1, 1, 4), (2, 1, 2)]  # guidance as two calls per step
    assert parallel_degrees(4, 1, 3, guided=None) == [(1, 1, 4)]
    assert stages_for(8, 1, 2) == 4 and stages_for(6, 2, 2) == 2
    with pytest.raises(ValueError, match=r"no way to run a batch of 2 on 2 processes with stride=2"):
        parallel_degrees(2, 2, 2, guided=True)


def test_choice_takes_exact_dimensions_unless_stages_pay():
    stages = ParallelOption(1, 1, 2, step=0.50, depth=1)
    exact = ParallelOption(2, 1, 1, step=0.52, depth=0)
    assert choose_parallel([stages, exact]) == exact  # within 5 % of the fastest: the exact one
    assert choose_parallel([stages, exact], max_slowdown=0.0) == stages
    slow_exact = ParallelOption(2, 1, 1, step=0.9, depth=0)
    assert choose_parallel([stages, slow_exact]) == stages  # stages pay
    mixed = ParallelOption(2, 1, 2, step=0.5, depth=1)
    assert choose_parallel([stages, mixed]) == stages  # equally stale and fast: fewer stages
    table = format_options([stages, slow_exact], stages)
    assert table.splitlines() == [
        "* guidance 1 x batch 1 x stages 2: step 0.5 s (1.80x the slowest), main path 1 step(s) stale",
        "  guidance 2 x batch 1 x stages 1: step 0.9 s (1.00x the slowest), exact"]


@pytest.mark.parametrize("kwargs, match", [
    ({"model_n": 2, "guidance": 3}, r"guidance=3 must be 1 or 2"),
    ({"model_n": 2, "batch": 0}, r"batch=0 must be an integer >= 1"),
    ({"model_n": 2, "parallel": "fast"}, r"parallel='fast' must be None \(the degrees as given\) or 'auto'"),
])
def test_bad_degrees(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_split_and_concat_touch_batched_tensors_only():
    x, t, ids = torch.randn(4, 3), torch.tensor(7.0), torch.arange(5)
    chunk = split_batch({"x": x, "t": t, "ids": ids, "n": 3}, 4, 2, 1)
    assert torch.equal(chunk["x"], x[2:]) and chunk["t"] is t and chunk["ids"] is ids and chunk["n"] == 3
    merged = concat_chunks([(x[:2], t), (x[2:], t)], 2)
    assert torch.equal(merged[0], x) and merged[1] is t


class _BatchMixer(ToyDenoiser):
    """Subtracts the batch mean: a denoiser whose samples are not independent."""

    def forward(self, sample, timestep):
        out = super().forward(sample, timestep)
        return {"sample": out["sample"] - out["sample"].mean(0, keepdim=True)}


def test_the_split_check_accepts_independent_samples_and_names_mixing():
    torch.manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0])
    with torch.no_grad():
        assert verify_batch_split(ToyDenoiser(), (x, t), {}, 4, 2) is None
        error = verify_batch_split(_BatchMixer(), (x, t), {}, 4, 2)
    assert error is not None and error.startswith("_BatchMixer gives other values on a split batch: output 0 differs")
    assert error.endswith("use guidance=1, batch=1 (stages only)")


@pytest.fixture(scope="module")
def two_stages():
    """The 2-stage run every slice of the 4-process runs repeats (FLOP plan: the same every run)."""
    return launch(hybrid_scenarios, 2, 1, 1, STEPS, 1)[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_guidance_parallel_equals_the_sequential_pipeline():
    results = launch(hybrid_scenarios, 2, 2, 1, STEPS, 1)
    for r in results.values():
        assert r["degrees"] == (2, 1, 1)
        assert _close(r["exact"], r["reference"]) < SPLIT_NOISE
        torch.testing.assert_close(r["stale"], r["exact"], rtol=0, atol=0)  # no stages: nothing is stale
        torch.testing.assert_close(r["exact"], results[0]["exact"], rtol=0, atol=0)


@pytest.mark.slow
def test_guidance_2_x_stages_2_is_the_2_stage_run_in_each_slice(two_stages):
    results = launch(hybrid_scenarios, 4, 2, 1, STEPS, 1, two_stages["plan"].to_json())
    assert _close(two_stages["stale"], two_stages["reference"]) > 0.1  # the stages really are stale
    for r in results.values():
        assert r["degrees"] == (2, 1, 2) and r["plan"] == two_stages["plan"]
        assert _close(r["exact"], r["reference"]) < SPLIT_NOISE
        assert _close(r["stale"], two_stages["stale"]) < SPLIT_NOISE
        torch.testing.assert_close(r["stale"], results[0]["stale"], rtol=0, atol=0)


def test_batch_2_x_stages_2_splits_the_prompts(two_stages):
    results = launch(hybrid_scenarios, 4, 1, 2, STEPS, 2, two_stages["plan"].to_json(), 1.0)
    for r in results.values():
        assert r["degrees"] == (1, 2, 2)
        assert _close(r["exact"], r["reference"]) < SPLIT_NOISE
        assert _close(r["stale"], r["reference"]) > 0.1


def test_auto_takes_guidance_where_the_pipeline_batches_it_and_stages_where_not():
    guided = launch(hybrid_scenarios, 2, 1, 1, STEPS, 1, None, 7.5, "auto")[0]
    assert guided["options"] == [(1, 1, 2, 1), (2, 1, 1, 0)] and guided["degrees"] == (2, 1, 1)
    assert _close(guided["exact"], guided["reference"]) < SPLIT_NOISE
    plain = launch(hybrid_scenarios, 2, 1, 1, STEPS, 1, None, 1.0, "auto")[0]
    assert plain["options"] == [(1, 1, 2, 1)] and plain["degrees"] == (1, 1, 2)


@pytest.mark.slow
def test_guidance_parallel_without_guidance_stops_every_rank_with_the_arithmetic():
    """The first step may be a step of two calls (Note [two-call guidance]); the second step knows."""
    with pytest.raises(ValueError, match=r"\[rank 0 \| stage 0 \| step 1\] ValueError: this denoiser call's batch is 1, "
                                               r"which guidance=2 x batch=1 = 2 slices cannot split evenly: "
                                               r"guidance=2 needs a pipeline with classifier-free guidance"):
        launch_fresh(hybrid_scenarios, 2, 2, 1, STEPS, 1, None, 1.0, timeout_s=60)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.slow
def test_every_engine_option_runs_the_same_in_each_guidance_slice(two_stages, stride):
    """Time shift, narrow transfers, refresh and stride 2 inside guidance slices: each slice is the
    stages-only run on its half of the batch (float noise apart)."""
    plan = two_stages["plan"].to_json()
    alone = launch(hybrid_variants, 1 + stride, 1, STEPS, plan, stride)[0]
    sliced = launch(hybrid_variants, 2 * (1 + stride), 2, STEPS, plan, stride)
    assert sorted(alone) == (["bfloat16", "plain", "refresh_2", "time_shift"] if stride == 1 else ["plain", "time_shift"])
    for r in sliced.values():
        for label, latents in alone.items():
            assert _close(r[label], latents) < SPLIT_NOISE, label
    assert _close(alone["time_shift"], alone["plain"]) > 1e-3  # the options do change the result


@pytest.fixture(scope="module")
def two_call_stages():
    """The two-call pipeline on 2 stages with a branch state each (Note [branches])."""
    return launch(two_call_hybrid, 2, 1, STEPS)[0]


@pytest.mark.slow
def test_two_call_guidance_on_two_slices_is_the_sequential_pipeline_bit_for_bit():
    """Note [two-call guidance]: each slice runs one of a step's two calls, the second predicted and
    checked; where the second call's arguments move every step, the check fails and it is recomputed."""
    for r in launch(two_call_hybrid, 2, 2, STEPS).values():
        torch.testing.assert_close(r["exact"], r["plain"], rtol=0, atol=0)
        torch.testing.assert_close(r["stale"], r["plain"], rtol=0, atol=0)
        assert r["calls"] == 2 + (STEPS - 1)  # both calls in the first step, then one per step
        torch.testing.assert_close(r["drifting"], r["drifting_plain"], rtol=0, atol=0)


@pytest.mark.slow
def test_two_call_guidance_x_stages_2_is_the_2_stage_run_in_each_slice(two_call_stages):
    results = launch(two_call_hybrid, 4, 2, STEPS, two_call_stages["plan"].to_json())
    assert _close(two_call_stages["stale"], two_call_stages["plain"]) > 0.1
    for rank, r in results.items():
        torch.testing.assert_close(r["exact"], r["plain"], rtol=0, atol=0)
        torch.testing.assert_close(r["stale"], two_call_stages["stale"], rtol=0, atol=0)
        assert r["drifting"].endswith("but this pipeline's second call differed; use guidance=1")
        assert r["drifting"].startswith(f"StageError: [rank {rank} | stage {0 if rank in (0, 2) else 1} | step 1]")
