"""The command line, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from asyncdiff.cli import main
from commands import cli_here, run_cli


@pytest.mark.slow
def test_generate_on_two_processes_writes_image_and_json(tmp_path, capsys):
    out = tmp_path / "cat.png"
    done = run_cli("generate", "--devices", "2", "--steps", "4", "--warm-up", "1", "--seed", "3",
                   "--prompt", "a cat", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["devices"] == 2 and record["steps"] == 4 and record["warm_up"] == 1
    assert record["out"] == str(out) and record["denoise_s"] > 0 and record["denoiser_calls"] == 4
    assert sum(record["plan"]) == 48  # every block of the tiny UNet in some stage
    # memory per rank: each holds part of the denoiser's weights (both hold the replicated time embedding)
    whole = cli_here(capsys, "generate", "--devices", "1", "--steps", "1", "--out", str(tmp_path / "seq.png"))["denoiser_mb"]
    assert len(whole) == 1 and len(record["denoiser_mb"]) == 2 and record["peak_memory"] == "peak RSS"
    assert all(0 < held < whole[0] for held in record["denoiser_mb"]) and sum(record["denoiser_mb"]) >= whole[0]
    assert all(peak > 0 for peak in record["peak_mb"])
    with Image.open(out) as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["generate", "--devices", "0"], "argument --devices: 0 must be >= 1"),
    (["generate", "--warm-up", "-2"], "argument --warm-up: warm_up=-2 must be an integer >= 0"),
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


@pytest.mark.slow
def test_inspect_json_is_a_plan_for_generate(tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert main(["inspect", "--size", "tiny", "--stages", "2", "--cost", "flops", "--bandwidth", "none",
                 "--json", str(plan_file)]) == 0
    stages = [len(s["blocks"]) for s in json.loads(plan_file.read_text())["stages"]]
    capsys.readouterr()
    record = cli_here(capsys, "generate", "--devices", "2", "--steps", "2", "--plan", str(plan_file), "--out",
                      str(tmp_path / "p.png"))
    assert record["plan"] == stages


def test_generate_with_an_input_picture(tmp_path, capsys):
    picture = tmp_path / "low.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(picture)
    out = tmp_path / "up.png"
    cli_here(capsys, "generate", "--pipeline", "sd-upscaler", "--devices", "1", "--steps", "2", "--image", str(picture),
             "--out", str(out))
    with Image.open(out) as image:
        assert image.size == (96, 64)  # the x4 upscaler
    assert main(["generate", "--image", str(tmp_path / "missing.png")]) == 2


@pytest.mark.slow
def test_bench_table_json_and_plot(tmp_path):
    done = run_cli("bench", "--size", "tiny", "--devices", "1,2", "--steps", "3", "--warm-up", "1",
                   "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| devices | mesh (guidance x batch x stages) | stride | warm-up | seconds | speed-up |" in done.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["devices"], r["stride"]) for r in rows] == [(1, 1), (2, 1)]
    assert rows[0]["speedup"] == 1.0 and rows[1]["deviation"] > 0  # warm-up 1 of 3 steps: stale inputs
    assert 0 < rows[1]["denoiser_mb"] < rows[0]["denoiser_mb"] and rows[1]["peak_mb"] > 0  # a stage, not the model
    assert "| denoiser MB/rank (max) | peak MB/rank (max) |" in done.stdout
    with Image.open(tmp_path / "b.png") as plot:
        assert plot.size[0] > 100
    assert main(["bench", "--devices", "1,x"]) == 2


@pytest.mark.slow
def test_same_command_same_plan_and_same_image_in_fresh_processes(tmp_path, monkeypatch, capsys):
    """Note [plan cache]: the first run measures and keeps its plan; later runs of the same command
    read it, so they cut the same way and give bit-identical latents; --replan measures again."""
    monkeypatch.setenv("ASYNCDIFF_PLAN_CACHE", str(tmp_path / "plans"))
    records, images = [], []
    for i, extra in enumerate([(), (), (), ("--replan",)]):
        out = tmp_path / f"run{i}.png"
        records.append(cli_here(capsys, "generate", "--devices", "2", "--steps", "3", "--warm-up", "1", "--seed", "5",
                                "--out", str(out), *extra))
        with Image.open(out) as image:
            images.append(image.tobytes())
    saved = next((tmp_path / "plans").glob("*.json"))
    assert records[0]["plan_source"].startswith(f"measured now, saved to {saved}; fidelity rule: ")
    assert [r["plan_source"] for r in records[1:3]] == [f"cached at {saved}"] * 2
    assert records[3]["plan_source"].startswith(f"measured now, saved to {saved}")
    assert records[0]["plan"] == records[1]["plan"] == records[2]["plan"]
    assert images[0] == images[1] == images[2]
    assert records[0]["main_path_depth"] in (1, 2)  # contiguous or wrapped 2-stage plan


@pytest.mark.slow
def test_guidance_parallel_gives_the_sequential_picture_and_auto_lists_its_options(tmp_path, capsys):
    """Note [hybrid mesh]: the guidance halves on two processes; Note [choosing the mesh]: auto."""
    records, pictures = {}, {}
    for label, extra in (("sequential", ("--devices", "1")), ("guidance", ("--devices", "2", "--guidance-parallel")),
                         ("auto", ("--devices", "2", "--parallel", "auto", "--cost", "flops"))):
        out = tmp_path / f"{label}.png"
        records[label] = cli_here(capsys, "generate", "--steps", "3", "--seed", "2", "--out", str(out), *extra)
        with Image.open(out) as image:
            pictures[label] = np.asarray(image, dtype=np.int16)
    assert (records["guidance"]["guidance"], records["guidance"]["stages"]) == (2, 1)
    assert records["guidance"]["main_path_depth"] == 0
    assert np.abs(pictures["guidance"] - pictures["sequential"]).max() <= 1  # float noise, at most 1/255
    options = records["auto"]["parallel_options"]
    assert [(o["guidance"], o["stages"], o["main_path_depth"]) for o in options] == [(1, 2, 1), (2, 1, 0)]
    assert (records["auto"]["guidance"], records["auto"]["stages"]) == (2, 1)  # FLOPs: the exact split is faster


def test_mesh_arithmetic_errors_before_starting_processes(capsys):
    assert main(["generate", "--devices", "3", "--guidance-parallel"]) == 2
    assert ("devices=3 is not a multiple of guidance=2 x batch=1 = 2 slices; use devices = a multiple of 2"
            in capsys.readouterr().err)
    assert main(["generate", "--devices", "1", "--batch-parallel", "2"]) == 2
    assert "guidance/batch parallelism and parallel='auto' need devices >= 2" in capsys.readouterr().err
    assert main(["bench", "--slices", "3x1"]) == 2
    assert "--slices='3x1' must list settings of 1x1, 2x1, 1x2, 2x2, auto" in capsys.readouterr().err


def test_inspect_lists_every_way_to_use_the_devices(capsys):
    assert main(["inspect", "--size", "tiny", "--devices", "4", "--cost", "flops", "--bandwidth", "nvlink"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "4 devices, denoiser batch 2, stride 1, flops on nvlink" in lines[0]
    assert [line[2:].split(":")[0] for line in lines[1:]] == [
        "guidance 1 x batch 1 x stages 4", "guidance 2 x batch 1 x stages 2"]
    assert sum(line.startswith("*") for line in lines[1:]) == 1
    assert all(line.endswith("step(s) stale") for line in lines[1:])  # a guidance half of 2 is 2 stages again


@pytest.mark.parametrize("devices", ["1", "2"])
def test_user_errors_read_the_same_at_any_device_count(devices, tmp_path, capsys):
    """Checked before any process starts: one line, exit code 2, whatever --devices says."""
    for args, message in [
        (["--out", str(tmp_path / "missing" / "x.png")], f"the folder '{tmp_path / 'missing'}' does not exist"),
        (["--out", str(tmp_path / "x.bmp")], "has no known suffix; write .png, .jpg or .webp (images)"),
        (["--model", str(tmp_path / "no-model")], "is not a folder (and not a hub id, which is 'owner/name')"),
    ]:
        assert main(["generate", "--devices", devices, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_json_is_the_last_line_even_with_the_progress_bar_on_the_same_stream(tmp_path):
    done = subprocess.run([sys.executable, "-m", "asyncdiff.cli", "generate", "--devices", "1", "--steps", "2",
                           "--out", str(tmp_path / "a.png")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    assert "requires torchvision" not in done.stdout  # a library notice that is not the user's business


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("asyncdiff ")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "denoising steps (default: 20)" in " ".join(capsys.readouterr().out.split())


def test_more_processes_than_cores_is_said(monkeypatch):
    from asyncdiff.generate import GenerateSpec, _warn_oversubscribed

    monkeypatch.setenv("ASYNCDIFF_DEVICE", "cpu")
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1}, raising=False)
    with pytest.warns(UserWarning, match=r"devices=3 x threads-per-device=1 = 3 threads on 2 CPU cores"):
        _warn_oversubscribed(GenerateSpec(devices=3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_oversubscribed(GenerateSpec(devices=2))  # fits: nothing said


@pytest.mark.slow
def test_demo_puts_the_sequential_and_the_parallel_digits_side_by_side(tmp_path):
    out = tmp_path / "digits.png"
    done = run_cli("demo", "--steps", "6", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["samples"] == 16 and result["speedup"] > 0
    assert 10 < result["psnr_db"] < 80  # stale inputs: close to the sequential digits, not equal
    assert 0.5 <= result["same_digit"] <= 1 and 0 < result["confidence_parallel"] <= 1
    assert "sequential (left) and on 2 processes" in done.stderr
    with Image.open(out) as picture:  # two 4 x 4 grids of 64-pixel tiles with 4-pixel gaps, 24 pixels apart
        assert picture.size == (2 * (4 * 64 + 3 * 4) + 24, 4 * 64 + 3 * 4)


def test_engine_flags_are_derived_from_engine_config(capsys):
    """Note [one config]: every EngineConfig setting is a flag with the field's help and default,
    and the flags come back as one EngineConfig for the run."""
    import dataclasses

    from asyncdiff.cli import _engine_settings, _parser
    from asyncdiff.engine.config import EngineConfig
    from asyncdiff.generate import GenerateSpec

    parser = _parser()
    args = parser.parse_args(["generate", "--devices", "3", "--stride", "2", "--transfer-dtype", "bfloat16",
                              "--no-verify", "--layouts", "contiguous", "--timeout", "60", "--max-slowdown", "0"])
    config = GenerateSpec(devices=3, engine=_engine_settings(args)).config
    assert config == EngineConfig(model_n=2, stride=2, transfer_dtype="bfloat16", verify=False, layouts=("contiguous",),
                                  timeout_s=60.0, max_slowdown=0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(EngineConfig):
        if "help" in f.metadata and f.name != "model_n":
            assert " ".join(f.metadata["help"].split()) in text, f.name
    assert main(["generate", "--devices", "2", "--timeout", "0"]) == 2
    assert "timeout_s=0.0 must be a number of seconds > 0" in capsys.readouterr().err


def test_api_settings_are_engine_config_fields():
    from asyncdiff.adapters.api import engine_config
    from asyncdiff.engine.config import EngineConfig

    assert engine_config(None, model_n=2, cost="flops") == EngineConfig(model_n=2, cost="flops")
    with pytest.raises(TypeError, match="unknown setting.s. transfer_dtypes; the engine's settings are the fields"):
        engine_config(None, model_n=2, transfer_dtypes="bfloat16")
    given = EngineConfig(model_n=4, warm_up=3)
    assert engine_config(given, model_n=2, warm_up=1) is given  # the seed API's defaults do not override it
    with pytest.raises(ValueError, match="warm_up=2 given beside config"):
        engine_config(given, warm_up=2)


def _saved(tmp_path_factory, name: str):
    """A built-in system's tiny pipeline saved with ``save_pretrained``: a checkpoint folder."""
    from asyncdiff.models.builders import system

    folder = tmp_path_factory.mktemp(f"{name}-checkpoint")
    system(name).build("tiny", 0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return _saved(tmp_path_factory, "sd15")


@pytest.mark.slow
def test_generate_a_checkpoint_with_dtype_size_and_negative_prompt(sd15_folder, tmp_path, capsys):
    """Issue 24 item 2, first part: a saved checkpoint in bfloat16 at 48x32 with a negative prompt,
    on one process and on two with every step a warm-up step: the same pixels."""
    args = ("generate", "--model", str(sd15_folder), "--steps", "2", "--dtype", "bfloat16", "--height", "32",
            "--width", "48", "--negative-prompt", "blurry", "--guidance-scale", "7")
    one = cli_here(capsys, *args, "--devices", "1", "--out", str(tmp_path / "one.png"))
    two = cli_here(capsys, *args, "--devices", "2", "--warm-up", "2", "--out", str(tmp_path / "two.png"))
    assert one["dtype"] == two["dtype"] == "bfloat16"
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert one.size == (48, 32)
        assert np.array_equal(np.asarray(one), np.asarray(two))
    # the negative prompt reaches the pipeline: another picture than without it
    cli_here(capsys, *args[:-4], "--guidance-scale", "7", "--devices", "1", "--out", str(tmp_path / "plain.png"))
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "plain.png") as plain:
        assert not np.array_equal(np.asarray(one), np.asarray(plain))


@pytest.mark.parametrize("args, message", [
    (["--height", "30"], "height=30 must be a multiple of 8, at least 8 (the VAE's factor); e.g. height=32"),
    (["--dtype", "float16"], "dtype='float16' applies to weights loaded with --model; the built-in systems are "
                             "float32: drop --dtype or pass --model"),
    (["--scheduler", "Euler"], "scheduler='Euler' is not a diffusers scheduler; use a class name such as"),
    (["--prompts-file", "missing.txt"], "prompts_file='missing.txt' is not a file; pass an existing path to "
                                        "--prompts-file"),
    (["--guidance-scale", "-1"], "guidance_scale=-1.0 must be a number >= 0"),
])
@pytest.mark.parametrize("devices", ["1", "2"])
def test_bad_call_settings_are_one_line_at_any_device_count(args, message, devices, capsys):
    assert main(["generate", "--devices", devices, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asyncdiff generate: error: {message}") and err.count("\n") == 1, err


def test_a_call_setting_the_pipeline_lacks_names_the_flag(capsys):
    assert main(["generate", "--pipeline", "digits", "--devices", "1", "--steps", "1", "--negative-prompt", "x"]) == 2
    assert "takes no negative_prompt; leave negative_prompt out (--negative-prompt)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return _saved(tmp_path_factory, "wan")


@pytest.mark.slow
def test_a_prompts_file_loads_once_and_writes_each_picture_with_a_manifest(sd15_folder, tmp_path, capsys):
    """Issue 24 item 2: one output per line, numbered, and a manifest; each picture is the one that
    line gives alone (its prompt, seed, scheduler), and a line's second image is seed + 1's."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a cat\n{"prompt": "a dog", "seed": 4, "n": 2}\n')
    common = ("generate", "--model", str(sd15_folder), "--steps", "2", "--devices", "2", "--warm-up", "2",
              "--scheduler", "EulerDiscreteScheduler")
    record = cli_here(capsys, *common, "--prompts-file", str(prompts), "--out", str(tmp_path / "many.png"))
    manifest = json.loads((tmp_path / "many.manifest.json").read_text())
    assert [m["out"] for m in manifest] == [str(tmp_path / "many-0000.png"), str(tmp_path / "many-0001.png")]
    assert [(m["prompt"], m["seed"], m["n"]) for m in manifest] == [("a cat", 0, 1), ("a dog", 4, 2)]
    assert record["manifest"] == manifest
    cli_here(capsys, *common, "--prompt", "a dog", "--seed", "4", "--out", str(tmp_path / "dog.png"))
    with Image.open(tmp_path / "many-0001.png") as many, Image.open(tmp_path / "dog.png") as alone:
        # the same picture up to rounding: a batch of two and a batch of one (each split by its own measured
        # plan) agree to float precision, which can move a pixel by one level; another seed moves them all
        difference = np.abs(np.asarray(many, dtype=np.int16) - np.asarray(alone, dtype=np.int16))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())
    # the scheduler reached the pipeline: another picture than the checkpoint's own (PNDM) scheduler
    cli_here(capsys, *common[:-2], "--prompt", "a dog", "--seed", "4", "--out", str(tmp_path / "own.png"))
    with Image.open(tmp_path / "own.png") as own, Image.open(tmp_path / "dog.png") as euler:
        assert not np.array_equal(np.asarray(own), np.asarray(euler))


@pytest.mark.slow
def test_generate_a_dit_checkpoint_on_two_processes_as_on_one(wan_folder, tmp_path, capsys):
    """Issue 24 item 2: a DiT-shaped checkpoint (Wan 2.1's text-to-video transformer, its guidance
    two denoiser calls per step) saved here, loaded in bfloat16 at a size with a negative prompt:
    two processes with every step a warm-up step give the one-process frames."""
    import imageio.v3 as iio

    args = ("generate", "--model", str(wan_folder), "--steps", "2", "--dtype", "bfloat16", "--height", "32",
            "--width", "48", "--negative-prompt", "blurry", "--guidance-scale", "5")
    one = cli_here(capsys, *args, "--devices", "1", "--out", str(tmp_path / "one.gif"))
    two = cli_here(capsys, *args, "--devices", "2", "--warm-up", "2", "--out", str(tmp_path / "two.gif"))
    assert one["dtype"] == two["dtype"] == "bfloat16" and two["stages"] == 2
    first, second = iio.imread(tmp_path / "one.gif"), iio.imread(tmp_path / "two.gif")
    assert first.shape[1:3] == (32, 48) and np.array_equal(first, second)
