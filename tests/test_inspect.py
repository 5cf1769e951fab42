"""The partition inspection tool, from the command line and from Python."""

from __future__ import annotations

import json

import pytest
import torch

from asyncdiff.cli import main
from asyncdiff.inspection import partition_report
from asyncdiff.partition.plan import Plan


def test_full_size_sd15_plans_on_meta_without_weights(tmp_path, capsys):
    out_json, out_html = tmp_path / "plan.json", tmp_path / "plan.html"
    assert main(["inspect", "--pipeline", "sd15", "--size", "full", "--stages", "3", "--cost", "flops",
                 "--bandwidth", "none", "--json", str(out_json), "--html", str(out_html)]) == 0
    table = capsys.readouterr().out
    assert "imbalance (max/mean stage cost)" in table and "speed-up" in table
    report = json.loads(out_json.read_text())
    assert report["cost_unit"] == "flop" and len(report["stages"]) == 3
    assert {"blocks", "cost", "params_bytes", "recv_bytes"} <= set(report["stages"][0])
    assert report["imbalance"] <= 1.03  # the reference's hand-written SD 1.5 split: 1.144
    blocks = [b for stage in report["stages"] for b in stage["blocks"]]
    assert len(blocks) == len(set(blocks)) == 48
    # 860 M parameters in fp32, counted from shapes alone
    assert 3.2e9 < sum(s["params_bytes"] for s in report["stages"]) < 3.6e9
    page = out_html.read_text()
    assert page.count("<rect") == 48 and "stage 2" in page


def test_measured_time_on_the_tiny_model(capsys):
    assert main(["inspect", "--size", "tiny", "--stages", "2", "--cost", "time", "--bandwidth", "gloo"]) == 0
    out = capsys.readouterr().out
    assert "cost in s" in out and "link gloo" in out


def test_python_api_for_a_new_architecture_and_explicit_plan():
    net = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)], torch.nn.Linear(32, 8))
    x = torch.randn(4, 32)
    plan, report = partition_report(net, (x,), {}, model_n=2, cost="flops", link="none")
    assert [len(s) for s in plan.stages] in ([2, 3], [3, 2])
    mine = Plan.from_json(Plan(stages=(("0",), ("1", "2", "3", "4")), cost_unit="flop").to_json())
    _, fixed = partition_report(net, (x,), {}, model_n=2, cost="flops", plan=mine)
    assert fixed.stages[0].blocks == ("0",) and fixed.stages[1].recv_bytes == 4 * 32 * 4
    assert fixed.imbalance > report.imbalance
    # the schedule printed is the one the engine runs for this plan (Note [schedule as program])
    wrapped = Plan(stages=(("0", "4"), ("1", "2", "3")), cost_unit="flop")
    _, report = partition_report(net, (x,), {}, model_n=2, cost="flops", plan=wrapped)
    assert report.schedule.splitlines()[2] == "   1 | async   | s0 s2[t-1] send 0>1 next 1>2 out | s1[t-1] send 1>2 next 0>1 out0"
    assert report.schedule in report.table().replace("\n  ", "\n")


def test_time_cost_needs_weights():
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="cost='time' measures the blocks and needs real weights"):
        partition_report(net, (torch.empty(2, 8, device="meta"),), {}, model_n=2, cost="time")
    with pytest.raises(ValueError, match="link='infiniband' is not a preset"):
        partition_report(net, (torch.empty(2, 8, device="meta"),), {}, model_n=2, link="infiniband")


def test_pipeline_that_cannot_run_on_meta_gets_a_clear_error(capsys):
    # full-size Wan's UMT5 text encoder reads a value of its attention mask, which meta tensors lack
    assert main(["inspect", "--pipeline", "wan", "--size", "full", "--stages", "2", "--cost", "flops"]) == 2
    err = capsys.readouterr().err
    assert "WanPipeline cannot prepare its 'transformer' call on meta tensors" in err and "--cost time" in err


def test_wan_inspects_with_real_weights(capsys):
    assert main(["inspect", "--pipeline", "wan", "--size", "tiny", "--stages", "2", "--cost", "time"]) == 0
    assert "imbalance (max/mean stage cost)" in capsys.readouterr().out


def test_inspect_lists_every_layout_with_depth_and_predicted_drift(tmp_path, capsys, monkeypatch):
    """Note [staleness] and Note [predicted drift]: each layout's best plan with its main-path depth
    and the deviation a simulated asynchronous run adds; the plan source on the first and second run."""
    monkeypatch.setenv("ASYNCDIFF_PLAN_CACHE", str(tmp_path))
    command = ["inspect", "--pipeline", "digits", "--stages", "2", "--cost", "time", "--bandwidth", "gloo",
               "--plan-rule", "depth", "--drift", "4"]
    assert main(command) == 0
    first = capsys.readouterr().out
    considered = [line for line in first.splitlines() if line.strip().startswith("considered")]
    assert [line.split()[1] for line in considered] == ["contiguous", "wrapped"]
    depths = [int(line.split("main-path depth ")[1].split(",")[0]) for line in considered]
    drifts = [float(line.split("predicted drift ")[1].split()[0]) for line in considered]
    assert depths == [1, 2] and all(d > 0 for d in drifts)
    assert "plan: measured now, saved to" in first
    assert main(command[:-2]) == 0  # same call and options: the cached plan
    assert f"plan: cached at {tmp_path}" in capsys.readouterr().out


def test_inspect_shows_the_fidelity_rules_choice_with_both_numbers_per_candidate(capsys):
    """Note [fidelity rule]: on real weights inspect measures as the engine does; every candidate
    within the window has its modelled step and predicted error, the least error is chosen."""
    from asyncdiff.inspection import load_for_inspection, measured_errors, partition_report
    from asyncdiff.models.builders import example_inputs
    from asyncdiff.engine.drift import record_calls

    assert main(["inspect", "--pipeline", "digits", "--stages", "2", "--cost", "time", "--bandwidth", "gloo",
                 "--warm-up", "1"]) == 0
    out = capsys.readouterr().out
    considered = [line for line in out.splitlines() if line.strip().startswith("considered")]
    errors = [float(line.split("predicted error ")[1].split(",")[0].split()[0]) for line in considered]
    steps = [float(line.split("modelled step ")[1].split()[0]) for line in considered]
    assert len(considered) >= 2 and all(e > 0 for e in errors) and max(steps) <= min(steps) * 1.15 * 1.001
    chosen = [line for line in considered if line.endswith("<- chosen")]
    assert len(chosen) == 1 and errors[considered.index(chosen[0])] == min(errors)
    assert "plan: fidelity rule: predicted error" in out
    # the errors come from the recorded calls: a different warm-up measures a different step pair
    pipe = load_for_inspection("digits", "tiny", None, on_meta=False)
    call = example_inputs("digits", "tiny")
    calls = record_calls(pipe, "unet", **call)
    args, kwargs = calls[0]
    one = partition_report(pipe.unet, args, kwargs, model_n=2, cost="flops",
                           errors=measured_errors(calls, pipe.unet, 1, 2))[1]
    two = partition_report(pipe.unet, args, kwargs, model_n=2, cost="flops",
                           errors=measured_errors(calls, pipe.unet, 2, 2))[1]
    assert [c[4] for c in one.candidates] != [c[4] for c in two.candidates]


def test_inspect_notes_a_value_trace_and_counts_flops_on_it():
    """Note [value trace]: a denoiser that branches on a value is planned by FLOPs like any other
    (its checks skip the meta run), and the report says how it was traced."""
    from toys import TopLevelBranchy

    torch.manual_seed(0)
    _, report = partition_report(TopLevelBranchy(), (torch.randn(2, 4),), {}, model_n=2, cost="flops")
    assert report.trace_notes == ("traced with the call's real values (Note [value trace]): 1 decision(s) on "
                                  "tensor values are checked at every call",)
    assert "trace: traced with the call's real values" in report.table()


def test_inspect_names_the_other_denoisers_a_pipeline_calls():
    """Note [several denoisers]: inspecting the combined Kandinsky 2.2 pipeline plans its decoder
    and says that its prior is split too, with a plan of its own."""
    from asyncdiff.inspection import pipeline_report
    from asyncdiff.models.coverage import case

    pipe, call = case("kandinsky22-combined").build()
    _, report = pipeline_report(pipe, model_n=2, **call)
    assert report.trace_notes[-1] == ("the pipeline calls another denoiser too: prior_prior (PriorTransformer); the "
                                      "engine splits it as well, with its own plan made at its first call (Note "
                                      "[several denoisers])")
    assert "trace: the pipeline calls another denoiser too" in report.table()
