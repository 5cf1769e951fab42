"""Note [run records]: every rank's steps as JSON lines, the same for the same run."""

from __future__ import annotations

import pytest

from asyncdiff.engine.record import read_record
from commands import cli_here


@pytest.mark.slow
def test_a_recorded_run_names_each_step_s_kind_program_bytes_and_checksums(tmp_path, capsys):
    common = ("generate", "--devices", "2", "--steps", "4", "--warm-up", "2", "--cost", "flops", "--refresh-drift",
              "0", "--out", str(tmp_path / "out.png"))
    first, again, other = (tmp_path / f"{name}.jsonl" for name in ("first", "again", "other"))
    cli_here(capsys, *common, "--record", str(first))
    cli_here(capsys, *common, "--record", str(again))
    cli_here(capsys, *common, "--seed", "1", "--record", str(other))
    records = read_record(first)
    assert [(r["rank"], r["step"]) for r in records] == [(rank, step) for step in range(4) for rank in (0, 1)]
    by_step = {(r["rank"], r["step"]): r for r in records}
    # warm-up, then drift past 0 turns every asynchronous step into a refresh: decided, with the reason
    assert [by_step[0, t]["kind"] for t in range(4)] == ["warm-up", "warm-up", "refresh", "refresh"]
    assert by_step[0, 0]["why"] == "step 0 < warm_up=2" and by_step[1, 3]["why"].startswith("drift ")
    assert "send 0>1" in by_step[0, 0]["program"] and "recv 0>1" in by_step[1, 0]["program"]
    assert by_step[0, 0]["bytes_sent"] == by_step[1, 0]["bytes_received"] > 0
    assert by_step[1, 2]["inputs"] and all(by_step[1, 2]["inputs"].values())
    assert by_step[0, 0]["timestep"] > by_step[0, 3]["timestep"]  # the scheduler's values, counting down
    # the same run again: the same checksums at every step; another seed: another output from step 0
    assert [(r["inputs"], r["output"]) for r in read_record(again)] == [(r["inputs"], r["output"]) for r in records]
    assert read_record(other)[0]["output"] != records[0]["output"]


def test_recording_needs_stages_and_a_folder(capsys):
    from asyncdiff.cli import main

    assert main(["generate", "--devices", "1", "--record", "r.jsonl"]) == 2
    assert "record needs devices >= 2" in capsys.readouterr().err
    assert main(["generate", "--devices", "2", "--record", "/no/such/folder/r.jsonl"]) == 2
    assert "record='/no/such/folder/r.jsonl': the folder '/no/such/folder' does not exist" in capsys.readouterr().err
