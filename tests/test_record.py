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


def _replay(capsys, record) -> tuple[int, str]:
    from asyncdiff.cli import main

    rc = main(["inspect", "--replay", str(record)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.mark.slow
def test_a_stride_2_time_shift_fp8_run_on_3_processes_replays_identically_and_a_changed_value_is_found(
        tmp_path, capsys):
    """Note [replay]: the record of 3 processes, replayed in one through the in-process transport,
    equals the run at every step, rank and boundary value; a checksum changed in the record is
    named by its step, rank and value."""
    import json

    record = tmp_path / "run.jsonl"
    cli_here(capsys, "generate", "--devices", "3", "--stride", "2", "--time-shift", "--transfer-dtype", "float8",
             "--steps", "7", "--warm-up", "2", "--cost", "flops", "--out", str(tmp_path / "out.png"),
             "--record", str(record))
    rc, text = _replay(capsys, record)
    assert rc == 0 and "replay identical: 7 steps x 3 ranks" in text, text
    entries = read_record(record)
    assert {e["kind"] for e in entries} == {"warm-up", "round", "reuse"}
    lines = record.read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if '"step": 4' in line and '"rank": 1' in line)
    entry = json.loads(lines[target])
    name = sorted(entry["inputs"])[0]
    entry["inputs"][name] = "0" * 16
    lines[target] = json.dumps(entry)
    record.write_text("\n".join(lines) + "\n")
    rc, text = _replay(capsys, record)
    assert rc == 1 and f"step 4 ({entry['kind']}), rank 1: boundary value {name!r}" in text, text


@pytest.mark.slow
def test_a_default_run_replays_identically_across_its_measured_plan_choice(tmp_path, capsys):
    """The default plan rule measures candidates after the warm-up and may switch plans there
    (Note [measured plan choice]): the replay follows the record's plans."""
    record = tmp_path / "run.jsonl"
    cli_here(capsys, "generate", "--devices", "2", "--steps", "5", "--compensate", "linear", "--warm-up", "2",
             "--refresh-drift", "0.3", "--out", str(tmp_path / "out.png"), "--record", str(record))
    assert sum("plan" in e for e in read_record(record)) >= 2  # each rank's first entry names its plan
    rc, text = _replay(capsys, record)
    assert rc == 0 and "replay identical: 5 steps x 2 ranks" in text, text


def test_replay_needs_a_generate_record(tmp_path, capsys):
    plain = tmp_path / "steps.jsonl"
    plain.write_text('{"call": 1, "denoiser": "UNet", "index": 0, "rank": 0, "branch": 0}\n')
    rc, text = _replay(capsys, plain)
    assert rc == 2 and "has no run line: replay needs a record written by asyncdiff generate --record" in text
    rc, text = _replay(capsys, tmp_path / "missing.jsonl")
    assert rc == 2 and "--replay=" in text and "is not a file" in text


@pytest.mark.slow
def test_two_calls_per_step_replay_identically_each_branch_on_its_own(tmp_path, capsys):
    """Wan's guidance is two denoiser calls per step, each with its own stale state (Note
    [branches]). Without a transfer dtype the stale values are views into the buffers the step's
    own receives reuse, so the record takes their checksums before the step (an earlier record
    read them after, and this replay found it)."""
    record = tmp_path / "wan.jsonl"
    cli_here(capsys, "generate", "--pipeline", "wan", "--devices", "2", "--steps", "4", "--cost", "flops",
             "--out", str(tmp_path / "wan.gif"), "--record", str(record))
    assert {(e["branch"], e["kind"]) for e in read_record(record)} == {(b, k) for b in (0, 1) for k in ("warm-up", "async")}
    rc, text = _replay(capsys, record)
    assert rc == 0 and "replay identical: 8 steps x 2 ranks" in text, text
