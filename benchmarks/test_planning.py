"""Planning time for a full-size SDXL on the meta device (no weights, FLOP costs).

``pipeline_report`` = capture the UNet call from the pipeline + trace + profile (FLOPs on meta)
+ plan + split + report; the planner alone is ``best_assignment`` on the traced block costs and
edges. Both for 2, 4 and 8 stages, planning for NVLink (the communication-aware cost model).
"""

from __future__ import annotations

import pytest

from asyncdiff.inspection import load_for_inspection, pipeline_report
from asyncdiff.models.builders import example_inputs
from asyncdiff.partition.auto import block_values
from asyncdiff.partition.planner import best_assignment
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.report import LINKS
from asyncdiff.partition.trace import trace_denoiser

STAGES = (2, 4, 8)
LINK = "nvlink"


@pytest.fixture(scope="module")
def sdxl():
    pipe = load_for_inspection("sdxl", "full", None, on_meta=True)
    return pipe, {"prompt": "a photo of a cat", **example_inputs("sdxl", "full")}


@pytest.fixture(scope="module")
def sdxl_call(sdxl):
    """The SDXL UNet and the call the pipeline makes to it (captured on meta)."""
    from asyncdiff.adapters.capture import capture_denoiser_call
    from asyncdiff.adapters.registry import adapter_for

    pipe, call = sdxl
    adapter = adapter_for(pipe)
    args, kwargs = capture_denoiser_call(pipe, adapter.denoiser, **call)
    return getattr(pipe, adapter.denoiser), args, kwargs, adapter.latent


def _trace_and_profile(denoiser, args, kwargs, latent):
    traced = trace_denoiser(denoiser, args, kwargs, policy="fine", latent=latent)
    return traced, profile_blocks(traced, denoiser, args, kwargs, measure_time=False)


@pytest.fixture(scope="module")
def sdxl_costs(sdxl_call):
    """Per-block FLOPs and block edges of the traced SDXL UNet, as ``auto_plan`` builds them."""
    traced, costs = _trace_and_profile(*sdxl_call)
    return [float(costs[b].flops) for b in traced.blocks], block_values(traced, costs)


@pytest.mark.parametrize("stages", STAGES)
def test_pipeline_report_sdxl_full(benchmark, run_record, sdxl, stages):
    pipe, call = sdxl
    plan, report = benchmark.pedantic(
        lambda: pipeline_report(pipe, model_n=stages, cost="flops", link=LINK, policy="fine", **call),
        rounds=3, warmup_rounds=1, iterations=1)
    blocks = [b for stage in plan.stages for b in stage]
    assert plan.model_n == stages and len(blocks) == len(set(blocks)) == len(report.blocks)
    seconds = run_record.keep(f"planning/report/{stages}", run_record.median(benchmark))
    benchmark.extra_info.update({"stages": stages, "blocks": len(report.blocks), "median_s": round(seconds, 3),
                                 "imbalance": round(report.imbalance, 4), "modeled_speedup": round(report.speedup, 3)})
    run_record.print(f"planning SDXL full, {stages} stages (trace + FLOP profile on meta + plan + report)",
                     [f"{len(report.blocks)} blocks: median {seconds:.2f} s; imbalance {report.imbalance:.3f}, "
                      f"modelled speed-up {report.speedup:.2f}x on {LINK}"])


@pytest.mark.parametrize("stages", STAGES)
def test_planner_alone_sdxl_full(benchmark, run_record, sdxl_costs, stages):
    costs, values = sdxl_costs
    bandwidth = LINKS[LINK].planner_bandwidth("flop")
    assignment = benchmark.pedantic(best_assignment, args=(costs, values, stages, bandwidth),
                                    rounds=20, warmup_rounds=2, iterations=1)
    assert len(assignment) == len(costs) and set(assignment) == set(range(stages))
    seconds = run_record.keep(f"planning/planner/{stages}", run_record.median(benchmark))
    share = run_record.ratio(seconds, f"planning/report/{stages}")
    benchmark.extra_info.update({"stages": stages, "blocks": len(costs), "median_s": round(seconds, 5),
                                 "share_of_pipeline_report": None if share is None else round(share, 4)})
    run_record.print(f"planner alone (best_assignment), SDXL full, {stages} stages",
                     [f"{len(costs)} blocks, {len(values)} values: median {seconds * 1e3:.2f} ms"
                      + ("" if share is None else f"; {share:.2%} of pipeline_report")])


def test_trace_and_profile_sdxl_full(benchmark, run_record, sdxl_call):
    """The stage-count-independent part of ``pipeline_report``: trace + FLOP profile on meta."""
    traced, costs = benchmark.pedantic(_trace_and_profile, args=sdxl_call, rounds=3, warmup_rounds=1, iterations=1)
    assert set(costs) >= set(traced.blocks) and all(costs[b].flops >= 0 for b in traced.blocks)
    seconds = run_record.keep("planning/trace+profile", run_record.median(benchmark))
    shares = {n: run_record.ratio(seconds, f"planning/report/{n}") for n in STAGES}
    benchmark.extra_info.update({"blocks": len(traced.blocks), "median_s": round(seconds, 3),
                                 **{f"share_of_pipeline_report_{n}": None if r is None else round(r, 3)
                                    for n, r in shares.items()}})
    run_record.print("trace + FLOP profile alone, SDXL full (meta)",
                     [f"{len(traced.blocks)} blocks: median {seconds:.2f} s"
                      + "".join(f"; {r:.0%} of pipeline_report at {n} stages" for n, r in shares.items()
                                if r is not None)])
