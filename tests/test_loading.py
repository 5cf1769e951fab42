"""Stage-only loading (Note [stage-only loading]): each rank reads only its stage's weights from
a saved pipeline folder, and the pipeline still computes what the whole model computes."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from toys import stage_only_scenario

from asyncdiff.adapters.loading import load_stage_only
from asyncdiff.engine.launch import launch as launch_fresh
from pool import launch
from asyncdiff.models.sd import build_sd15

STEPS = 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    pipe = build_sd15("tiny", 0)
    pipe.save_pretrained(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    pipe.unet.save_pretrained(folder / "unet", max_shard_size="1MB")  # shards and an index, as large models come
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return folder


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def test_each_rank_loads_its_stage_and_the_result_is_the_model(saved):
    reference = DiffusionPipeline.from_pretrained(saved)
    whole = _bytes(reference.unet)
    with torch.no_grad():
        want = reference("a cat", num_inference_steps=STEPS, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images
    results = launch(stage_only_scenario, 2, str(saved), STEPS)
    for rank, r in results.items():
        assert 0 < r["loaded"] < whole, (rank, r["loaded"], whole)  # never the whole denoiser
        assert r["released"] > 0 and r["source"].startswith("counted now (FLOPs)")
        assert r["checks"] == 1  # Note [verify on stage-only loads]: the first call's split was checked
        assert r["after_remove"] == whole  # remove(): the whole denoiser, gathered from the owners
        # all warm-up: the sequential model, bit for bit as the same process computes it after
        # remove() (Note [reload from the checkpoint]: the weights at the addresses a whole load gives)
        torch.testing.assert_close(r["latents"], r["plain_after_remove"], rtol=0, atol=0)
        # ... which is the pipeline loaded whole (here with more threads: float noise only)
        torch.testing.assert_close(r["plain_after_remove"], want, rtol=1e-4, atol=1e-4)
    assert results[0]["loaded"] + results[1]["loaded"] >= whole


@pytest.mark.slow
def test_a_split_that_differs_from_the_model_stops_every_rank_on_a_stage_only_load(saved):
    """Note [verify on stage-only loads]: the check streams the other stages' weights to the first
    rank; here its eager reference is made to differ, and every rank must stop with the error."""
    results = launch_fresh(stage_only_scenario, 2, str(saved), STEPS, "every", 1, "split")
    errors = {r["error"].split("] ", 1)[-1] for r in results.values()}
    assert len(errors) == 1 and "does not reproduce UNet2DConditionModel: output 0 differs by" in errors.pop()


def test_stage_only_load_keeps_other_stages_as_placeholders(saved):
    load = load_stage_only(str(saved), denoiser_attr=None, latent="sample", model_n=2, stage=1,
                           device=torch.device("cpu"), torch_dtype=torch.float16)
    unet = load.pipeline.unet
    assert not any(t.is_meta for t in (*unet.parameters(), *unet.buffers()))
    mine = set(load.plan.stages[1])
    for name, (shape, dtype, _) in load.released.items():
        assert unet.get_parameter(name).numel() == 0 and dtype == torch.float16 and len(shape) > 0
        assert not any(name.startswith(f"{block}.") for block in mine)
    assert all(p.dtype == torch.float16 for p in unet.parameters())
    assert load.pipeline.text_encoder.dtype == torch.float16  # the other components load as usual


def test_a_folder_without_safetensors_is_a_clear_error(saved, tmp_path):
    with pytest.raises(ValueError, match="is not a diffusers pipeline folder"):
        load_stage_only(str(tmp_path), denoiser_attr=None, latent=None, model_n=2, stage=0, device=torch.device("cpu"))


def test_a_checkpoint_without_safetensors_says_how_to_load_it(tmp_path):
    pipe = build_sd15("tiny", 0)
    pipe.save_pretrained(tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    pipe.unet.save_pretrained(tmp_path / "unet", safe_serialization=False)  # a .bin checkpoint
    with pytest.raises(ValueError, match=r"has no diffusion_pytorch_model.safetensors \(or its index\): stage-only "
                                         r"loading reads safetensors; save the model with save_pretrained"):
        load_stage_only(str(tmp_path), denoiser_attr=None, latent=None, model_n=2, stage=0, device=torch.device("cpu"))


def test_a_missing_or_damaged_shard_is_a_clear_error_naming_it(tmp_path):
    """A sharded checkpoint with a shard cut short, then missing: each is an error naming the file."""
    import re

    pipe = build_sd15("tiny", 0)
    pipe.save_pretrained(tmp_path)
    folder = tmp_path / "unet"
    for file in folder.glob("*.safetensors"):
        file.unlink()
    pipe.unet.save_pretrained(folder, max_shard_size="100KB")  # shards and their index
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    shards[1].write_bytes(shards[1].read_bytes()[:-1000])

    def load() -> None:
        load_stage_only(str(tmp_path), denoiser_attr=None, latent=None, model_n=2, stage=0, device=torch.device("cpu"))

    with pytest.raises(ValueError, match=rf"cannot read checkpoint file {re.escape(str(shards[1]))} \(.*\): it is "
                                         r"damaged or incomplete; download or save the model again"):
        load()
    shards[1].unlink()
    with pytest.raises(ValueError, match=rf"checkpoint shard {re.escape(str(shards[1]))} is missing \(diffusion_"
                                         r"pytorch_model.safetensors.index.json names it for '.*' and others\)"):
        load()


def test_text_encoders_never_load_on_the_other_ranks(saved):
    """Note [encoders on one rank] with stage-only loading: rank 1 builds the text encoder without
    weights and receives the embeddings; the result is the model's; remove() brings it back."""
    whole = _bytes(DiffusionPipeline.from_pretrained(saved).text_encoder)
    results = launch(stage_only_scenario, 2, str(saved), STEPS, "rank0")
    assert results[0]["encoder"] == whole and results[1]["encoder"] == 0
    for r in results.values():
        assert r["encoder_after_remove"] == whole
        torch.testing.assert_close(r["latents"], r["plain_after_remove"], rtol=0, atol=0)
    torch.testing.assert_close(results[1]["latents"], results[0]["latents"], rtol=0, atol=0)


def test_stage_only_loading_in_guidance_slices(saved):
    """Note [hybrid mesh] with Note [stage-only loading]: 4 processes, guidance 2 x stages 2; each
    rank loads the stage it runs in its slice."""
    results = launch(stage_only_scenario, 4, str(saved), STEPS, "every", 2)
    for rank, r in results.items():
        assert r["loaded"] == results[rank % 2]["loaded"]  # the same stage in both slices
        # each slice runs the denoiser on its guidance half: bit for bit the denoiser run on the halves ...
        torch.testing.assert_close(r["latents"], r["plain_in_chunks_after_remove"], rtol=0, atol=0)
        # ... which differs from the run on the whole batch by float noise only (Note [batch split])
        torch.testing.assert_close(r["latents"], r["plain_after_remove"], rtol=0, atol=5e-4)
    assert results[0]["loaded"] != results[1]["loaded"]
    # each slice's share checked against the denoiser, and the whole batch against the slices' outputs
    assert [(r["checks"], r["split_checks"]) for r in results.values()] == [(1, 1)] * 4


@pytest.mark.slow
def test_a_batch_that_does_not_split_exactly_stops_every_rank_on_a_stage_only_load(saved):
    """Note [batch split] on a stage-only load: the whole batch's output from the slices is checked
    against one streamed eager run on the whole batch; a denoiser whose output on the batch differs
    from its outputs on the chunks (here: made so) stops every rank with the same error."""
    results = launch_fresh(stage_only_scenario, 4, str(saved), STEPS, "every", 2, "batch")
    errors = {r["error"].split("] ", 1)[-1] for r in results.values()}
    assert len(errors) == 1, errors
    assert "gives other values on a split batch" in errors.pop()


def test_a_block_run_twice_cannot_be_streamed_and_says_so():
    """Note [verify on stage-only loads]: a block's weights are streamed once per check, so a
    denoiser that runs a foreign block twice is not checked, with a warning on every rank (not an
    error); the run itself is exact."""
    from toys import twice_stage_only

    for r in launch(twice_stage_only, 2, 2).values():
        torch.testing.assert_close(r["split"], r["plain"], rtol=0, atol=0)
        said = [w for w in r["warnings"] if "could not be checked" in w]
        assert len(said) == 1 and "shared runs twice in one call; its weights were streamed once" in said[0], r["warnings"]


def test_a_loaded_pipeline_keeps_only_its_stage_before_the_first_call():
    """What ``AsyncDiff(pipeline)`` does on a GPU with the pipeline still on the CPU (here run with
    the CPU as the device): plan without weights, free the other stages' weights, move the rest;
    the run is the model's, checked as a stage-only load is, and remove() makes it whole again."""
    from toys import in_memory_stage_scenario

    results = launch(in_memory_stage_scenario, 2, 2)
    for r in results.values():
        assert r["source"].startswith("counted now (bytes)"), r["source"]
        assert 0.35 * r["whole"] < r["held"] < 0.65 * r["whole"]  # about half the UNet, by bytes
        assert r["checks"] == 1 and r["after_remove"] == r["whole"]
        torch.testing.assert_close(r["split"], r["plain"], rtol=0, atol=0)
    assert results[0]["held"] + results[1]["held"] < 1.1 * results[0]["whole"]


def test_a_denoiser_that_needs_its_weights_to_trace_loads_whole_with_a_warning(tmp_path):
    """Note [value trace] under from_pretrained: Lumina2's denoiser cannot be planned weight-free,
    so every rank loads it whole, says so, and releases the other stages' weights after the first
    call; the result is the model's."""
    from asyncdiff.models.coverage import case
    from toys import value_traced_from_pretrained

    pipe, _ = case("lumina2").build()
    pipe.save_pretrained(tmp_path)  # without its (absent) text encoder and tokenizer
    for r in launch(value_traced_from_pretrained, 2, str(tmp_path), 2).values():
        said = [w for w in r["warnings"] if "cannot be planned without its weights" in w]
        assert len(said) == 1 and "the peak memory per rank is the whole denoiser" in said[0], r["warnings"]
        assert r["released"] > 0
        torch.testing.assert_close(r["split"], r["plain"], rtol=1e-5, atol=1e-5)


def test_a_stage_loaded_alone_holds_the_bits_of_that_stage_of_the_whole_model(saved):
    """Note [stage-only loading]: every tensor a stage loads is the whole load's tensor, bit for bit,
    in dtype, shape and strides; the others are 0-size placeholders of the true dtype."""
    whole = DiffusionPipeline.from_pretrained(saved).unet
    want = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    for stage in (0, 1):
        load = load_stage_only(str(saved), denoiser_attr=None, latent="sample", model_n=2, stage=stage,
                               device=torch.device("cpu"))
        unet = load.pipeline.unet
        held = {**dict(unet.named_parameters()), **dict(unet.named_buffers())}
        assert held.keys() == want.keys()
        for name, t in held.items():
            if name in load.released:
                assert t.numel() == 0 and t.dtype == want[name].dtype, name
            else:
                assert t.dtype == want[name].dtype and t.stride() == want[name].stride(), name
                assert torch.equal(t, want[name]), name
        assert 0 < len(load.released) < len(want)
