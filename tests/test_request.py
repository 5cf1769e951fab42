"""The request record (Note [one request record]): its checks, and the one mapping to a pipeline call."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from PIL import Image

from asyncdiff.generate import GenerateSpec, scheduler_class
from asyncdiff.request import read_prompts
from asyncdiff.request import GenerationRequest, Limits, batch_key, call_arguments, decode_picture


def pipeline_taking(*names: str) -> type:
    """A stand-in pipeline class whose ``__call__`` takes ``names``."""
    namespace: dict = {}
    exec(f"def __call__(self, {', '.join(f'{n}=None' for n in names)}): pass", namespace)
    return type("ToyPipeline", (), {"__call__": namespace["__call__"]})


SD = pipeline_taking("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                     "generator", "num_images_per_prompt")


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps=0 must be an integer >= 1 (the denoising steps)"),
    ({"steps": 2.5}, "steps=2.5 must be an integer >= 1"),
    ({"n": True}, "n=True must be an integer >= 1 (images per prompt)"),
    ({"seed": -1}, "seed=-1 must be an integer in [0, 9223372036854775807] (the noise)"),
    ({"height": 30}, "height=30 must be a multiple of 8, at least 8 (the VAE's factor); e.g. height=32"),
    ({"width": 4}, "width=4 must be an integer >= 8 (the picture's size in pixels)"),
    ({"guidance_scale": float("nan")}, "guidance_scale=nan must be a number >= 0"),
    ({"guidance_scale": "7"}, "guidance_scale='7' must be a number >= 0"),
    ({"prompt": 3}, "prompt=3 must be a string or a non-empty list of strings"),
    ({"prompt": []}, "prompt=() must be a string or a non-empty list of strings"),
    ({"negative_prompt": 1}, "negative_prompt=1 must be a string"),
    ({"output_format": "gif"}, "output_format='gif' is not one of png, jpeg, webp"),
    ({"frames": 0}, "frames=0 must be an integer >= 1 (a video's frame count)"),
    ({"image": b"png"}, "image: a bytes is not a picture"),
])
def test_a_bad_field_names_itself_the_value_and_the_fix(fields, message):
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.").replace("+", r"\+")):
        GenerationRequest(**fields)


def test_each_image_draws_from_its_own_seed_alone_or_batched():
    one = GenerationRequest(prompt="a", seed=5, n=2, steps=3)
    other = GenerationRequest(prompt=("b", "c"), seed=9, steps=3, negative_prompt=None)
    alone = call_arguments([one], SD)
    assert alone["prompt"] == ["a", "a"] and "num_images_per_prompt" not in alone
    together = call_arguments([one, other], SD)
    assert together["prompt"] == ["a", "a", "b", "c"] and together["num_inference_steps"] == 3
    draws = [torch.randn(4, generator=g) for g in together["generator"]]
    expected = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 9, 10)]
    assert all(torch.equal(a, b) for a, b in zip(draws, expected))
    single = call_arguments([GenerationRequest(prompt="a", seed=5)], SD)
    assert single["prompt"] == "a" and isinstance(single["generator"], torch.Generator)


def test_the_mapping_names_what_the_pipeline_lacks_and_reads_no_prompt_where_it_takes_none():
    unconditional = pipeline_taking("batch_size", "num_inference_steps", "generator")
    kwargs = call_arguments([GenerationRequest(prompt="ignored", n=3)], unconditional)
    assert kwargs["batch_size"] == 3 and "prompt" not in kwargs
    with pytest.raises(ValueError, match="ToyPipeline takes no negative_prompt; leave negative_prompt out"):
        call_arguments([GenerationRequest(negative_prompt="x")], unconditional)
    with pytest.raises(ValueError, match="takes no num_frames; leave frames out$"):
        call_arguments([GenerationRequest(frames=8)], SD)


def test_only_alike_requests_share_a_call():
    a, b = GenerationRequest(prompt="a", seed=1), GenerationRequest(prompt="b", seed=2)
    assert batch_key(a) == batch_key(b)
    assert batch_key(a) != batch_key(b.replace(steps=3)) != batch_key(b.replace(height=64))
    assert batch_key(a) != batch_key(b.replace(negative_prompt="blurry"))
    assert batch_key(a.replace(image="x.png")) is None
    with pytest.raises(ValueError, match="must agree in size, steps"):
        call_arguments([a, b.replace(guidance_scale=2.0)], SD)


def test_limits_name_the_field_and_the_limit():
    limits = Limits(max_steps=10, max_images=4, max_pixels=64 * 64, max_prompt_chars=5)
    limits.check(GenerationRequest(prompt="short", steps=10, n=4, height=64, width=64))
    for fields, message in [({"steps": 11}, "steps=11 is over this server's limit of 10"),
                            ({"n": 5}, "n=5 x 1 prompt(s) = 5 images is over this server's limit of 4"),
                            ({"height": 72, "width": 64}, "size=64x72 is 4608 pixels, over this server's limit of "
                                                          "4096"),
                            ({"prompt": "too long"}, "prompt: 8 characters is over this server's limit of 5")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            limits.check(GenerationRequest(**{"prompt": "short", "steps": 10, **fields}))


def test_pictures_come_from_a_path_base64_or_a_data_url(tmp_path):
    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    picture.save(tmp_path / "p.png")
    text = base64.b64encode((tmp_path / "p.png").read_bytes()).decode()
    for given in (str(tmp_path / "p.png"), text, "data:image/png;base64," + text):
        assert decode_picture(given).getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ValueError, match="image='not a picture' is neither a file nor a base64 picture"):
        decode_picture("not a picture")


def test_a_prompts_file_is_prompts_or_json_fields_over_the_command_s(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text('a cat\n\n{"prompt": "a dog", "seed": 4, "n": 2}\n')
    first, second = read_prompts(str(path), GenerationRequest(steps=3, seed=1))
    assert (first.prompt, first.seed, first.steps) == ("a cat", 1, 3)
    assert (second.prompt, second.seed, second.n, second.steps) == ("a dog", 4, 2, 3)
    for text, message in [('{"prompt": "x", "colour": 1}\n', r"line 1: unknown field\(s\) \['colour'\]"),
                          ('{"steps": 0}\n', "line 1: steps=0 must be an integer >= 1"),
                          ("{oops\n", "line 1: Expecting property name"), ("\n", "has no prompt")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            GenerateSpec(devices=1, prompts_file=str(path))


def test_a_scheduler_is_a_diffusers_scheduler_class():
    assert scheduler_class("EulerDiscreteScheduler").__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="scheduler='Euler' is not a diffusers scheduler; use a class name such as"):
        GenerateSpec(devices=1, scheduler="Euler")
    with pytest.raises(ValueError, match="scheduler='StableDiffusionPipeline' is not a diffusers scheduler"):
        scheduler_class("StableDiffusionPipeline")


def test_a_request_is_frozen_and_json_ready():
    request = GenerationRequest(prompt=["a", "b"], seed=2)
    assert request.prompt == ("a", "b") and request.images == 2
    with pytest.raises(AttributeError):
        request.seed = 3  # type: ignore[misc]
    assert json.loads(json.dumps(request.__dict__))["prompt"] == ["a", "b"]
