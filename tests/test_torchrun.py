"""Under torchrun, as the seed's users run it: the example script and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from commands import cli_here

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_seed_two_lines_example(tmp_path):
    out = tmp_path / "example.png"
    done = torchrun(str(ROOT / "examples" / "run_sd.py"), "--steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "plan: [" in done.stdout
    with Image.open(out) as image:
        assert image.size == (64, 64)


@pytest.mark.slow
def test_generic_example_makes_a_video_with_stride_2(tmp_path):
    out = tmp_path / "video.mp4"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           str(ROOT / "examples" / "run_pipeline.py"), "--pipeline", "animatediff", "--stride", "2",
                           "--steps", "3", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 stages" in done.stdout
    import imageio.v3 as iio

    frames = iio.imread(out)
    assert frames.shape[0] == 4 and frames.ndim == 4  # 4 frames of RGB


@pytest.mark.slow
def test_cli_video_as_gif(tmp_path, capsys):
    out = tmp_path / "svd.gif"
    cli_here(capsys, "generate", "--pipeline", "svd", "--devices", "2", "--steps", "2", "--out", str(out))
    with Image.open(out) as gif:
        assert gif.n_frames > 1


@pytest.mark.slow
def test_cli_under_torchrun_matches_its_own_launcher(tmp_path, capsys):
    common = ["--devices", "2", "--steps", "3", "--warm-up", "3", "--seed", "5"]
    done = torchrun("-m", "asyncdiff.cli", "generate", *common, "--out", str(tmp_path / "a.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    assert json.loads(lines[0])["devices"] == 2
    cli_here(capsys, "generate", *common, "--out", str(tmp_path / "b.png"))
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.slow
def test_model_path_loads_saved_pipeline(tmp_path, capsys):
    from asyncdiff.models.sd import build_sd15

    build_sd15("tiny", seed=11).save_pretrained(tmp_path / "model")
    record = cli_here(capsys, "generate", "--model", str(tmp_path / "model"), "--devices", "2", "--steps", "2",
                      "--out", str(tmp_path / "m.png"))
    assert record["denoiser_calls"] == 2 and (tmp_path / "m.png").exists()
    # --model loads stage-only (Note [stage-only loading]): the FLOP plan, no rank holds the whole UNet
    whole = sum(t.numel() * t.element_size() for t in build_sd15("tiny", seed=11).unet.state_dict().values()) / 1e6
    assert record["plan_source"].startswith("counted now (FLOPs)")
    assert len(record["denoiser_mb"]) == 2 and all(0 < held < whole for held in record["denoiser_mb"])
