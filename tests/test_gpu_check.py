"""The GPU check's reduced form on CPU (tiny sizes, float32, aot_eager), so CI keeps it working."""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu_check import main, table


@pytest.mark.slow
def test_gpu_check_runs_its_reduced_form_on_cpu(tmp_path, capsys):
    results = main(["--out", str(tmp_path), "--models", "sd15,flux", "--rounds", "1",
                    "--sections", "tests,overhead,profile,compile,loading"])
    assert results["errors"] == {}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["overhead"] == results["overhead"]
    assert results["tests"][0]["status"].startswith("skipped: no CUDA")
    # N=1 engine: the same output as the denoiser it stands in for
    assert [r["model"] for r in results["overhead"]] == ["sd15", "sdxl"]
    assert all(r["same_output"] and r["plain_ms"] > 0 and r["engine_ms"] > 0 for r in results["overhead"])
    for row in results["profile"]:
        assert set(row["block_ms"]) and all(ms > 0 for ms in row["block_ms"].values())
        assert [(p["stages"], p["link"]) for p in row["plans"]] == [
            (n, link) for n in (2, 4, 8) for link in ("nvlink", "pcie")]
        for p in row["plans"]:
            assert len(p["stage_ms"]) == p["stages"] and p["imbalance"] >= 1.0 and p["flop_plan_imbalance"] >= 1.0
            assert 1.0 <= p["speedup"] <= p["stages"]
    # compiled stages (aot_eager on CPU) give the eager stages' values exactly
    assert [(r["stage"], r["status"]) for r in results["compile"]] == [(0, "ok"), (1, "ok")]
    assert all(r["max_abs_diff"] == 0.0 for r in results["compile"])
    # each of 2 stages keeps part of the weights; the replicated conditioning is in both
    (first, second) = [r for r in results["memory"] if r["model"] == "flux"]
    assert 0 < first["weights_gb"] < first["model_weights_gb"] and 0 < second["weights_gb"] < first["model_weights_gb"]
    assert first["weights_gb"] + second["weights_gb"] >= first["model_weights_gb"]
    # the stage-only loader, then a loaded pipeline staged in memory: each of 2 stages holds part of
    # the denoiser the whole load holds, the same part either way
    whole, first, second, first_in_memory, second_in_memory = (r["denoiser_gb"] for r in results["loading"])
    assert 0 < first < whole and 0 < second < whole and first + second >= whole
    assert (first_in_memory, second_in_memory) == (first, second)
    assert "overhead sd15" in table(results) and "compile  sd15 stage 1" in capsys.readouterr().out
