"""One generation run on N processes: what ``asyncdiff generate`` and the tests execute.

Example:
    >>> spec = GenerateSpec(devices=1, steps=2, size="tiny")
    >>> result = run(spec)            # doctest: +SKIP
    >>> sorted(result)[:3]            # doctest: +SKIP
    ['denoise_s', 'devices', 'latents']
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from asyncdiff.memory import memory_per_rank
from asyncdiff.outputs import manifest_path, numbered, save_output
from asyncdiff.request import GenerationRequest, call_arguments, read_prompts

from asyncdiff.models.builders import VIDEO_SYSTEMS as VIDEO_PIPELINES

__all__ = ["VIDEO_PIPELINES", "GenerateSpec", "build", "final_latents", "pipeline_call", "run", "save_output", "worker"]


# a built-in system's random weights and example pictures: always the same, whatever the run's
# seed (which seeds the noise only), so that a seed names one picture in generate and serve alike
BUILT_IN_SEED = 0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerateSpec:
    """One run: which pipeline, how it is called, on how many processes; ``engine``: the engine's
    settings, fields of :class:`~asyncdiff.engine.config.EngineConfig` (``model_n`` comes from
    ``devices``; Note [one config]), e.g. ``{"warm_up": 2, "transfer_dtype": "bfloat16"}``. Every
    check that can run before processes start runs here, so a user error reads the same at any
    device count."""

    pipeline: str = "sd15"
    size: str = "tiny"
    model: str | None = None
    devices: int = 2
    steps: int = 20
    seed: int = 0
    prompt: str = "a photo of a cat"
    out: str | None = None
    threads_per_device: int = 1
    image: str | None = None  # input picture (first frame, control picture, picture to inpaint or upscale)
    mask: str | None = None  # inpainting mask
    plan: str | None = None  # a plan JSON file to use instead of planning
    images_per_prompt: int = 1  # images per prompt (image i of a prompt: seed + i; Note [one request record])
    guidance_scale: float | None = None  # the pipeline's guidance_scale (None: its default)
    negative_prompt: str | None = None  # the pipeline's negative_prompt
    height: int | None = None  # the picture's size in pixels (None: the pipeline's default)
    width: int | None = None
    dtype: str | None = None  # the weights' dtype with --model: float32, bfloat16, float16 (None: as saved)
    scheduler: str | None = None  # a diffusers scheduler class, configured from the pipeline's own
    prompts_file: str | None = None  # one request per line: a prompt, or a JSON object of request fields
    record: str | None = None  # JSON lines of every step every rank ran (Note [run records]), replaced per run
    text_encoders: str = "every"  # "rank0": only rank 0 keeps them (Note [encoders on one rank])
    engine: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from asyncdiff.models.builders import system
        from asyncdiff.models.common import SIZE_NAMES

        system(self.pipeline)  # a ValueError naming the choices
        if self.size not in SIZE_NAMES:
            raise ValueError(f"size={self.size!r} is not a built-in size; use one of {list(SIZE_NAMES)}")
        for name in ("image", "mask", "plan", "prompts_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}={path!r} is not a file; pass an existing path to --{name.replace('_', '-')}")
        if self.out and self.pipeline in VIDEO_PIPELINES and self.model is None \
                and not self.out.endswith((".gif", ".mp4")):
            raise ValueError(f"out={self.out!r}: {self.pipeline} makes a video; write .gif or .mp4")
        if self.out:
            folder = os.path.dirname(os.path.abspath(self.out))
            if not os.path.isdir(folder):
                raise ValueError(f"out={self.out!r}: the folder {folder!r} does not exist; create it or write elsewhere")
            if not self.out.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".gif", ".mp4")):
                raise ValueError(f"out={self.out!r} has no known suffix; write .png, .jpg or .webp (images), "
                                 f".gif or .mp4 (videos)")
        if self.model is not None and _looks_local(self.model) and not os.path.isdir(self.model):
            raise ValueError(f"model={self.model!r} is not a folder (and not a hub id, which is 'owner/name'); "
                             f"pass a saved pipeline's folder or a hub id")
        if self.model is not None and os.path.isdir(self.model) \
                and not os.path.isfile(os.path.join(self.model, "model_index.json")):
            raise ValueError(f"model={self.model!r} is a folder but not a diffusers pipeline (no model_index.json); "
                             f"pass the folder a pipeline's save_pretrained wrote")
        if self.plan is not None:
            self.read_plan()  # a bad file fails here, before any process starts
        if self.text_encoders not in ("every", "rank0"):
            raise ValueError(f"text_encoders={self.text_encoders!r} must be 'every' (each rank keeps its own) "
                             f"or 'rank0' (rank 0 keeps them and broadcasts the prompt embeddings)")
        for name in ("devices", "threads_per_device"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        self.requests  # the request fields' own checks (Note [one request record]), a bad prompts file's
        if self.scheduler is not None:
            scheduler_class(self.scheduler)
        if self.record is not None:
            folder = os.path.dirname(os.path.abspath(self.record))
            if not os.path.isdir(folder):
                raise ValueError(f"record={self.record!r}: the folder {folder!r} does not exist; create it or "
                                 f"record elsewhere")
            if self.devices == 1:
                raise ValueError("record needs devices >= 2: one device runs the plain pipeline, without stages "
                                 "or steps to record")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}; pass --dtype float32, "
                             f"bfloat16 or float16")
        if self.dtype is not None and self.model is None:
            raise ValueError(f"dtype={self.dtype!r} applies to weights loaded with --model; the built-in systems "
                             f"are float32: drop --dtype or pass --model")
        config = self.config  # the engine's own checks
        if self.devices > 1:
            data = config.data
            if config.parallel is None and self.devices % data:
                raise ValueError(f"devices={self.devices} is not a multiple of guidance={config.guidance} x "
                                 f"batch={config.batch} = {data} slices; use devices = a multiple of {data}")
            if config.parallel is None and self.model_n < (2 if data == 1 else 1):
                fewer = "2 stages" if data == 1 else f"1 stage in each of {data} slices"
                raise ValueError(f"devices={self.devices} with stride={config.stride} leaves fewer than {fewer}; "
                                 f"use devices >= {data * (config.stride + (1 if data == 1 else 0))}")
        elif config.data > 1 or config.parallel is not None:
            raise ValueError("guidance/batch parallelism and parallel='auto' need devices >= 2")

    @property
    def request(self) -> GenerationRequest:
        """The call this spec's fields describe (Note [one request record])."""
        return GenerationRequest(prompt=self.prompt, negative_prompt=self.negative_prompt, height=self.height,
                                 width=self.width, steps=self.steps, guidance_scale=self.guidance_scale,
                                 seed=self.seed, n=self.images_per_prompt, image=self.image, mask=self.mask)

    @property
    def requests(self) -> list[GenerationRequest]:
        """The calls of this run: :attr:`request`, or one per line of ``prompts_file`` (a prompt,
        or a JSON object of request fields over this spec's)."""
        if self.prompts_file is None:
            return [self.request]
        return read_prompts(self.prompts_file, self.request)

    def read_plan(self) -> Any:
        """The ``plan`` file's :class:`~asyncdiff.partition.plan.Plan` (None without one), checked
        to be a plan of this run's stage count (its block names are checked against the traced
        denoiser at the first call, on every rank alike)."""
        from asyncdiff.partition.plan import Plan

        if self.plan is None:
            return None
        try:
            with open(self.plan) as f:
                plan = Plan.from_json(f.read())
        except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"plan={self.plan!r} is not a plan: {err}; write one with asyncdiff inspect --json") \
                from None
        if self.devices > 1 and self.engine.get("parallel") != "auto" and len(plan.stages) != self.model_n:
            raise ValueError(f"plan={self.plan!r} has {len(plan.stages)} stages but this run has {self.model_n} "
                             f"(devices={self.devices}); plan for {self.model_n} stages or change --devices")
        return plan

    @property
    def model_n(self) -> int:
        """Stages per slice for ``devices`` (a placeholder under ``parallel="auto"`` until the first
        call chooses; 1: the plain pipeline)."""
        from asyncdiff.engine.config import stages_for

        settings = self.engine
        stride = settings.get("stride", 1)
        if self.devices == 1:
            return 1
        if settings.get("parallel") == "auto":
            return stages_for(self.devices, stride)
        return stages_for(self.devices, stride, settings.get("guidance", 1) * settings.get("batch", 1))

    @property
    def config(self) -> Any:
        """The engine's settings of this run, as one validated :class:`EngineConfig`."""
        from asyncdiff.adapters.api import engine_config

        return engine_config(None, **{**self.engine, "model_n": max(1, self.model_n)})


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class ``name`` (a ValueError naming the choices otherwise)."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not isinstance(cls, type) or not hasattr(cls, "from_config"):
        names = sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
        raise ValueError(f"scheduler={name!r} is not a diffusers scheduler; use a class name such as "
                         f"{', '.join(n for n in names if 'Euler' in n or n.startswith('DDIM'))}")
    return cls


def _looks_local(model: str) -> bool:
    """A path rather than a hub id (``owner/name``): absolute, relative, or more than one slash."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def _load_pipeline(spec: GenerateSpec) -> Any:
    from asyncdiff.models.builders import system

    if spec.model is not None:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(spec.model, torch_dtype=DTYPES.get(spec.dtype))
    return system(spec.pipeline).build(spec.size, BUILT_IN_SEED)


def use_scheduler(pipe: Any, name: str | None) -> None:
    """Give ``pipe`` the scheduler class ``name``, configured from its own scheduler's config."""
    if name is not None:
        pipe.scheduler = scheduler_class(name).from_config(pipe.scheduler.config)


def pipeline_call(spec: GenerateSpec, pipe: Any, keep: dict[str, torch.Tensor],
                 requests: Sequence[GenerationRequest] | None = None) -> dict[str, Any]:
    """The pipeline call of ``requests`` (default: the spec's; Note [one request record]) over the
    built-in system's example inputs, and a hook on the final latents."""
    import inspect

    from asyncdiff.models.builders import example_inputs

    params = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {} if spec.model is not None else example_inputs(spec.pipeline, spec.size, BUILT_IN_SEED)
    kwargs.update(call_arguments(requests or [spec.request], type(pipe)))

    if "callback_on_step_end" in params:
        def on_step_end(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            keep["latents"] = tensors["latents"]
            return tensors

        kwargs.update(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    elif "callback" in params:
        def on_step(_i: int, _t: Any, latents: torch.Tensor) -> None:
            keep["latents"] = latents

        kwargs.update(callback=on_step, callback_steps=1)
    elif "output_type" in params:
        # Note [output as latents]: a pipeline without a step callback (DDPM, DDIM) hands out no
        # final latents; it denoises in image space, so its output is the final sample. Ask for
        # it as a tensor (in [0, 1]); final_latents() takes it from there.
        kwargs["output_type"] = "pt"
    return kwargs


def final_latents(output: Any, keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final latents of a call made with :func:`pipeline_call`: what its callback put in
    ``keep``, else the tensor output (Note [output as latents])."""
    if "latents" in keep:
        return keep["latents"]
    images = getattr(output, "images", None)
    if isinstance(images, torch.Tensor):
        return images
    raise RuntimeError(f"{type(output).__name__} carries no tensor and the pipeline took no step callback; "
                       "the pipeline needs callback_on_step_end, callback or output_type='pt'")


class _StepTimer:
    """Wall time of the denoising loop: first denoiser call's start to the last one's end."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.first: float | None = None
        self.last = 0.0
        self.calls = 0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.last = time.perf_counter()
        self.calls += 1

    @property
    def seconds(self) -> float:
        return self.last - (self.first or self.last)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def build(spec: GenerateSpec) -> tuple[Any, Any]:
    """This rank's pipeline of ``spec``, loaded or built, with the engine attached where
    ``spec.devices > 1``: ``(pipeline, AsyncDiff or None)``."""
    async_diff = None
    if spec.devices > 1:
        from asyncdiff.adapters.api import AsyncDiff

        plan = spec.read_plan()
        config = spec.config
        if spec.model is not None:  # each rank reads only its stage's weights (Note [stage-only loading])
            planned = config if config.cost == "bytes" else dataclasses.replace(config, cost="flops")
            async_diff = AsyncDiff.from_pretrained(spec.model, config=planned, plan=plan,
                                                   text_encoders=spec.text_encoders,
                                                   torch_dtype=DTYPES.get(spec.dtype), record=spec.record)
            pipe = async_diff.pipeline
        else:
            pipe = _load_pipeline(spec)
            async_diff = AsyncDiff(pipe, config=config, plan=plan, text_encoders=spec.text_encoders,
                                   record=spec.record)
        async_diff.reset_state()
    else:
        pipe = _load_pipeline(spec)
    use_scheduler(pipe, spec.scheduler)
    return pipe, async_diff


def worker(spec: GenerateSpec) -> dict[str, Any]:
    """Build, (maybe) parallelize and run the pipeline on this process; rank 0 returns results."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    pipe, async_diff = build(spec)
    pipe.set_progress_bar_config(disable=rank != 0, leave=True)  # the bar ends its line: the JSON stays alone
    denoiser = getattr(pipe, (async_diff.adapter if async_diff else _adapter(pipe)).denoiser)
    requests = spec.requests
    timer = _StepTimer(denoiser)
    final: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    with torch.no_grad():
        output = pipe(**pipeline_call(spec, pipe, final, requests[:1]))
    seconds = [time.perf_counter() - started]
    timer.close()
    engines = async_diff.engines if async_diff is not None else {}  # Note [several denoisers]
    plan_s = sum(engine.compile_seconds for engine in engines.values())
    for engine in engines.values():
        engine.drain()  # no transfer may outlive the process group
    from asyncdiff.adapters.encoders import text_encoders

    memory = memory_per_rank(denoiser, list(text_encoders(pipe).values()))
    result: dict[str, Any] = {
        "pipeline": spec.model or spec.pipeline, "size": "loaded" if spec.model else spec.size,
        "devices": spec.devices, "stride": spec.config.stride,
        "stages": spec.model_n, "steps": spec.steps, "warm_up": spec.config.warm_up,
        "time_shift": spec.config.time_shift, "refresh_every": spec.config.refresh_every,
        "refresh_drift": spec.config.refresh_drift, "seed": spec.seed,
        # the loop's wall time without the one-off trace/profile/plan of the first call (plan_s)
        "denoise_s": round(timer.seconds - plan_s, 4), "plan_s": round(plan_s, 4),
        "denoiser_calls": timer.calls, "out": spec.out, **memory,
        "dtype": str(_weights_dtype(denoiser)).removeprefix("torch."),
    }
    if async_diff is not None:
        result.update(async_diff.summary(spec.steps))
    result["latents"] = final_latents(output, final).cpu()
    outs = [spec.out] if len(requests) == 1 else [numbered(spec.out, i) if spec.out else None
                                                    for i in range(len(requests))]
    if rank == 0 and spec.out:
        save_output(output, outs[0])
    for request, out in zip(requests[1:], outs[1:]):  # a prompts file: the loaded, planned pipeline again
        started = time.perf_counter()
        with torch.no_grad():
            output = pipe(**pipeline_call(spec, pipe, {}, [request]))
        seconds.append(time.perf_counter() - started)
        if rank == 0 and out:
            save_output(output, out)
        for engine in engines.values():
            engine.drain()
    if spec.prompts_file is not None:
        result["manifest"] = manifest = [{"out": out, "seconds": round(s, 4), **dataclasses.asdict(r)}
                                         for r, out, s in zip(requests, outs, seconds)]
        if rank == 0 and spec.out:
            with open(manifest_path(spec.out), "w") as f:
                json.dump(manifest, f, indent=1)
    return result


def _weights_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of ``module``'s weights have (a few modules may stay float32: Wan's norms)."""
    count: dict[torch.dtype, int] = {}
    for t in module.parameters():
        count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get)


def _adapter(pipe: Any) -> Any:
    from asyncdiff.adapters.registry import adapter_for

    return adapter_for(pipe)


def run(spec: GenerateSpec) -> dict[str, Any]:
    """Run ``spec`` on ``spec.devices`` local processes (or in this process for one device, or
    on the current process group under torchrun); returns rank 0's result."""
    from asyncdiff.engine.launch import init_from_env, launch, under_torchrun
    from asyncdiff.engine.record import write_header
    from asyncdiff.replay import run_header

    if under_torchrun():
        init_from_env()
        if spec.record is not None and dist.get_rank() == 0:
            write_header(spec.record, run_header(spec))  # Note [replay]; the other ranks append after step 0's plan
        result = worker(spec)
        dist.barrier()  # the group this call joined: leave it together, not at interpreter exit
        dist.destroy_process_group()
        return result
    if spec.devices == 1:
        torch.set_num_threads(spec.threads_per_device)
        return worker(spec)
    _warn_oversubscribed(spec)
    if spec.record is not None:
        write_header(spec.record, run_header(spec))  # replaces an older record; the ranks append (Note [replay])
    results = launch(worker, spec.devices, spec, threads=spec.threads_per_device)
    return results[0]


def _warn_oversubscribed(spec: GenerateSpec) -> None:
    """Say so where the processes need more cores (CPU) or GPUs than this machine has."""
    import warnings

    from asyncdiff.engine.launch import local_device

    if local_device().type == "cuda":
        return  # launch's local_device() refuses more processes than GPUs, with the fix
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    need = spec.devices * spec.threads_per_device
    if need > cores:
        warnings.warn(f"devices={spec.devices} x threads-per-device={spec.threads_per_device} = {need} threads on "
                      f"{cores} CPU cores: the processes share cores, so times are not what {spec.devices} devices "
                      f"would give", stacklevel=2)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "latents"}


