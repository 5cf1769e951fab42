"""The command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from asyncdiff.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncdiff.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_on_two_processes_writes_image_and_json(tmp_path):
    out = tmp_path / "cat.png"
    done = run_cli("generate", "--devices", "2", "--steps", "4", "--warm-up", "1", "--seed", "3",
                   "--prompt", "a cat", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["devices"] == 2 and record["steps"] == 4 and record["warm_up"] == 1
    assert record["out"] == str(out) and record["denoise_s"] > 0 and record["denoiser_calls"] == 4
    assert sum(record["plan"]) == 48  # every block of the tiny UNet in some stage
    with Image.open(out) as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["generate", "--devices", "0"], "argument --devices: 0 must be >= 1"),
    (["generate", "--warm-up", "-2"], "argument --warm-up: -2 must be >= 0"),
    (["generate", "--stride", "3"], "argument --stride: invalid choice: 3"),
    (["generate", "--size", "huge"], "argument --size: invalid choice: 'huge'"),
])
def test_bad_arguments_name_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_setting_fails_before_starting_processes(capsys):
    assert main(["generate", "--devices", "2", "--stride", "2"]) == 2
    assert "devices=2 with stride=2 leaves fewer than 2 stages; use devices >= 3" in capsys.readouterr().err
    assert main(["generate", "--pipeline", "svd", "--out", "x.png"]) == 2
    assert "svd makes a video; write .gif or .mp4" in capsys.readouterr().err
