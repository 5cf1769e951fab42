"""Plans that can be trusted: in-place updates traced as such, the split checked against the
denoiser before use (Note [verify]), and the same plan in every run (Note [plan cache])."""

from __future__ import annotations

import operator

import pytest
import torch
from toys import AliasingToy, adapter_scenarios, aliasing_engine, toy_steps

from asyncdiff.engine.launch import launch as launch_fresh
from pool import launch
from asyncdiff.engine.runtime import AsyncEngine, EngineConfig, StageError
from asyncdiff.partition import passes, proxies
from asyncdiff.partition.auto import auto_plan, inplace_spans
from asyncdiff.partition.cache import PlanCache, cached_plan
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import BlockCost, profile_blocks
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import trace_denoiser
from asyncdiff.partition.verify import verify_split


def _call():
    torch.manual_seed(1)
    return (torch.randn(1, 4, 8, 8), torch.tensor([0.7])), {"return_dict": False}


@pytest.fixture
def naive_trace(monkeypatch):
    """The tracer as it was before Note [in-place updates]: ``x += y`` traced as ``x = x + y``."""
    for name in passes.INPLACE_OPS:
        monkeypatch.delattr(proxies.ShapeProxy, name)


def test_inplace_update_is_traced_in_place_and_kept_on_one_stage():
    toy, (args, kwargs) = AliasingToy(), _call()
    traced = trace_denoiser(toy, args, kwargs)
    assert [n.target for n in traced.graph.nodes if n.op == "call_function"].count(operator.iadd) == 1
    with torch.no_grad():
        want = toy(*args, **kwargs)[0]
        got = traced.unflatten_output(list(traced.graph_module(toy)(*traced.flatten_call(args, kwargs))))[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert inplace_spans(traced) == [(0, 2)]  # from `down` (which made h) to `mid` (first block after h +=)
    costs = profile_blocks(traced, toy, args, kwargs, measure_time=False)
    for model_n in (2, 3):
        plan = auto_plan(traced, costs, model_n, cost="flops", layouts=("contiguous",))
        assert plan.stage_of("down") == plan.stage_of("extra") == plan.stage_of("mid"), plan.stages
        assert verify_split(traced, split_graph(traced, plan), toy, args, kwargs) is None


def test_verification_names_the_first_block_that_differs(naive_trace):
    toy, (args, kwargs) = AliasingToy(), _call()
    traced = trace_denoiser(toy, args, kwargs)
    assert operator.iadd not in [n.target for n in traced.graph.nodes]
    split = split_graph(traced, Plan(stages=(("down", "extra", "mid"), ("mid2", "up"))))
    error = verify_split(traced, split, toy, args, kwargs)
    assert error is not None
    assert error.startswith("the split program does not reproduce AliasingToy: output 0 differs by ")
    assert "the first block whose output differs from eager execution is 'up'" in error
    assert "policy='coarse'" in error and "verify=False" in error
    engine = AsyncEngine(toy, EngineConfig(model_n=1, cost="flops"), latent="sample")
    with pytest.raises(StageError, match=r"\[stage 0 \| step 0\] ValueError: the split program does not reproduce"):
        engine(*args, **kwargs)
    unchecked = AsyncEngine(toy, EngineConfig(model_n=1, cost="flops", verify=False), latent="sample")
    with torch.no_grad():
        assert not torch.equal(unchecked(*args, **kwargs)[0], toy(*args, **kwargs)[0])  # silently wrong


def test_every_rank_stops_with_the_verification_error():
    errors = launch_fresh(aliasing_engine, 2, 2, 3, 3, True)
    assert [e.split("] ", 1)[0] for e in errors.values()] == ["StageError: [rank 0 | stage 0 | step 0",
                                                              "StageError: [rank 1 | stage 1 | step 0"]
    assert len({e.split("] ", 1)[1] for e in errors.values()}) == 1, errors  # the same error on every rank
    assert "ValueError: the split program does not reproduce AliasingToy" in errors[0]


def test_split_with_inplace_update_is_exact_on_two_processes():
    sequential = toy_steps(AliasingToy(), 3)
    for out in launch(aliasing_engine, 2, 2, 3, 3).values():  # all warm-up: must be the sequential model
        torch.testing.assert_close(out, sequential, rtol=0, atol=0)


def _costs(traced, seconds):
    return {b: BlockCost(b, s, 1, 0, 0) for b, s in zip(traced.blocks, seconds)}


def test_plan_cache_gives_the_same_plan_whatever_the_new_measurement(tmp_path):
    from toys import ToyDenoiser

    toy = ToyDenoiser()
    traced = trace_denoiser(toy, (torch.randn(1, 4, 8, 8), torch.tensor([1.0])), {"return_dict": False})
    n = len(traced.blocks)
    front_heavy, back_heavy = [5.0] + [1.0] * (n - 1), [1.0] * (n - 1) + [5.0]
    options = dict(cost="time", bandwidth=None, layouts=("contiguous",), max_slowdown=0.05, device="cpu",
                   cache=PlanCache(tmp_path))
    first, source = cached_plan(traced, 2, lambda: _costs(traced, front_heavy), **options)
    assert source == f"measured now, saved to {next(tmp_path.glob('*.json'))}"
    again, source = cached_plan(traced, 2, lambda: _costs(traced, back_heavy), **options)
    assert again == first and source.startswith(f"cached at {tmp_path}")
    fresh, source = cached_plan(traced, 2, lambda: _costs(traced, back_heavy), replan=True, **options)
    assert fresh != first and source.startswith("measured now")
    assert cached_plan(traced, 2, lambda: _costs(traced, front_heavy), **options)[0] == fresh  # overwritten
    other, source = cached_plan(traced, 3, lambda: _costs(traced, front_heavy), **options)
    assert other.model_n == 3 and source.startswith("measured now")  # other options: another entry
    off, source = cached_plan(traced, 2, lambda: _costs(traced, front_heavy), **{**options, "cache": PlanCache(None)})
    assert source.startswith("measured now")


def test_plan_cache_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("ASYNCDIFF_PLAN_CACHE", "off")
    assert not PlanCache().enabled
    monkeypatch.setenv("ASYNCDIFF_PLAN_CACHE", str(tmp_path))
    assert PlanCache().directory == tmp_path


@pytest.mark.parametrize("kind", ["sd", "sd-multi", "sdxl"])
def test_t2i_adapter_pipelines_are_exact_at_full_warm_up(kind):
    """The UNet does `sample += adapter_residual` on a down block's output that is also a skip
    connection: traced out of place this was 0.03-0.08 off with no error (issue 10)."""
    r = launch(adapter_scenarios, 2, kind, 3)[0]
    torch.testing.assert_close(r["exact"], r["reference"], rtol=1e-5, atol=1e-5)
