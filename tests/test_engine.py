"""The engine on several processes (gloo): exactness in warm-up, stale inputs after it,
weights held per rank, clear errors, and no hang when a rank fails."""

from __future__ import annotations

import pytest
import torch
from asyncdiff.engine.launch import launch as launch_fresh
from asyncdiff.engine.launch import local_device
from pool import launch
from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
from toys import (
    two_loops_with_one_signature_kept,
    strided_engine,
    late_branch_stride_2,
    stalled_peer,
    untraceable_engine,
    TUPLE_PLAN,
    ToyDenoiser,
    TupleDenoiser,
    branch_scenarios,
    lost_peer,
    pipeline_scenarios,
    refresh_scenarios,
    toy_engine,
    toy_steps,
    tuple_engine,
    named_branch_scenarios,
    two_loop_scenarios,
)

STEPS = 6


@pytest.fixture(scope="module", params=[(2, "contiguous"), (3, "contiguous"), (2, "wrapped"), (3, "wrapped")],
                ids=["2-stages", "3-stages", "2-stages-wrapped", "3-stages-wrapped"])
def scenario(request):
    n, layout = request.param
    results = launch(pipeline_scenarios, n, STEPS, 1, layout)
    if layout == "wrapped":
        plan = results[0]["plan"]
        assert "conv_in" in plan.stages[0] and "conv_out" in plan.stages[0]
    return n, results


def test_warm_up_every_step_equals_sequential(scenario):
    n, results = scenario
    for r in results.values():
        torch.testing.assert_close(r["exact"], r["reference"], rtol=1e-6, atol=1e-6)


def test_stale_inputs_differ_but_stay_close(scenario, record_property):
    n, results = scenario
    r = results[0]
    deviation = ((r["stale"] - r["reference"]).norm() / r["reference"].norm()).item()
    max_abs = (r["stale"] - r["reference"]).abs().max().item()
    record_property(f"relative_deviation_{n}_stages", deviation)
    print(f"\n{n} stages, warm-up 1 of {STEPS} steps: relative L2 deviation {deviation:.4f}, max abs {max_abs:.4f}")
    assert deviation > 1e-4, "stale inputs must change the result (else the run was not asynchronous)"
    assert deviation < 0.5
    for other in results.values():  # every rank ran the same loop on the same broadcast output
        torch.testing.assert_close(other["stale"], r["stale"], rtol=0, atol=0)


def test_each_rank_holds_only_its_stage(scenario):
    n, results = scenario
    plan = results[0]["plan"]
    assert plan.model_n == n
    unet_params = results[0]["unet_params"]

    def block_params(block):
        return sum(v for name, v in unet_params.items() if name.startswith(block + "."))

    planned = [b for stage in plan.stages for b in stage]
    assert len(planned) == len(set(planned))
    outside = sum(unet_params.values()) - sum(block_params(b) for b in planned)  # replicated, e.g. time embedding
    for rank, r in results.items():
        assert r["plan"] == plan
        expected = sum(block_params(b) for b in plan.stages[rank]) + outside
        assert sum(r["held"].values()) == expected
    assert results[0]["bytes_sent"] > 0  # stage 0 always feeds a later stage


def test_remove_restores_the_plain_pipeline(scenario):
    _, results = scenario
    for r in results.values():
        torch.testing.assert_close(r["after_remove"], r["reference"], rtol=0, atol=0)


def test_refresh_every_step_is_sequential_and_every_2_is_in_between(record_property):
    r = launch(refresh_scenarios, 2, 8)[0]
    torch.testing.assert_close(r["every_step"], r["reference"], rtol=1e-6, atol=1e-6)  # all sequential

    def deviation(x):
        return ((x - r["reference"]).norm() / r["reference"].norm()).item()

    # On random weights the size of the deviation says little (the fidelity study needs a trained
    # model, issue 6); what holds is that refreshing changes the trajectory and keeps it finite.
    record_property("deviation_refresh_every_2", deviation(r["every_2"]))
    record_property("deviation_no_refresh", deviation(r["never"]))
    assert deviation(r["every_2"]) > 0 and deviation(r["never"]) > 0
    assert not torch.equal(r["every_2"], r["never"]) and torch.isfinite(r["every_2"]).all()
    # adaptive refresh: any drift refreshes (all sequential after warm-up 2), infinite drift never does
    assert r["drift_0_kinds"] == ["warm-up"] * 2 + ["refresh"] * 6
    torch.testing.assert_close(r["drift_0"], r["reference"], rtol=1e-6, atol=1e-6)
    assert r["drift_inf_kinds"] == ["warm-up"] * 2 + ["async"] * 6
    torch.testing.assert_close(r["drift_inf"], r["warm_up_2"], rtol=0, atol=0)


@pytest.mark.slow
def test_a_rank_that_loses_its_peer_reports_the_peers_error_too():
    """Note [first error]: whichever rank the launcher reports, the real failure is in the message."""
    results = launch_fresh(lost_peer, 2, timeout_s=5)
    assert results[1] == "[rank 1 | stage 1 | step 2] RuntimeError: injected failure"
    assert results[0].startswith("[rank 0 | stage 0 | step ")
    assert results[0].endswith("; the first failure was [rank 1 | stage 1 | step 2] RuntimeError: injected failure")


@pytest.mark.slow
def test_more_stages_than_blocks():
    """A toy of two blocks (conv_in, conv_out: no body) on three processes."""
    with pytest.raises(ValueError, match=r"stages=3 but the traced denoiser has only 2 blocks"):
        launch_fresh(toy_engine, 3, 3, None, 1, 1, "cpu", False, 0)


def test_toy_denoiser_on_two_ranks_matches_the_sequential_model():
    torch.manual_seed(0)
    expected = toy_steps(ToyDenoiser(), 1)
    for out in launch(toy_engine, 2, 2).values():
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("wire, tolerance", [("bfloat16", 2 ** -8), ("float8", 2 ** -4)])
def test_narrow_transfers_round_asynchronous_steps_only(wire, tolerance):
    """Note [exact warm-up]: all-warm-up runs stay exact in any transfer dtype; asynchronous steps
    differ from the full-precision asynchronous run by about the wire dtype's rounding."""
    torch.manual_seed(0)
    sequential = toy_steps(ToyDenoiser(), 4)
    torch.testing.assert_close(launch(toy_engine, 2, 2, wire, 4, 4)[0], sequential, rtol=0, atol=0)
    exact_async = launch(toy_engine, 2, 2, None, 4, 1)[0]
    narrow = launch(toy_engine, 2, 2, wire, 4, 1)[0]
    assert not torch.equal(exact_async, sequential)  # stale inputs change the result
    assert not torch.equal(narrow, exact_async)
    scale = exact_async.abs().max().item()
    torch.testing.assert_close(narrow, exact_async, rtol=4 * tolerance, atol=4 * tolerance * scale)


def test_compiled_stages_give_the_eager_result():
    """EngineConfig(compile=True): each rank's segments run under torch.compile (inductor), and
    a run of a warm-up step and asynchronous steps gives what the eager engine gives."""
    eager = launch(toy_engine, 2, 2, None, 4, 1)[0]
    compiled = launch(toy_engine, 2, 2, None, 4, 1, "cpu", True)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, comm stream, Triton pack)")
@pytest.mark.parametrize("wire, tolerance", [(None, 1e-3), ("float8", 0.1)])  # a float8 rounding may flip
def test_nccl_engine_on_two_gpus_matches_the_gloo_engine(wire, tolerance, monkeypatch):
    """The CUDA path (NCCL, Note [overlap]'s comm stream, the Triton pack kernels) against the same
    schedule on gloo: all-warm-up runs equal the sequential model on the GPU; asynchronous runs
    equal the CPU engine's up to the two devices' float differences."""
    torch.manual_seed(0)
    sequential = toy_steps(ToyDenoiser().cuda(), 4, "cuda").cpu()
    on_cpu = launch(toy_engine, 2, 2, wire, 4, 1)[0]
    monkeypatch.setenv("ASYNCDIFF_DEVICE", "cuda")
    # fresh processes: they see the environment as it is now
    torch.testing.assert_close(launch_fresh(toy_engine, 2, 2, wire, 4, 4, "local")[0], sequential, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(launch_fresh(toy_engine, 2, 2, wire, 4, 1, "local")[0], on_cpu,
                               rtol=tolerance, atol=tolerance)


def test_local_device_choice(monkeypatch):
    monkeypatch.setenv("ASYNCDIFF_DEVICE", "cpu")
    assert local_device() == torch.device("cpu")
    monkeypatch.setenv("ASYNCDIFF_DEVICE", "tpu")
    with pytest.raises(ValueError, match="ASYNCDIFF_DEVICE='tpu' must be 'auto', 'cpu' or 'cuda'"):
        local_device()
    monkeypatch.setenv("ASYNCDIFF_DEVICE", "cuda")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(RuntimeError, match=r"has no GPU: this machine has \d+ CUDA device.*ASYNCDIFF_DEVICE=cpu"):
        local_device()


@pytest.mark.parametrize("kwargs, match", [
    ({"model_n": 2, "stride": 3}, r"stride=3 must be 1 or 2"),
    ({"model_n": 2, "warm_up": -1}, r"warm_up=-1 must be an integer >= 0"),
    ({"model_n": 0}, r"model_n=0 must be an integer >= 1"),
    ({"model_n": 2, "cost": "bits"}, r"cost='bits' must be one of"),
    ({"model_n": 2, "transfer_dtype": "int8"}, r"transfer_dtype='int8' must be one of"),
    ({"model_n": 2, "bandwidth": "wifi"}, r"bandwidth='wifi' must be 'auto', None or a link preset"),
    ({"model_n": 2, "refresh_every": 0}, r"refresh_every=0 must be >= 1"),
    ({"model_n": 2, "stride": 2, "refresh_every": 3}, r"refresh_every works with stride=1 only"),
    ({"model_n": 2, "refresh_drift": -0.1}, r"refresh_drift=-0.1 must be >= 0, with stride=1"),
    ({"model_n": 2, "max_slowdown": -0.5}, r"max_slowdown=-0.5 must be a number >= 0 \(0: the fastest plan\)"),
    ({"model_n": 2, "compile": "yes"}, r"compile='yes' must be True or False"),
    ({"model_n": 2, "verify": 1}, r"verify=1 must be True or False"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_stride_2_needs_a_contiguous_layout_and_timesteps():
    with pytest.raises(ValueError, match=r"stride=2 runs contiguous plans only"):
        EngineConfig(model_n=2, stride=2, layouts=("wrapped",))
    with pytest.raises(ValueError, match=r"world size is 2 but guidance=1 x batch=1 x \(model_n=2 \+ stride=2 - 1\) "
                                         r"= 3 processes"):
        EngineConfig(model_n=2, stride=2).check_world_size(2)


def test_world_size_must_fit_model_n_and_stride():
    with pytest.raises(ValueError, match=r"world size is 3 but guidance=1 x batch=1 x \(model_n=2 \+ stride=1 - 1\) "
                                         r"= 2 processes; launch with --nproc_per_node=2 or use model_n=3"):
        EngineConfig(model_n=2).check_world_size(3)
    with pytest.raises(ValueError, match=r"world size is 6 but guidance=2 x batch=1 x \(model_n=2 \+ stride=1 - 1\) "
                                         r"= 4 processes; launch with --nproc_per_node=4 or use model_n=3"):
        EngineConfig(model_n=2, guidance=2).check_world_size(6)
    with pytest.raises(ValueError, match=r"world size is 1 but guidance=1 x batch=1 x \(model_n=2"):
        AsyncEngine(ToyDenoiser(), EngineConfig(model_n=2))


def test_async_diff_without_processes_says_how_to_launch():
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    with pytest.raises(RuntimeError, match=r"need 2 processes; start with torchrun --nproc_per_node=2"):
        AsyncDiff(build_sd15("tiny"), model_n=2)


def test_single_stage_engine_is_the_plain_denoiser():
    torch.manual_seed(0)
    toy = ToyDenoiser()
    engine = AsyncEngine(toy, EngineConfig(model_n=1, cost="flops"))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 5.0])
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(engine(x, t)["sample"], toy(x, t)["sample"], rtol=0, atol=0)


def test_guidance_as_two_calls_per_step_keeps_a_stale_state_per_branch():
    """Note [branches]: a pipeline that calls its denoiser twice per step (conditional, then
    unconditional) matches the sequential model exactly when every step is a warm-up step, and
    with stale inputs it matches the same guidance done as one batched call: each call's stale
    values come from the same call of the previous step, never from the other call."""
    steps = 4
    r = launch(branch_scenarios, 2, steps)[0]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    assert rel(r["plain_batched"], r["plain"]) < 1e-3  # the two forms of guidance agree (batching rounds)
    torch.testing.assert_close(r["exact"], r["plain"], rtol=0, atol=0)
    assert r["exact_calls"] == 2 * steps
    assert r["stale_kinds"] == ["warm-up"] * 2 + ["async"] * (2 * steps - 2)
    assert rel(r["stale"], r["plain"]) > 1e-3  # stale inputs change the result (measured 0.012)
    assert rel(r["stale"], r["stale_batched"]) < 1e-4  # measured 1.2e-6
    assert rel(r["mixed"], r["stale_batched"]) > 1e-2  # the control, branches mixed: measured 0.035


def test_a_tuple_of_tensors_crosses_stages_element_by_element():
    """A block returning a tuple (rotary embeddings' cos and sin) read on both stages: each
    element travels as its own transfer, and the tuple is rebuilt on the receiving stage."""
    from asyncdiff.partition.plan import Plan
    from asyncdiff.partition.split import split_graph
    from asyncdiff.partition.trace import trace_denoiser

    torch.manual_seed(0)
    toy = TupleDenoiser()
    traced = trace_denoiser(toy, (torch.randn(1, 4, 8, 8), torch.tensor([3.0])), {}, policy="coarse", latent="sample")
    split = split_graph(traced, Plan(stages=TUPLE_PLAN))
    rotary = [(t.part, t.spec.shape) for t in split.transfers if t.value == "denoiser_rotary"]
    assert rotary == [(0, (1, 1, 8, 8)), (1, (1, 1, 8, 8))]
    sequential = toy_steps(toy, 3)
    torch.testing.assert_close(launch(tuple_engine, 2, 3, 3)[0], sequential, rtol=0, atol=0)
    stale = launch(tuple_engine, 2, 3, 1)[0]
    assert torch.isfinite(stale).all() and not torch.equal(stale, sequential)


def test_a_value_crosses_stages_with_its_strides():
    """Note [strides on the wire]: a transposed value arrives with the sender's strides, not
    contiguous, so the receiving block runs the kernels it runs unsplit."""
    results = launch(strided_engine, 2, 2)
    plain = results[0]["plain_strides"]
    assert plain == [(1024, 1, 16)] * 2  # (B, C, HW) of a (B, HW, C) tensor: dense, not contiguous
    assert results[1]["strides"] == plain  # the rank that runs `mix`, at both steps
    for r in results.values():
        torch.testing.assert_close(r["split"], r["plain"], rtol=0, atol=0)


def test_deepfloyd_if_is_bit_exact_where_a_cut_crosses_transposed_values():
    """Note [strides on the wire]: IF's UNet cut after 12 of 18 blocks (the bytes plan) hands
    attention outputs across; arriving contiguous they gave 3e-5 after three steps."""
    from toys import coverage_at_full_warm_up

    for r in launch(coverage_at_full_warm_up, 2, "deepfloyd-if", 3, "bytes").values():
        assert [len(s) for s in r["plan"].stages] == [12, 6]
        torch.testing.assert_close(r["split"], r["plain"], rtol=0, atol=0)


def test_a_second_denoising_loop_in_one_call_starts_with_its_own_warm_up():
    """Note [a second loop]: the second loop (another resolution) begins at step 0 with fresh
    state, so it warms up again instead of reading stale values of the first loop's shapes."""
    for r in launch(two_loop_scenarios, 2, 3).values():
        torch.testing.assert_close(r["exact"], r["plain"], rtol=1e-5, atol=1e-5)
        assert r["kinds"] == ["warm-up", "async", "async"] * 2
        assert 0 < ((r["stale"] - r["plain"]).norm() / r["plain"].norm()).item() < 0.5


def test_compiled_signatures_are_bounded_least_recently_used_first():
    """A server meets many sizes: an engine keeps MAX_SIGNATURES compiled calls and compiles an
    evicted one again when it comes back (here one kept, two signatures a call, two calls)."""
    for r in launch_fresh(two_loops_with_one_signature_kept, 2, 2).values():
        assert r["kept"] == 1
        for exact in r["exact"]:
            torch.testing.assert_close(exact, r["plain"], rtol=1e-5, atol=1e-5)


def test_named_calls_keep_their_branch_when_a_step_skips_one():
    """Note [branches]: with diffusers' cache context the branch follows the call's name, so a step
    without guidance does not hand the conditional call the unconditional branch's stale state."""
    for r in launch(named_branch_scenarios, 2, 5).values():
        torch.testing.assert_close(r["exact"], r["plain"], rtol=1e-5, atol=1e-5)
        assert r["branches"] == [0, 1, 1, 0, 1, 1, 0, 1]  # uncond is branch 0, cond 1, in every step
        assert 0 < ((r["stale"] - r["plain"]).norm() / r["plain"].norm()).item() < 0.5


@pytest.mark.slow
def test_stride_2_refuses_a_branch_that_first_comes_after_warm_up():
    """Note [late branches]: stride 1 starts such a branch with a sequential step; stride 2 cannot
    (its rounds pair steps), so every rank stops with the same clear error instead."""
    errors = launch_fresh(late_branch_stride_2, 3, 4)
    assert len({e.split("] ", 1)[-1] for e in errors.values()}) == 1  # the same error on every rank
    assert errors[0].startswith("[rank 0 | stage 0 | step 2] ValueError")
    assert "stride 2 cannot start it there: use stride=1, or warm_up covering those steps" in errors[0]


@pytest.mark.slow
def test_a_stalled_rank_makes_its_peer_fail_within_the_deadline():
    """Issue 11: no hangs. Rank 1 stalls for 14 s without failing; rank 0 stops within its 5 s
    deadline (plus the steps' own time), naming the stage and step where it waited."""
    results = launch_fresh(stalled_peer, 2, 14.0, timeout_s=5)
    message, seconds = results[0]
    assert message.startswith("[rank 0 | stage 0 | step "), message
    assert seconds < 12, f"rank 0 waited {seconds:.0f} s for a stalled peer (it stalls 14 s)"


def test_an_untraceable_denoiser_fails_at_the_first_call_on_every_rank_with_the_cause():
    results = launch_fresh(untraceable_engine, 2)
    for message in results.values():
        assert "reads a tensor's value as a Python number" in message, message
    assert results[0].split("] ", 1)[-1] == results[1].split("] ", 1)[-1]  # the same error on every rank


def test_deadline_follows_the_measured_step_time():
    """Note [deadlines]: the process-group timeout until steps are measured or while a new
    signature is traced; then 10x the median step, at least 30 s, at most timeout_s."""
    config = EngineConfig(model_n=1, timeout_s=300)
    assert config.deadline([], new=False).total_seconds() == 300
    assert config.deadline([0.5, 0.6, 20.0], new=False).total_seconds() == 30
    assert config.deadline([10.0, 12.0, 11.0], new=False).total_seconds() == 110
    assert config.deadline([10.0, 12.0, 11.0], new=True).total_seconds() == 300
    assert config.deadline([100.0, 100.0], new=False).total_seconds() == 300
