"""Note [failures reach every rank] and Note [one line per failure]: any failure on any rank
stops every rank within seconds, with the root cause and the failing rank in one line."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import pytest

from asyncdiff.cli import main
from asyncdiff.engine.errors import Failure, PeerFailed, StageError, decided
from asyncdiff.engine.launch import RankFailed
from asyncdiff.engine.launch import launch as launch_fresh
from commands import run_cli
from pool import launch
from toys import failing_decision, failing_stage

PROGRESS = re.compile(r"\s*\d+%\|[^\n\r]*?it/s\]")  # the pipeline's own progress bar (tqdm), not ours


@pytest.mark.parametrize("kind", ["RuntimeError", "MemoryError", "KeyboardInterrupt"])
def test_a_failure_in_rank_0s_planning_reaches_every_rank_at_once(kind):
    """Rank 0 stays alive after its failure (it catches it), so nothing but the forwarded error
    can end rank 1's wait: before, rank 1 waited for the group's timeout (300 s here)."""
    results = launch(failing_decision, 2, kind)
    line = f"[rank 0 | stage 0 | step 0] {kind}: injected while planning"
    for rank, (raised, message, cause, seconds) in results.items():
        if rank == 0 and kind == "KeyboardInterrupt":  # not an error of the step: not wrapped
            assert (raised, message) == (kind, "injected while planning")
            continue
        # every rank: the same line, naming the failing rank; on rank 0 the exception is its cause
        assert (raised, message) == ("StageError", line), (rank, raised, message)
        assert cause == (kind if rank == 0 else "PeerFailed"), (rank, cause)
        assert seconds < 30, f"rank {rank} took {seconds:.0f} s to hear of rank 0's failure"


def test_a_stage_failing_at_step_3_stops_every_rank_with_one_line():
    started = time.perf_counter()
    with pytest.raises(RankFailed) as caught:
        launch_fresh(failing_stage, 2, 1, 3, timeout_s=300)
    seconds = time.perf_counter() - started
    assert str(caught.value) == "[rank 1 | stage 1 | step 3] RuntimeError: injected failure"
    failures = caught.value.failures
    assert sorted(failures) == [0, 1]  # rank 0 failed too: it lost its peer, and it says why
    assert failures[0].root == str(caught.value), failures[0]
    assert seconds < 30, f"the run took {seconds:.0f} s to stop (the group's timeout is 300 s)"


def test_decided_forwards_what_it_raises_as_the_same_line():
    """One process (no group): the exception itself; its Failure says where and what."""
    with pytest.raises(ZeroDivisionError):
        decided(lambda: 1 / 0, src=0, group=None, rank=0)
    assert decided(lambda: 42, src=0, group=None, rank=0) == 42
    try:
        decided(lambda: {}["plan"], src=0, group=None, rank=0)
    except KeyError as err:
        failure = Failure.of(err, 0)
    assert failure.line() == "[rank 0] KeyError: 'plan'"
    assert "test_failures.py" in failure.trace and failure.cause() == failure.line()
    peer = PeerFailed(failure)
    assert str(peer) == failure.line() and Failure.of(peer, 1).cause() == failure.line()
    stage = StageError("[rank 1 | stage 1 | step 0] PeerFailed: x; the first failure was y", root="y")
    assert Failure.of(stage, 1).root == "y" and Failure.of(stage, 1).line() == str(stage)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "broken.json").write_text('{"stages": [["conv_in"], ')
    (folder / "three.json").write_text(json.dumps({"stages": [["conv_in"], ["mid_block"], ["conv_out"]]}))
    (folder / "not-a-pipeline").mkdir()
    return folder


@pytest.mark.parametrize("devices", ["1", "2"])
@pytest.mark.parametrize("args, message", [
    (["--plan", "{}/broken.json"], "plan='{}/broken.json' is not a plan: Expecting value: line 1 column 26 (char 25); "
                                   "write one with asyncdiff inspect --json"),
    (["--model", "{}/not-a-pipeline"], "model='{}/not-a-pipeline' is a folder but not a diffusers pipeline "
                                       "(no model_index.json); pass the folder a pipeline's save_pretrained wrote"),
])
def test_a_bad_plan_or_model_is_one_line_before_any_process_starts(bad_inputs, args, message, devices, capsys):
    """The same one line at any device count (issue 25: ~100 lines at 2 devices before)."""
    assert main(["generate", "--devices", devices, *[a.format(bad_inputs) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err == f"asyncdiff generate: error: {message.format(bad_inputs)}\n"


def test_a_plan_of_another_stage_count_is_refused_before_starting(bad_inputs, capsys):
    assert main(["generate", "--devices", "2", "--plan", f"{bad_inputs}/three.json"]) == 2
    assert capsys.readouterr().err == (f"asyncdiff generate: error: plan='{bad_inputs}/three.json' has 3 stages but "
                                       f"this run has 2 (devices=2); plan for 2 stages or change --devices\n")


@pytest.mark.slow
def test_a_rank_failure_is_one_line_from_the_command(tmp_path):
    """A plan naming blocks the denoiser lacks can only be found by tracing, on every rank: the
    command prints the root line, once, and nothing else (no launcher or rank traceback)."""
    plan = tmp_path / "unknown.json"
    plan.write_text(json.dumps({"stages": [["conv_in", "no_such_block"], ["conv_out"]]}))
    done = run_cli("generate", "--devices", "2", "--steps", "2", "--plan", str(plan), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in re.sub(PROGRESS, "", done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("asyncdiff generate: error: [rank 0 | stage 0 | step 0] ValueError: "), lines[0]
    assert "no_such_block" in lines[0]


@pytest.mark.slow
def test_log_lines_name_rank_stage_and_step_at_info(tmp_path):
    done = run_cli("generate", "--devices", "2", "--steps", "2", "--log-level", "info", "--out", str(tmp_path / "x.png"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = re.sub(PROGRESS, "", done.stderr).splitlines()
    for rank in (0, 1):
        mine = [line for line in lines if f"[rank {rank} | stage {rank} | step 0]" in line]
        assert any(line.startswith("INFO asyncdiff.engine.planning ") and " traced UNet2DConditionModel in " in line
                   for line in mine), done.stderr[-3000:]
        assert any(line.startswith("INFO asyncdiff.engine.runtime ") and " compiled call signature 1 " in line
                   for line in mine), done.stderr[-3000:]
    assert any(line.startswith("INFO asyncdiff.engine.planning [rank 0 | stage 0 | step 0] plan (") for line in lines)
    assert not any(line.startswith("DEBUG") for line in lines)
    quiet = run_cli("generate", "--devices", "1", "--steps", "1", "--out", str(tmp_path / "y.png"))
    assert quiet.returncode == 0 and not any(line.startswith(("INFO", "DEBUG")) for line in quiet.stderr.splitlines())


def test_log_levels_and_context(capsys):
    from asyncdiff.logs import configure, level_of, where

    with pytest.raises(ValueError, match=r"ASYNCDIFF_LOG='loud' is not a log level: use one of debug, info, warning"):
        level_of("loud")
    try:
        configure("debug")
        log = logging.getLogger("asyncdiff.engine.example")
        with where(stage=1, step=7):
            log.debug("a transfer")
        log.info("outside a step")
        err = capsys.readouterr().err.splitlines()
        assert err == ["DEBUG asyncdiff.engine.example [stage 1 | step 7] a transfer",
                       "INFO asyncdiff.engine.example  outside a step"]
    finally:
        configure("warning")
        os.environ.pop("ASYNCDIFF_LOG", None)
