"""Toy models and multi-process workers shared by the tests (importable by spawned workers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from diffusers import DiffusionPipeline


class ToyDenoiser(torch.nn.Module):
    """A denoiser-shaped module: latent in, conditioning embedding, a skip connection."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(1, width)
        self.conv_in = torch.nn.Conv2d(4, width, 3, padding=1)
        self.body = torch.nn.ModuleList([torch.nn.Conv2d(width, width, 3, padding=1) for _ in range(depth)])
        self.conv_out = torch.nn.Conv2d(2 * width, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> Any:
        emb = self.embed(timestep.reshape(-1, 1).float())[:, :, None, None]
        h = skip = self.conv_in(sample)
        for layer in self.body:
            h = torch.tanh(layer(h) + emb)
        out = self.conv_out(torch.cat([h, skip], dim=1))
        return {"sample": out} if return_dict else (out,)


class Rotary(torch.nn.Module):
    """Returns a tuple of tensors (like rotary position embeddings' cos and sin)."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = h.mean(1, keepdim=True)
        return torch.cos(mean), torch.sin(mean)


class RotaryLayer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1)

    def forward(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = rotary
        return torch.tanh(self.conv(h) * cos + sin)


class TupleDenoiser(torch.nn.Module):
    """A block (``rotary``) whose output is a tuple that blocks on every stage read (as in Wan)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, width, 3, padding=1)
        self.rotary = Rotary()
        self.body = torch.nn.ModuleList([RotaryLayer(width) for _ in range(4)])
        self.conv_out = torch.nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> Any:
        h = self.conv_in(sample)
        rotary = self.rotary(h)
        for layer in self.body:
            h = layer(h, rotary)
        out = self.conv_out(h) * timestep.reshape(-1, 1, 1, 1)
        return {"sample": out} if return_dict else (out,)


TUPLE_PLAN = (("conv_in", "rotary", "body.0", "body.1"), ("body.2", "body.3", "conv_out"))


def tuple_engine(steps: int, warm_up: int) -> torch.Tensor:
    """The tuple-passing toy under a 2-stage engine with :data:`TUPLE_PLAN`."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
    from asyncdiff.partition.plan import Plan

    torch.manual_seed(0)
    config = EngineConfig(model_n=2, warm_up=warm_up, policy="coarse", cost="flops")
    engine = AsyncEngine(TupleDenoiser(), config, plan=Plan(stages=TUPLE_PLAN), latent="sample")
    return toy_steps(engine, steps)


class TokensOut(torch.nn.Module):
    """Projects pixels to tokens and hands them on transposed back, (B, C, HW): a dense value that
    is not contiguous, as attention blocks hand on their output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, width)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.proj(sample.flatten(2).transpose(1, 2)).transpose(1, 2)


class StridedDenoiser(torch.nn.Module):
    """Note [strides on the wire]: the value between ``tokens`` and ``mix`` is transposed."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.tokens = TokensOut(width)
        self.mix = torch.nn.Linear(64, 64)
        self.out = torch.nn.Conv2d(width, 4, 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> Any:
        h = self.mix(self.tokens(sample))
        out = self.out(h.reshape(sample.shape[0], -1, *sample.shape[2:])) * timestep.reshape(-1, 1, 1, 1)
        return {"sample": out} if return_dict else (out,)


def strided_engine(steps: int) -> dict[str, Any]:
    """:class:`StridedDenoiser` on 2 stages cut after ``tokens``: the output, and the strides of
    what ``mix`` reads, here and in the plain model."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
    from asyncdiff.partition.plan import Plan

    torch.manual_seed(0)
    toy = StridedDenoiser()
    strides: list[tuple[int, ...]] = []
    toy.mix.register_forward_pre_hook(lambda _, args: None if args[0].is_meta else strides.append(args[0].stride()))
    plain = toy_steps(toy, steps)
    plain_strides = list(strides)
    config = EngineConfig(model_n=2, warm_up=steps, policy="coarse", cost="flops", verify=False)
    engine = AsyncEngine(toy, config, plan=Plan(stages=(("tokens",), ("mix", "out"))), latent="sample")
    del strides[:]
    return {"plain": plain, "split": toy_steps(engine, steps), "plain_strides": plain_strides, "strides": strides}


class Branchy(torch.nn.Module):
    """Control flow on tensor values: untraceable unless the module holding it is a block."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(x)
        if y.sum() > 0:
            return y
        return -y


class WithBranchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Sequential(Branchy())  # same forward code as block.branchy
        self.block = torch.nn.ModuleDict({"branchy": Branchy()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block["branchy"](self.pre(x))


def pipeline_scenarios(steps: int, stale_warm_up: int, layout: str = "contiguous") -> dict[str, Any]:
    """On every rank: the plain pipeline's latents, then the same under AsyncDiff with every
    step a warm-up step, then with ``stale_warm_up``, then after ``remove()``."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    rank, world = dist.get_rank(), dist.get_world_size()
    pipe = build_sd15("tiny", seed=0)
    unet_params = {name: p.numel() for name, p in pipe.unet.named_parameters()}

    def latents() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe("a photo of a cat", num_inference_steps=steps, generator=generator, output_type="latent").images

    with torch.no_grad():
        reference = latents()
        async_diff = AsyncDiff(pipe, model_n=world, stride=1, warm_up=steps, layouts=(layout,))
        exact = latents()
        async_diff.reset_state(warm_up=stale_warm_up)
        stale = latents()
        # after the first asynchronous step: the plan is chosen (Note [measured plan choice]), the rest released
        plan = async_diff.plan
        held = {name: p.numel() for name, p in pipe.unet.named_parameters() if p.numel() > 0}
        async_diff.remove()
        after_remove = latents()
    return {"rank": rank, "reference": reference, "exact": exact, "stale": stale, "after_remove": after_remove,
            "plan": plan, "held": held, "unet_params": unet_params,
            "bytes_sent": async_diff.engine.bytes_sent_per_step}


def toy_engine(model_n: int, transfer_dtype: str | None = None, steps: int = 1, warm_up: int = 1,
               device: str = "cpu", compile: bool = False, depth: int = 4) -> Any:
    """Run ``steps`` steps of the toy denoiser under an engine with ``model_n`` stages on this
    process group (the latent moves against the output each step); the last output, on the CPU.
    ``device="local"``: this rank's own device (its GPU under NCCL); ``depth``: its body layers."""
    from asyncdiff.engine.launch import local_device
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    device = local_device() if device == "local" else torch.device(device)
    torch.manual_seed(0)
    toy = ToyDenoiser(depth=depth).to(device)
    config = EngineConfig(model_n=model_n, warm_up=warm_up, cost="flops", transfer_dtype=transfer_dtype,
                          compile=compile)
    engine = AsyncEngine(toy, config, latent="sample")
    out = toy_steps(engine, steps, device).cpu()
    compiled = [type(m).__name__ for c in engine._compiled.values() for m in c.modules]
    assert all((name == "OptimizedModule") == compile for name in compiled), compiled
    return out


class AffineInTime(torch.nn.Module):
    """Note [compensation]'s exact case: every value between the blocks is affine in the sample and
    the timestep (no nonlinearity), so for a fixed sample the stale inputs move linearly with
    uniformly spaced timesteps, and extrapolated linearly they are the fresh ones."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(1, width)
        self.conv_in = torch.nn.Conv2d(4, width, 1)
        self.body = torch.nn.ModuleList([torch.nn.Conv2d(width, width, 1) for _ in range(depth)])
        self.conv_out = torch.nn.Conv2d(width, 4, 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> Any:
        h = self.conv_in(sample) + self.embed(timestep.reshape(-1, 1).float())[:, :, None, None]
        for layer in self.body:
            h = layer(h)
        out = self.conv_out(h)
        return {"sample": out} if return_dict else (out,)


def compensation_scenarios(steps: int, warm_up: int) -> dict[str, Any]:
    """The affine-in-time toy sequentially and on this group's stages with each compensation mode:
    every step's output, the sample fixed, the timesteps uniformly spaced (and the engine's)."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    torch.manual_seed(0)
    toy = AffineInTime()

    def outputs(denoiser: Any) -> list[torch.Tensor]:
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # the same sample every step
        with torch.no_grad():
            return [denoiser(x, torch.tensor([float(steps - t) * 10]), return_dict=False)[0] for t in range(steps)]

    results = {"sequential": outputs(toy)}
    for mode in ("none", "linear", "auto"):
        config = EngineConfig(model_n=dist.get_world_size(), warm_up=warm_up, cost="flops", compensate=mode)
        engine = AsyncEngine(toy, config, latent="sample", timestep_arg="timestep",
                             timesteps=lambda s: float(steps - s) * 10)
        results[mode] = outputs(engine)
        results[f"{mode}_kinds"] = [kind.name for kind, _ in engine.call.seconds]
        engine.restore_weights()  # the next engine traces the whole toy again
    return results


def toy_steps(denoiser: Any, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(1, 4, 8, 8).to(device)
    with torch.no_grad():
        for t in range(steps):
            out = denoiser(x, torch.tensor([float(steps - t)], device=device), return_dict=False)[0]
            x = x - 0.1 * out
    return out


def lost_peer() -> str:
    """Rank 1's stage raises at step 2 and rank 1 stops taking part, so rank 0 fails waiting for it
    (here by timeout: rank 1 stays alive to return its message). Each rank returns its error."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig, StageError

    torch.manual_seed(0)
    toy = ToyDenoiser()
    engine = AsyncEngine(toy, EngineConfig(model_n=2, warm_up=1, cost="flops", timeout_s=5), latent="sample")
    if dist.get_rank() == 1:
        for module in toy.modules():
            if module is not toy:
                module.register_forward_pre_hook(
                    lambda *_: (_ for _ in ()).throw(RuntimeError("injected failure")) if engine.step >= 2 else None)
    try:
        toy_steps(engine, 6)
    except StageError as err:
        return str(err)  # rank 0: its wait for rank 1 times out
    return "no error"


def failing_stage(fail_rank: int, fail_step: int) -> None:
    """Generation where every block that runs on ``fail_rank`` raises from step ``fail_step`` on."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    pipe = build_sd15("tiny", seed=0)
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=1)
    step = {"n": -1}

    def count(*_: Any) -> None:
        step["n"] += 1

    def boom(*_: Any) -> None:
        if dist.get_rank() == fail_rank and step["n"] >= fail_step:
            raise RuntimeError("injected failure")

    pipe.unet.register_forward_pre_hook(count)
    for module in pipe.unet.modules():
        if module is not pipe.unet:
            module.register_forward_pre_hook(boom)
    with torch.no_grad():
        pipe("a cat", num_inference_steps=6, output_type="latent")
    _ = async_diff


def system_scenarios(name: str, steps: int, stride: int) -> dict[str, Any]:
    """For built-in system ``name`` on this process group: the plain pipeline's final latents,
    then under AsyncDiff with every step a warm-up step, with warm-up 1, and with time shift."""
    from asyncdiff import AsyncDiff
    from asyncdiff.generate import GenerateSpec, pipeline_call
    from asyncdiff.generate import final_latents as latents_of
    from asyncdiff.models.builders import BUILDERS

    world = dist.get_world_size()
    spec = GenerateSpec(pipeline=name, devices=world, steps=steps, engine={"stride": stride, "warm_up": steps})
    pipe = BUILDERS[name]("tiny", 0)

    def final_latents() -> torch.Tensor:
        keep: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            output = pipe(**pipeline_call(spec, pipe, keep))
        return latents_of(output, keep)

    results: dict[str, Any] = {"reference": final_latents()}
    for label, time_shift in (("", False), ("shift_", True)):
        async_diff = AsyncDiff(pipe, model_n=spec.model_n, stride=stride, warm_up=steps, time_shift=time_shift)
        results[f"{label}exact"] = final_latents()
        async_diff.reset_state(warm_up=1)
        results[f"{label}stale"] = final_latents()
        async_diff.remove()
    return results


def refresh_scenarios(steps: int) -> dict[str, Any]:
    """Warm-up 1 with a sequential refresh every step, every 2 steps, and never."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    pipe = build_sd15("tiny", seed=0)

    def latents() -> torch.Tensor:
        with torch.no_grad():
            return pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images

    results: dict[str, Any] = {"reference": latents()}
    plan = None  # every run uses the first run's plan, so they differ only in what is refreshed
    for label, every in (("every_step", 1), ("every_2", 2), ("never", None)):
        async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=1, refresh_every=every, plan=plan)
        results[label] = latents()
        plan = async_diff.plan
        async_diff.remove()
    for label, drift in (("drift_0", 0.0), ("drift_inf", float("inf"))):
        async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=2, refresh_drift=drift, plan=plan)
        results[label] = latents()
        results[f"{label}_kinds"] = [kind for kind, _ in async_diff.engine.seconds]
        async_diff.remove()
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=2, plan=plan)
    results["warm_up_2"] = latents()
    async_diff.remove()
    return results


class TwoCallGuidance(DiffusionPipeline):
    """Classifier-free guidance as two denoiser calls per step (as some video pipelines do), or,
    with ``batched=True``, as one call on a batch of two (as the SD pipelines do)."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, steps: int, batched: bool = False,
                 guidance: float = 5.0, drift: float = 0.0) -> torch.Tensor:
        """``drift``: the unconditional embedding grows by this fraction every step."""
        self.scheduler.set_timesteps(steps)
        size = self.unet.config.sample_size
        latents = torch.randn((1, self.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(self.scheduler.timesteps):
            if drift:
                uncond = uncond * (1 + drift * i)
            if batched:
                both = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                uncond_noise, cond_noise = both.chunk(2)
            else:
                cond_noise = self.unet(latents, t, encoder_hidden_states=cond).sample
                uncond_noise = self.unet(latents, t, encoder_hidden_states=uncond).sample
            noise = uncond_noise + guidance * (cond_noise - uncond_noise)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def branch_scenarios(steps: int) -> dict[str, Any]:
    """Note [branches]: the two-call and the batched pipeline, plain, all warm-up, and stale."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    sd = build_sd15("tiny", seed=0)
    pipe = TwoCallGuidance(sd.unet, sd.scheduler)
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=g) for _ in range(2))
    results: dict[str, Any] = {"plain": pipe(cond, uncond, steps), "plain_batched": pipe(cond, uncond, steps, True)}
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=steps)
    results["exact"] = pipe(cond, uncond, steps)
    results["exact_calls"] = len(async_diff.engine.seconds)
    async_diff.reset_state(warm_up=1)
    results["stale"] = pipe(cond, uncond, steps)
    results["stale_kinds"] = [kind for kind, _ in async_diff.engine.seconds]
    results["stale_batched"] = pipe(cond, uncond, steps, True)
    # the control: the same engine told nothing about steps, so each call counts as a step and
    # consumes the other branch's values (what Note [branches] prevents)
    async_diff.reset_state()
    async_diff.engine.marks_steps = False
    results["mixed"] = TwoCallGuidance.__call__(pipe, cond, uncond, steps)
    async_diff.remove()
    return results


class AliasingToy(torch.nn.Module):
    """A UNet's pattern that a naive trace gets wrong (Note [in-place updates]): a value is kept as
    a skip connection and then updated in place, so eager code's skip reader sees the update."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.extra = torch.nn.Conv2d(4, 8, 1)
        self.mid = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.mid2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        h = self.down(sample)
        skips = (h,)
        h += self.extra(sample) * timestep
        h = self.mid2(self.mid(h))
        return (self.up(torch.cat([h, skips[0]], 1)),)


def aliasing_engine(model_n: int, warm_up: int, steps: int, naive_trace: bool = False) -> Any:
    """``steps`` steps of :class:`AliasingToy` under an engine on this process group: the last
    output, or the engine's error message. ``naive_trace``: trace ``+=`` out of place (the bug)."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
    from asyncdiff.partition import passes, proxies

    if naive_trace:
        for name in passes.INPLACE_OPS:
            delattr(proxies.ShapeProxy, name)
    engine = AsyncEngine(AliasingToy(), EngineConfig(model_n=model_n, warm_up=warm_up, cost="flops"), latent="sample")
    try:
        return toy_steps(engine, steps)
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"{type(err).__name__}: {err}"


def adapter_scenarios(kind: str, steps: int) -> dict[str, Any]:
    """A T2I-Adapter pipeline (``kind``: ``sd``, ``sd-multi`` or ``sdxl``, tiny, random weights) on
    this process group: the plain pipeline's latents, then under AsyncDiff with every step a
    warm-up step. The UNet adds adapter features to a down block's output in place, which is also
    a skip connection (Note [in-place updates])."""
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline, StableDiffusionXLAdapterPipeline, T2IAdapter

    from asyncdiff import AsyncDiff
    from asyncdiff.models.pictures import example_picture
    from asyncdiff.models.sd import build_sd15
    from asyncdiff.models.sdxl import build_sdxl

    xl = kind == "sdxl"
    base = build_sdxl("tiny", 0) if xl else build_sd15("tiny", 0)
    channels = list(base.unet.config.block_out_channels)
    torch.manual_seed(0)

    def adapter() -> T2IAdapter:
        return T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=16 if xl else 8,
                          adapter_type="full_adapter_xl" if xl else "full_adapter")

    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    if not xl:
        components["feature_extractor"] = None
    picture = example_picture(64, 64, 0)
    extra: dict[str, Any] = {}
    if xl:
        pipe, image = StableDiffusionXLAdapterPipeline(**components, adapter=adapter()), picture
    elif kind == "sd-multi":
        pipe = StableDiffusionAdapterPipeline(**components, adapter=MultiAdapter([adapter(), adapter()]),
                                              requires_safety_checker=False)
        image = [picture, example_picture(64, 64, 1)]
        extra["adapter_conditioning_scale"] = [1.0, 0.8]
    else:
        pipe = StableDiffusionAdapterPipeline(**components, adapter=adapter(), requires_safety_checker=False)
        image = picture

    def latents() -> torch.Tensor:
        with torch.no_grad():
            return pipe("a cat", image=image, height=64, width=64, num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(0), **extra).images

    results = {"reference": latents()}
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=steps)
    results["exact"] = latents()
    async_diff.remove()
    return results


def stage_only_scenario(path: str, steps: int, text_encoders: str = "every", guidance: int = 1,
                        broken: str = "") -> dict[str, Any]:
    """``AsyncDiff.from_pretrained`` on this process group (every step a warm-up step): the latents,
    the denoiser (and text encoder) bytes this rank holds before and after ``remove()``, the
    plan's source, and the checks of Note [verify on stage-only loads] run. ``broken``: the
    eager reference of that check is off by 1e-3 (``"split"``), or by 0.1 only on the whole batch
    of 2 (``"batch"``: as a denoiser that mixes the samples of a batch), so a check must stop every
    rank (the error returned)."""
    from asyncdiff import AsyncDiff
    from asyncdiff.engine import planning
    from asyncdiff.engine.errors import StageError

    if broken:
        plain = planning.eager

        def off(output: Any) -> Any:
            if broken == "split":
                return (output[0] + 1e-3,)
            return (output[0] + 0.1,) if output[0].shape[0] == 2 else output  # past Note [batch split]'s tolerance

        planning.eager = lambda module: lambda *a, **k: off(plain(module)(*a, **k))

    def held(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    def latents(pipe: Any) -> torch.Tensor:
        with torch.no_grad():
            return pipe("a cat", num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    async_diff = AsyncDiff.from_pretrained(path, model_n=dist.get_world_size() // guidance, warm_up=steps,
                                           text_encoders=text_encoders, guidance=guidance)
    pipe = async_diff.pipeline
    loaded, encoder = held(pipe.unet), held(pipe.text_encoder)
    if broken:
        try:
            latents(pipe)
        except StageError as err:
            return {"error": str(err)}
        return {"error": None}
    parallel = latents(pipe)
    result = {"loaded": loaded, "latents": parallel, "source": async_diff.engine.plan_source,
              "released": len(async_diff.engine.released_weights), "encoder": encoder,
              "checks": async_diff.engine.planning.streamed_checks,
              "split_checks": async_diff.engine.planning.split_checks}
    async_diff.remove()
    result["after_remove"], result["encoder_after_remove"] = held(pipe.unet), held(pipe.text_encoder)
    result["plain_after_remove"] = latents(pipe)
    if guidance > 1:  # the denoiser on each guidance half, as the slices run it (Note [batch split])
        forward = pipe.unet.forward
        pipe.unet.forward = lambda *a, **k: in_chunks(forward, guidance, a, k)
        result["plain_in_chunks_after_remove"] = latents(pipe)
        del pipe.unet.forward
    return result


def in_chunks(forward: Callable[..., Any], n: int, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``forward`` on ``n`` equal chunks of the batch (the first argument's first dimension; every
    tensor with that many rows is cut), the outputs concatenated."""
    rows = args[0].shape[0]

    def chunk(i: int) -> Any:
        return pytree.tree_map_only(torch.Tensor, lambda t: t.chunk(n)[i] if t.dim() and t.shape[0] == rows else t,
                                    (args, kwargs))

    outputs = [forward(*a, **k) for a, k in map(chunk, range(n))]
    return pytree.tree_map(lambda *parts: torch.cat(parts), *outputs)


def fixed_calls(steps: int) -> list[tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]]:
    """``steps`` calls of :class:`ToyDenoiser` with inputs fixed in advance (not fed back)."""
    g = torch.Generator().manual_seed(3)
    return [((torch.randn(1, 4, 8, 8, generator=g), torch.tensor([float(steps - t)])), {"return_dict": False})
            for t in range(steps)]


def fixed_input_engine(layout: str, steps: int, warm_up: int) -> tuple[list[torch.Tensor], Any]:
    """:func:`fixed_calls` through an engine with one ``layout`` plan on this process group: the
    outputs and the plan."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    torch.manual_seed(0)
    config = EngineConfig(model_n=dist.get_world_size(), warm_up=warm_up, cost="flops", layouts=(layout,))
    engine = AsyncEngine(ToyDenoiser(), config, latent="sample")
    with torch.no_grad():
        return [engine(*args, **kwargs)[0] for args, kwargs in fixed_calls(steps)], engine.plan


def hybrid_scenarios(guidance: int, batch: int, steps: int, prompts: int, plan_json: str | None = None,
                     guidance_scale: float = 7.5, parallel: str | None = None) -> dict[str, Any]:
    """Note [hybrid mesh] on the tiny SD 1.5 pipeline with ``prompts`` prompts: the plain
    pipeline's latents, then guidance x batch slices of the remaining processes' stages with
    every step a warm-up step, and with warm-up 1 (the plan from ``plan_json``, or FLOP-planned)."""
    from asyncdiff import AsyncDiff
    from asyncdiff.engine.runtime import stages_for
    from asyncdiff.models.sd import build_sd15
    from asyncdiff.partition.plan import Plan

    pipe = build_sd15("tiny", seed=0)

    def latents() -> torch.Tensor:
        with torch.no_grad():
            return pipe(["a cat", "a dog", "a red house", "a boat"][:prompts], num_inference_steps=steps,
                        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images

    results: dict[str, Any] = {"reference": latents()}
    stages = stages_for(dist.get_world_size(), 1, guidance * batch)
    plan = Plan.from_json(plan_json) if plan_json else None
    # the depth rule's FLOP plan: contiguous, so that stride 2 can run it too (test_hybrid)
    async_diff = AsyncDiff(pipe, model_n=stages, warm_up=steps, guidance=guidance, batch=batch, plan=plan,
                           cost="flops", parallel=parallel, plan_rule="depth")
    results["exact"] = latents()
    config = async_diff.engine.config
    results["degrees"] = (config.guidance, config.batch, config.model_n)
    results["options"] = [(o.guidance, o.batch, o.stages, o.depth) for o in async_diff.engine.parallel_options]
    async_diff.reset_state(warm_up=1)
    results["stale"] = latents()
    results["plan"] = async_diff.plan
    results["denoiser_bytes"] = sum(t.numel() for t in pipe.unet.parameters())
    async_diff.remove()
    return results


def hybrid_variants(guidance: int, steps: int, plan_json: str, stride: int = 1) -> dict[str, Any]:
    """Warm-up-1 latents of the tiny SD 1.5 pipeline under ``guidance`` slices of stages with each
    engine option that changes what a stage computes: time shift, a bfloat16 wire, a refresh
    every 2 steps (stride 1); the plan from ``plan_json``."""
    from asyncdiff import AsyncDiff
    from asyncdiff.engine.runtime import stages_for
    from asyncdiff.models.sd import build_sd15
    from asyncdiff.partition.plan import Plan

    pipe = build_sd15("tiny", seed=0)
    stages = stages_for(dist.get_world_size(), stride, guidance)
    variants = {"plain": {}, "time_shift": {"time_shift": True}}
    if stride == 1:
        variants.update(bfloat16={"transfer_dtype": "bfloat16"}, refresh_2={"refresh_every": 2})
    results: dict[str, Any] = {}
    for label, options in variants.items():
        async_diff = AsyncDiff(pipe, model_n=stages, stride=stride, warm_up=1, guidance=guidance,
                               plan=Plan.from_json(plan_json), **options)
        with torch.no_grad():
            results[label] = pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                                  output_type="latent").images
        async_diff.remove()
    return results


def two_call_hybrid(guidance: int, steps: int, plan_json: str | None = None) -> dict[str, Any]:
    """Note [two-call guidance]: the two-call pipeline, plain; under ``guidance`` slices of the
    remaining processes' stages with every step a warm-up step, then warm-up 1; then a call whose
    second branch changes its conditioning every step (the prediction fails)."""
    from asyncdiff import AsyncDiff
    from asyncdiff.engine.runtime import stages_for
    from asyncdiff.models.sd import build_sd15
    from asyncdiff.partition.plan import Plan

    sd = build_sd15("tiny", seed=0)
    pipe = TwoCallGuidance(sd.unet, sd.scheduler)
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=g) for _ in range(2))
    results: dict[str, Any] = {"plain": pipe(cond, uncond, steps)}
    stages = stages_for(dist.get_world_size(), 1, guidance)
    async_diff = AsyncDiff(pipe, model_n=stages, warm_up=steps, guidance=guidance, cost="flops",
                           plan=Plan.from_json(plan_json) if plan_json else None)
    results["exact"] = pipe(cond, uncond, steps)
    async_diff.reset_state(warm_up=1)
    results["stale"] = pipe(cond, uncond, steps)
    results["plan"] = async_diff.plan
    results["calls"] = len(async_diff.engine.seconds)  # stage runs on this rank: 2 in the first step, then 1

    try:
        results["drifting"] = pipe(cond, uncond, steps, drift=0.01)
    except Exception as err:
        results["drifting"] = f"{type(err).__name__}: {err}"
    async_diff.remove()
    results["drifting_plain"] = pipe(cond, uncond, steps, drift=0.01)
    return results


def encoder_scenarios(name: str, steps: int) -> dict[str, Any]:
    """Note [encoders on one rank]: built-in system ``name`` on this process group with every rank
    holding its text encoders, then with rank 0 only; the encoders' bytes held meanwhile and a
    checksum of their weights after ``remove()``."""
    from asyncdiff import AsyncDiff
    from asyncdiff.adapters.encoders import text_encoders
    from asyncdiff.generate import GenerateSpec, pipeline_call
    from asyncdiff.generate import final_latents as latents_of
    from asyncdiff.models.builders import system

    pipe = system(name).build("tiny", 0)
    spec = GenerateSpec(pipeline=name, devices=dist.get_world_size(), steps=steps)

    def run() -> torch.Tensor:
        keep: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            return latents_of(pipe(**pipeline_call(spec, pipe, keep)), keep)

    def held() -> int:
        return sum(t.numel() for e in text_encoders(pipe).values() for t in e.parameters())

    results: dict[str, Any] = {"whole": held()}
    async_diff = AsyncDiff(pipe, model_n=spec.model_n, warm_up=1, cost="flops")
    results["every"] = run()
    plan = async_diff.plan
    async_diff.remove()
    async_diff = AsyncDiff(pipe, model_n=spec.model_n, warm_up=1, plan=plan, text_encoders="rank0")
    results["rank0"], results["held"] = run(), held()
    async_diff.remove()
    results["restored"] = held()
    results["checksum"] = sum(float(t.double().sum()) for e in text_encoders(pipe).values() for t in e.parameters())
    return results


class TwoLoops(DiffusionPipeline):
    """Two denoising loops in one call, the second at twice the resolution (as VisualCloze and
    refiner-style pipelines do): Note [a second loop]."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, steps: int) -> torch.Tensor:
        size = self.unet.config.sample_size
        latents = torch.randn((1, self.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(0))
        for loop in range(2):
            if loop:
                latents = torch.nn.functional.interpolate(latents, scale_factor=2.0)
            self.scheduler.set_timesteps(steps)
            for t in self.scheduler.timesteps:
                noise = self.unet(latents, t, encoder_hidden_states=cond).sample
                latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def two_loop_scenarios(steps: int) -> dict[str, Any]:
    """The two-loop pipeline, plain, with every step of both loops a warm-up step, and stale."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    sd = build_sd15("tiny", seed=0)
    pipe = TwoLoops(sd.unet, sd.scheduler)
    cond = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    results: dict[str, Any] = {"plain": pipe(cond, steps)}
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=steps, cost="flops")
    results["exact"] = pipe(cond, steps)
    async_diff.reset_state(warm_up=1)
    results["stale"] = pipe(cond, steps)
    results["kinds"] = [kind for kind, _ in async_diff.engine.seconds]
    async_diff.remove()
    return results


def two_loops_with_one_signature_kept(steps: int) -> dict[str, Any]:
    """The two-loop pipeline (two call signatures a call) with room for one compiled signature:
    each loop compiles again when its turn comes, and the pictures stay exact."""
    from asyncdiff import AsyncDiff
    from asyncdiff.engine import runtime
    from asyncdiff.models.sd import build_sd15

    runtime.MAX_SIGNATURES = 1
    sd = build_sd15("tiny", seed=0)
    pipe = TwoLoops(sd.unet, sd.scheduler)
    cond = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    plain = pipe(cond, steps)
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=steps, cost="flops")
    exact = [pipe(cond, steps) for _ in range(2)]
    kept = len(async_diff.engine._compiled)
    async_diff.remove()
    return {"plain": plain, "exact": exact, "kept": kept}


class TwoExperts(DiffusionPipeline):
    """Wan 2.2's shape (Note [several denoisers]): ``unet`` takes the first ``switch`` steps of the
    loop, its low-noise expert ``unet_2`` the rest."""

    def __init__(self, unet: torch.nn.Module, unet_2: torch.nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, unet_2=unet_2, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, steps: int, switch: int) -> torch.Tensor:
        size = self.unet.config.sample_size
        latents = torch.randn((1, self.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(0))
        self.scheduler.set_timesteps(steps)
        for i, t in enumerate(self.scheduler.timesteps):
            expert = self.unet if i < switch else self.unet_2
            noise = expert(latents, t, encoder_hidden_states=cond).sample
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def two_expert_scenarios(steps: int, switch: int) -> dict[str, Any]:
    """Note [several denoisers]: the two-expert pipeline plain, with every step a warm-up step,
    stale, and stale with time shift (recording the timesteps ``unet_2``'s stages computed with)."""
    import copy

    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    sd = build_sd15("tiny", seed=0)
    second = copy.deepcopy(sd.unet)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.9)
    pipe = TwoExperts(sd.unet, second, sd.scheduler)
    cond = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    results: dict[str, Any] = {"plain": pipe(cond, steps, switch), "timesteps": pipe.scheduler.timesteps.tolist()}
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=steps, cost="flops")
    results["exact"] = pipe(cond, steps, switch)
    async_diff.reset_state(warm_up=1)
    results["stale"] = pipe(cond, steps, switch)
    results["kinds"] = {name: [kind.value for kind, _ in e.seconds] for name, e in async_diff.engines.items()}
    results["released"] = {name: len(e.released_weights) for name, e in async_diff.engines.items()}
    results["plans"] = {name: e.plan for name, e in async_diff.engines.items()}
    async_diff.remove()
    results["whole_after_remove"] = all(p.numel() > 0 for p in pipe.unet_2.parameters())
    seen: list[int] = []
    def record(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not args[0].is_meta:  # not while tracing
            seen.extend(int(t) for t in args[0].flatten())

    pipe.unet_2.time_proj.register_forward_pre_hook(record)
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=1, time_shift=True, cost="flops")
    results["shifted"] = pipe(cond, steps, switch)
    results["unet_2_timesteps"] = sorted(set(seen))
    async_diff.remove()
    return results


def two_expert_stride_2(steps: int, switch: int) -> dict[str, Any]:
    """The two-expert pipeline under stride 2 on 3 processes, warm-up 1, called twice: how far it
    lands from the plain pipeline, whether the two calls agree, each engine's step kinds."""
    import copy

    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    sd = build_sd15("tiny", seed=0)
    pipe = TwoExperts(sd.unet, copy.deepcopy(sd.unet), sd.scheduler)
    cond = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    plain = pipe(cond, steps, switch)
    async_diff = AsyncDiff(pipe, model_n=2, stride=2, warm_up=1, cost="flops")
    first, second = pipe(cond, steps, switch), pipe(cond, steps, switch)
    kinds = {name: [kind.value for kind, _ in e.seconds] for name, e in async_diff.engines.items()}
    async_diff.remove()
    return {"deviation": float((first - plain).norm() / plain.norm()), "repeatable": bool(torch.equal(first, second)),
            "kinds": kinds}


class NamedGuidance(DiffusionPipeline):
    """Guidance as two named calls (diffusers' cache context: ``"uncond"``, then ``"cond"``) in
    even steps, the conditional call alone in odd steps (guidance in some steps only)."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any, guided_from: int = 0) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.guided_from = guided_from  # the first step with an unconditional call

    def _named(self, name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.unet, CacheContext(name))  # what model.cache_context(name) does
        try:
            return self.unet(*args, **kwargs).sample
        finally:
            _set_cache_context(self.unet, None)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(steps)
        size = self.unet.config.sample_size
        latents = torch.randn((1, self.unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(self.scheduler.timesteps):
            guided = i >= self.guided_from and i % 2 == 0
            if guided:
                uncond_noise = self._named("uncond", latents, t, encoder_hidden_states=uncond)
            noise = self._named("cond", latents, t, encoder_hidden_states=cond)
            if guided:
                noise = uncond_noise + 5.0 * (noise - uncond_noise)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def named_branch_scenarios(steps: int) -> dict[str, Any]:
    """Note [branches] with named calls: plain, all warm-up, stale, and the branch of each call."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    sd = build_sd15("tiny", seed=0)
    pipe = NamedGuidance(sd.unet, sd.scheduler)
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=g) for _ in range(2))
    results: dict[str, Any] = {"plain": pipe(cond, uncond, steps)}
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=steps, cost="flops")
    results["exact"] = pipe(cond, uncond, steps)
    async_diff.reset_state(warm_up=1)
    results["stale"] = pipe(cond, uncond, steps)
    results["branches"] = list(async_diff.engine.call.branch_log)
    async_diff.remove()
    return results


def late_branch_stride_2(steps: int) -> str:
    """Note [late branches] with stride 2: the unconditional call first comes at step 2, after
    warm-up; every rank must refuse it with the same error (returned)."""
    from asyncdiff import AsyncDiff
    from asyncdiff.engine.errors import StageError
    from asyncdiff.models.sd import build_sd15

    sd = build_sd15("tiny", seed=0)
    pipe = NamedGuidance(sd.unet, sd.scheduler, guided_from=2)
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=g) for _ in range(2))
    AsyncDiff(pipe, model_n=2, stride=2, warm_up=1, cost="flops", timeout_s=60)
    try:
        pipe(cond, uncond, steps)
    except StageError as err:
        return str(err)
    return "no error"


def stalled_peer(stall_s: float) -> tuple[str, float]:
    """Rank 1 stalls (sleeps ``stall_s``) inside a block at step 2 without failing; rank 0 must
    stop with an error within the deadline rather than wait. Each rank returns its error and how
    long its failing call took."""
    import time

    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig, StageError

    torch.manual_seed(0)
    toy = ToyDenoiser()
    engine = AsyncEngine(toy, EngineConfig(model_n=2, warm_up=1, cost="flops", timeout_s=5), latent="sample")
    stalled: list[bool] = []

    def stall(*_: Any) -> None:  # once, in the first block rank 1 runs at step 2
        if engine.step == 2 and not stalled:
            stalled.append(True)
            time.sleep(stall_s)

    if dist.get_rank() == 1:
        for module in toy.modules():
            if module is not toy:
                module.register_forward_pre_hook(stall)
    started = time.perf_counter()
    try:
        toy_steps(engine, 6)
    except StageError as err:
        return str(err), time.perf_counter() - started
    return "no error", time.perf_counter() - started


class TopLevelBranchy(torch.nn.Module):
    """A denoiser whose own forward branches on a tensor's values: only a value trace can follow
    it (Note [value trace]), which then checks the branch at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        h = self.a(sample)
        if h.mean() > 0:
            h = -h
        return self.b(h)


class ReadsAFloat(TopLevelBranchy):
    """A denoiser whose forward reads a tensor's value as a Python float: untraceable."""

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        h = self.a(sample)
        return self.b(h / float(h.abs().max()))


def untraceable_engine() -> str:
    """Every rank's first call of an untraceable denoiser: the error each rank raises."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    engine = AsyncEngine(ReadsAFloat(), EngineConfig(model_n=2, warm_up=1, cost="flops", timeout_s=30),
                         latent="sample")
    try:
        engine(torch.randn(2, 4))
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def coverage_at_full_warm_up(name: str, steps: int, cost: str) -> dict[str, Any]:
    """Coverage case ``name``, plain and under AsyncDiff with every step a warm-up step."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.coverage import case
    from asyncdiff.models.coverage.check import output_tensor

    pipe, kwargs = case(name).build()

    def run() -> torch.Tensor:
        with torch.no_grad():
            return output_tensor(pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs))

    plain = run()
    async_diff = AsyncDiff(pipe, model_n=dist.get_world_size(), warm_up=steps, cost=cost, replan=True)
    result = {"plain": plain, "split": run(), "plan": async_diff.plan}
    async_diff.remove()
    return result


class TwiceDenoiser(torch.nn.Module):
    """Runs one weighted block (``shared``) twice per call."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(4, width, 3, padding=1)
        self.shared = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> Any:
        h = self.shared(torch.tanh(self.shared(self.inp(sample))))
        out = self.out(h) * timestep.reshape(-1, 1, 1, 1)
        return {"sample": out} if return_dict else (out,)


def twice_stage_only(steps: int) -> dict[str, Any]:
    """:class:`TwiceDenoiser` held stage-only (other stages' blocks as placeholders, as a
    stage-only load leaves them) under a 2-stage engine with every step a warm-up step: the
    output, the plain model's, and the warnings the first call gave."""
    import warnings

    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
    from asyncdiff.engine.weights import release_foreign
    from asyncdiff.partition.plan import Plan

    torch.manual_seed(0)
    toy = TwiceDenoiser()
    plain = toy_steps(toy, steps)
    plan = Plan(stages=(("inp",), ("shared#1", "shared#2", "out")))  # a block per call of `shared`
    released: dict[str, Any] = {}
    release_foreign(toy, plan, dist.get_rank(), [], released)
    engine = AsyncEngine(toy, EngineConfig(model_n=2, warm_up=steps, cost="flops"), plan=plan, latent="sample",
                         released=released)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = toy_steps(engine, steps)
    return {"plain": plain, "split": split, "warnings": [str(w.message) for w in caught]}


def in_memory_stage_scenario(steps: int) -> dict[str, Any]:
    """``stage_in_memory`` (what ``AsyncDiff`` does on a GPU with a pipeline on the CPU), here
    with the CPU as the device: the plain latents, what the UNet holds after it, the latents
    under AsyncDiff with every step a warm-up step, and what it holds after ``remove()``."""
    from asyncdiff import AsyncDiff
    from asyncdiff.adapters.loading import stage_in_memory
    from asyncdiff.models.sd import build_sd15

    pipe = build_sd15("tiny", seed=0)

    def held() -> int:
        return sum(t.numel() * t.element_size() for t in (*pipe.unet.parameters(), *pipe.unet.buffers()))

    def latents() -> torch.Tensor:
        with torch.no_grad():
            return pipe("a cat", num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    result: dict[str, Any] = {"plain": latents(), "whole": held()}
    load = stage_in_memory(pipe, "unet", latent="sample", model_n=2, stage=dist.get_rank(),
                           device=torch.device("cpu"), cost="bytes")
    result["held"], result["source"] = held(), load.source
    async_diff = AsyncDiff(pipe, model_n=2, warm_up=steps, plan=load.plan, released=load.released)
    result["split"], result["checks"] = latents(), async_diff.engine.planning.streamed_checks
    async_diff.remove()
    result["after_remove"] = held()
    return result


def value_traced_from_pretrained(path: str, steps: int) -> dict[str, Any]:
    """``AsyncDiff.from_pretrained`` on a saved Lumina2 pipeline (no text encoder: prompt embeddings
    given), whose denoiser needs a value trace (Note [value trace]), every step a warm-up step: the
    warnings of the load, the plain and the split latents, the weights released after the call."""
    import warnings

    from diffusers import DiffusionPipeline

    from asyncdiff import AsyncDiff
    from asyncdiff.models.coverage.dit_image import _lumina_call

    absent = {"text_encoder": None, "tokenizer": None}
    call = {"prompt": None, **_lumina_call()}

    def latents(pipe: Any) -> torch.Tensor:
        with torch.no_grad():
            return pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **call).images

    plain = latents(DiffusionPipeline.from_pretrained(path, **absent))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async_diff = AsyncDiff.from_pretrained(path, model_n=dist.get_world_size(), warm_up=steps, components=absent,
                                               call_kwargs=call)
    split = latents(async_diff.pipeline)
    result = {"plain": plain, "split": split, "released": len(async_diff.engine.released_weights),
              "warnings": [str(w.message) for w in caught if "asyncdiff" in w.filename or "toys" in w.filename]}
    async_diff.remove()
    return result


def failing_decision(kind: str) -> tuple[str, str, str, float]:
    """Rank 0 raises ``kind`` (an exception class name of builtins) while it plans; every rank
    catches what reaches it and stays alive (a notebook, a server). Each rank returns the
    error's type, its message, its cause's type and how long its first call took."""
    import builtins
    import time

    import asyncdiff.engine.planning as planning
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    def broken(*_: Any, **__: Any) -> Any:
        raise getattr(builtins, kind)("injected while planning")

    working = planning.cached_plan, planning.cached_choice
    if dist.get_rank() == 0:  # this process only, until the end of this call; either rule's planning
        planning.cached_plan = planning.cached_choice = broken
    torch.manual_seed(0)
    engine = AsyncEngine(ToyDenoiser(), EngineConfig(model_n=2, warm_up=1, cost="flops"), latent="sample")
    started = time.perf_counter()
    try:
        toy_steps(engine, 2)
    except BaseException as err:  # noqa: BLE001 -- KeyboardInterrupt is one of the cases
        return type(err).__name__, str(err), type(err.__cause__).__name__, time.perf_counter() - started
    finally:
        planning.cached_plan, planning.cached_choice = working
    return "no error", "", "", time.perf_counter() - started


def toy_loop(denoiser: Any, steps: int, pace: Callable[[int], float] = lambda t: 1.0) -> list[torch.Tensor]:
    """Every step's output of a small denoising loop on the toy denoiser's input shape: the latent
    moves against the output by ``0.1 * pace(step)`` each step."""
    x, out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), []
    with torch.no_grad():
        for t in range(steps):
            out.append(denoiser(x, torch.tensor([float(steps - t)]), return_dict=False)[0])
            x = x - 0.1 * out[-1] * pace(t)
    return out


def pilot_scenarios(steps: int, warm_up: int, max_slowdown: float | None, cache: str) -> dict[str, Any]:
    """Note [measured plan choice] on the toy: every step's output with the plan the fidelity rule
    measured, with that plan given from the start, and with it read from the plan cache; the
    candidates, their errors, the provisional plan and where each plan came from."""
    import dataclasses
    import os

    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    os.environ["ASYNCDIFF_PLAN_CACHE"] = cache
    torch.manual_seed(0)
    toy = ToyDenoiser(depth=6)

    def outputs(denoiser: Any) -> list[torch.Tensor]:
        return toy_loop(denoiser, steps)

    config = EngineConfig(model_n=dist.get_world_size(), warm_up=warm_up, cost="flops", max_slowdown=max_slowdown)
    results: dict[str, Any] = {"sequential": outputs(toy)}
    depth = dataclasses.replace(config, plan_rule="depth")
    for name, plan, rule in (("measured", None, config), ("cached", None, config), ("given", "measured", config),
                             ("depth", None, depth)):
        engine = AsyncEngine(toy, rule, latent="sample", plan=results[f"{plan}_plan"] if plan else None)
        results[name] = outputs(engine)
        results[f"{name}_plan"], results[f"{name}_source"] = engine.plan, engine.plan_source
        results[f"{name}_kinds"] = [kind.name for kind, _ in engine.call.seconds]
        results[f"{name}_candidates"] = [(p.stages, e) for p, e in engine.planning.measured]
        results[f"{name}_released"] = len(engine.released_weights)
        engine.restore_weights()
    return results


def warm_up_scenarios(steps: int) -> dict[str, Any]:
    """Note [relative warm-up], on every rank: the tiny SD under AsyncDiff with a fixed warm-up
    count and with fractions of ``steps`` and ``2 * steps``, each call's latents and the kinds it
    ran; and a fraction's first call under the fidelity rule against the count it means."""
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    world = dist.get_world_size()
    pipe = build_sd15("tiny", seed=0)

    def latents(n: int) -> tuple[torch.Tensor, list[str]]:
        generator = torch.Generator().manual_seed(0)
        out = pipe("a photo of a cat", num_inference_steps=n, generator=generator, output_type="latent").images
        engine = pipe._asyncdiff.engine if hasattr(pipe, "_asyncdiff") else None
        return out, [str(d.kind) for d in engine.call.decisions] if engine else []

    result: dict[str, Any] = {}
    with torch.no_grad():
        result["reference"] = latents(steps)
        async_diff = AsyncDiff(pipe, model_n=world, warm_up=steps // 2, plan_rule="depth")
        result["count_half"] = latents(steps)
        async_diff.reset_state(warm_up=steps)
        result["count_long"] = latents(2 * steps)
        for warm_up in (0.5, 0.99, "auto"):
            async_diff.reset_state(warm_up=warm_up)
            result[f"{warm_up}"] = latents(steps)
            result[f"{warm_up}_long"] = latents(2 * steps)
        result["warm_up_steps"] = async_diff.summary(2 * steps)["warm_up_steps"]
        async_diff.remove()
        for warm_up in (steps // 2, 0.5):  # the fidelity rule measures the first call's warm-up
            async_diff = AsyncDiff(pipe, model_n=world, warm_up=warm_up, cost="flops")  # measured times vary
            result[f"measured_{warm_up}"] = latents(steps)[0], async_diff.engine.plan_source
            async_diff.remove()
    return result


def predicted_refresh_scenarios(steps: int, limits: list[float | str | None], cache: str) -> dict[str, Any]:
    """Note [predicted refresh] on the toy, on every rank: for each ``refresh_error`` limit (None:
    off), every step's output, its decisions (kind, why) and the plan's notes; the sequential
    outputs; and the same limit with the plan given without its measurement (it warns, no refresh)."""
    import os

    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    os.environ["ASYNCDIFF_PLAN_CACHE"] = cache
    torch.manual_seed(0)
    toy = ToyDenoiser(depth=6)

    def outputs(denoiser: Any) -> list[torch.Tensor]:
        return toy_loop(denoiser, steps, pace=lambda t: steps - t)  # the first steps move most

    results: dict[str, Any] = {"sequential": outputs(toy)}
    plan = None
    for key in limits:  # "middle": the median of the predictions the 0.0 run printed
        limit = key
        if key == "middle":
            predicted = sorted(float(why.split()[2]) for _, why in results[0.0][1] if why.startswith("predicted"))
            limit = results["middle_limit"] = predicted[len(predicted) // 2]
        config = EngineConfig(model_n=dist.get_world_size(), warm_up=1, cost="flops", refresh_error=limit)
        engine = AsyncEngine(toy, config, latent="sample")
        results[key] = outputs(engine), [(str(d.kind), d.why) for d in engine.call.decisions], engine.plan.notes
        plan = engine.plan
        engine.restore_weights()
    assert plan is not None
    bare = type(plan)(plan.stages, plan.costs, plan.cost_unit, {})  # no measurement: nothing to predict with
    engine = AsyncEngine(toy, EngineConfig(model_n=dist.get_world_size(), warm_up=1, cost="flops", refresh_error=0.0),
                         latent="sample", plan=bare)
    results["bare"] = outputs(engine), [str(d.kind) for d in engine.call.decisions], engine.refresh.warned
    engine.restore_weights()
    return results


def engine_schedule_run(steps: int, warm_up: int, stride: int = 1, time_shift: bool = False,
                        transfer_dtype: str | None = None, compensate: str = "none",
                        layout: str = "contiguous") -> tuple[list[torch.Tensor], Any]:
    """:func:`fixed_calls` through an engine with these schedule settings on this process group
    (``model_n`` = the world, less one for stride 2); the outputs on this rank and the plan."""
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    torch.manual_seed(0)
    config = EngineConfig(model_n=dist.get_world_size() - (stride - 1), warm_up=warm_up, stride=stride,
                          time_shift=time_shift, transfer_dtype=transfer_dtype, compensate=compensate, cost="flops",
                          layouts=(layout,), plan_rule="depth")
    engine = AsyncEngine(ToyDenoiser(), config, latent="sample", timestep_arg="timestep",
                         timesteps=lambda step: float(steps - step))
    with torch.no_grad():
        return [engine(*args, **kwargs)[0] for args, kwargs in fixed_calls(steps)], engine.plan
