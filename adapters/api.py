"""The two-line API of the AsyncDiff seed.

Example (under ``torchrun --nproc_per_node=2``)::

    from asyncdiff import AsyncDiff
    async_diff = AsyncDiff(pipeline, model_n=2, stride=1, warm_up=1, time_shift=False)
    async_diff.reset_state(warm_up=1)
    image = pipeline(prompt).images[0]
    async_diff.remove()   # the plain pipeline again
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from asyncdiff.adapters.hooks import attach, detach
from asyncdiff.adapters.registry import Adapter, adapter_for, registered_adapter
from asyncdiff.engine.launch import init_from_env, local_device, under_torchrun
from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
from asyncdiff.partition.plan import Plan

__all__ = ["TEXT_ENCODERS", "AsyncDiff", "engine_config"]

TEXT_ENCODERS = ("every", "rank0")  # where the text encoders live


class AsyncDiff:
    """Split ``pipeline``'s denoiser into ``model_n`` stages, one per process, and run it
    asynchronously after ``warm_up`` sequential steps of every pipeline call.

    Every process builds the same pipeline and calls it the same way; each holds only its
    stage's weights once the first call has planned the split. ``options`` are the engine's
    settings, the fields of :class:`~asyncdiff.engine.config.EngineConfig` (each documented there),
    e.g. ``cost="flops"``, ``transfer_dtype="bfloat16"``, ``refresh_every=4``, ``guidance=2``,
    ``parallel="auto"``, ``timeout_s=600``; or pass a whole ``config=EngineConfig(...)`` instead
    (Note [one config]). ``plan`` fixes the split instead of planning it (plans are kept on disk
    per call and options, Note [plan cache]). ``text_encoders="rank0"``: only rank 0 keeps the
    text encoders; it broadcasts the prompt embeddings to the others (Note [encoders on one rank]
    in :mod:`asyncdiff.adapters.encoders`). ``released``: set by :meth:`from_pretrained` (weights
    this rank never loaded).
    """

    def __init__(self, pipeline: Any, model_n: int = 2, stride: int = 1, warm_up: int = 1,
                 time_shift: bool = False, *, config: EngineConfig | None = None, plan: Plan | None = None,
                 text_encoders: str = "every", adapter: Adapter | None = None,
                 released: dict[str, tuple[Any, Any, Any]] | None = None, **options: Any) -> None:
        if text_encoders not in TEXT_ENCODERS:
            raise ValueError(f"text_encoders={text_encoders!r} must be 'every' (each rank keeps its own) or "
                             f"'rank0' (rank 0 keeps them and broadcasts the prompt embeddings)")
        config = engine_config(config, model_n=model_n, stride=stride, warm_up=warm_up, time_shift=time_shift,
                               **options)
        _join_processes(config)
        self.pipeline = pipeline
        self.adapter = adapter or adapter_for(pipeline)
        self.denoiser = getattr(pipeline, self.adapter.denoiser)
        _warn_other_denoisers(pipeline, self.adapter.denoiser, self.denoiser)
        self.shared_encoders = None  # Note [encoders on one rank]
        if text_encoders == "rank0" and dist.is_initialized() and dist.get_world_size() > 1:
            from asyncdiff.adapters.encoders import share_text_encoders

            self.shared_encoders = share_text_encoders(pipeline, owner=0, device=local_device())
        device = local_device()
        if device.type == "cuda" and getattr(self.denoiser, "device", device).type != "cuda":
            pipeline.to(device)
        self.engine = AsyncEngine(self.denoiser, config, plan=plan, latent=self.adapter.latent,
                                  timestep_arg=self.adapter.timestep, timesteps=self._timestep_of_step,
                                  marks_steps=True, guided=functools.partial(_guided, pipeline), released=released)
        attach(self.denoiser, self.engine)
        self._original_class = type(pipeline)
        pipeline.__class__ = _resetting_subclass(self._original_class)
        pipeline._asyncdiff = self

    @classmethod
    def from_pretrained(cls, path: str, model_n: int = 2, stride: int = 1, warm_up: int = 1,
                        time_shift: bool = False, *, config: EngineConfig | None = None,
                        torch_dtype: torch.dtype | None = None, variant: str | None = None, plan: Plan | None = None,
                        call_kwargs: dict[str, Any] | None = None, text_encoders: str = "every",
                        **options: Any) -> AsyncDiff:
        """Load the diffusers pipeline at ``path`` (folder or hub id) with this rank holding only
        its stage's denoiser weights from the start (Note [stage-only loading] in
        :mod:`asyncdiff.adapters.loading`), the engine attached: ``async_diff.pipeline(prompt)``.

        The plan is counted on the weight-free model (the same on every rank) in FLOPs (the
        default here, ``cost="flops"``) or in weight bytes (``cost="bytes"``: each rank holds about
        1/N of the denoiser, for a model that does not fit one device), unless ``plan`` is given
        or cached. ``call_kwargs``: the call whose denoiser input the planner traces (default: an
        empty prompt at the pipeline's default size). ``options``, ``config``: as for
        :class:`AsyncDiff`. ``remove()`` gathers the whole denoiser on every rank."""
        from diffusers import DiffusionPipeline

        from asyncdiff.adapters.loading import load_stage_only, read_model_index

        if config is None:
            options.setdefault("cost", "flops")
        config = engine_config(config, model_n=model_n, stride=stride, warm_up=warm_up, time_shift=time_shift,
                               **options)
        if config.parallel is not None:
            raise ValueError(f"parallel={config.parallel!r}: from_pretrained loads one stage per rank before "
                             f"the first call, when 'auto' would choose; give guidance, batch and model_n instead")
        _join_processes(config)
        rank = dist.get_rank() if dist.is_initialized() else 0
        device = local_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        folder, index = read_model_index(path)
        registered = registered_adapter(getattr(__import__("diffusers"), index["_class_name"], DiffusionPipeline))
        weight_free = {}
        if text_encoders == "rank0" and rank != 0:  # Note [encoders on one rank]
            from asyncdiff.adapters.loading import encoder_skeletons

            weight_free = encoder_skeletons(folder, index, torch_dtype, variant)
        load = load_stage_only(str(folder), denoiser_attr=registered.denoiser if registered else None,
                               latent=registered.latent if registered else None, model_n=config.model_n,
                               stage=min(rank % config.stage_world, config.model_n - 1), device=device,
                               torch_dtype=torch_dtype, variant=variant, plan=plan, policy=config.policy,
                               layouts=config.plan_layouts, max_slowdown=config.max_slowdown,
                               bandwidth=config.planner_bandwidth(device), call_kwargs=call_kwargs,
                               components=weight_free, cost=config.cost)
        async_diff = cls(load.pipeline, config=config, plan=load.plan, text_encoders=text_encoders,
                         adapter=registered, released=load.released)
        async_diff.engine.planning.plan_source = load.source
        return async_diff

    def _timestep_of_step(self, step: int) -> Any:
        """The timestep of denoising step ``step`` of the running call (clamped to the last one)."""
        scheduler = self.pipeline.scheduler
        begin = getattr(scheduler, "begin_index", None) or 0
        return scheduler.timesteps[min(begin + step, len(scheduler.timesteps) - 1)]

    def reset_state(self, warm_up: int | None = None) -> None:
        """Forget all stale state; a new ``warm_up`` applies from the next pipeline call on."""
        self.engine.reset_state(warm_up)

    @property
    def plan(self) -> Plan | None:
        return self.engine.plan

    def remove(self) -> None:
        """Detach the engine; released weights come back from their owners (all ranks call it)."""
        self.engine.reset_state()
        self.engine.restore_weights()
        if self.shared_encoders is not None:
            self.shared_encoders.restore()
            self.shared_encoders = None
        detach(self.denoiser)
        self.pipeline.__class__ = self._original_class
        del self.pipeline._asyncdiff


def other_denoisers(pipeline: Any, attr: str, denoiser: torch.nn.Module) -> list[str]:
    """Components that are denoisers too but not ``attr`` (Wan 2.2's ``transformer_2`` takes the
    low-noise steps): the same class, or named ``<attr>_<k>``."""
    try:
        components = pipeline.components
    except Exception:  # not a diffusers pipeline, or one whose modules do not match its signature
        return []
    return [name for name, c in components.items() if name != attr and isinstance(c, torch.nn.Module)
            and c is not denoiser and (type(c) is type(denoiser) or name.startswith(f"{attr}_"))]


def _warn_other_denoisers(pipeline: Any, attr: str, denoiser: torch.nn.Module) -> None:
    others = other_denoisers(pipeline, attr, denoiser)
    if others:
        warnings.warn(f"{type(pipeline).__name__} has another denoiser ({', '.join(others)}) besides {attr!r}; "
                      f"asyncdiff splits only {attr!r}, so the steps the other takes run whole on every rank "
                      f"(no speed-up or memory saving there)", stacklevel=3)


def _guided(pipeline: Any) -> bool | None:
    """Whether ``pipeline``'s running call batches classifier-free guidance (diffusers' property)."""
    try:
        guided = pipeline.do_classifier_free_guidance
    except Exception:  # no such property, or one that reads a value this call has not set
        return None
    return bool(guided) if isinstance(guided, (bool, int)) else None


SEED_DEFAULTS = {"model_n": 2, "stride": 1, "warm_up": 1, "time_shift": False}  # the seed API's arguments


def engine_config(config: EngineConfig | None, **settings: Any) -> EngineConfig:
    """Note [one config]: the API's settings as one :class:`EngineConfig`: ``config`` itself
    (``settings`` may then only repeat it), or the config of ``settings``; an unknown setting
    is an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the engine's settings are the fields of "
                        f"EngineConfig: {', '.join(sorted(known))}")
    if config is None:
        return EngineConfig(**settings)
    differ = [f"{name}={value!r}" for name, value in settings.items()
              if value != getattr(config, name) and not (name in SEED_DEFAULTS and value == SEED_DEFAULTS[name])]
    if differ:
        raise ValueError(f"{', '.join(differ)} given beside config={config!r}, which says otherwise; "
                         f"put every setting in the config (dataclasses.replace(config, ...))")
    return config


def _join_processes(config: EngineConfig) -> None:
    """Join torchrun's process group where the configuration needs several processes."""
    several = config.world_size > 1 or (config.parallel == "auto" and under_torchrun())
    if several and not dist.is_initialized():
        if not under_torchrun():
            raise RuntimeError(f"model_n={config.model_n}, stride={config.stride} need {config.world_size} processes; "
                               f"start with torchrun --nproc_per_node={config.world_size}")
        init_from_env()


_SUBCLASSES: dict[type, type] = {}


_STEP_END: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("asyncdiff_step_end", default=None)
_MARKING: dict[type, type] = {}


def _marking_class(cls: type) -> type:
    """``cls`` whose ``step`` calls the running pipeline call's step-end callback afterwards. A
    class, not an instance attribute: a pipeline that deep-copies its scheduler (one per latent
    frame, as SkyReels-V2's diffusion forcing does) gets copies that step themselves."""
    if cls not in _MARKING:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = cls.step(self, *args, **kwargs)
            end_step = _STEP_END.get()
            if end_step is not None:
                end_step()
            return out

        _MARKING[cls] = type(cls.__name__, (cls,), {"step": functools.wraps(cls.step)(step), "__module__": cls.__module__})
    return _MARKING[cls]


@contextlib.contextmanager
def _marking_steps(scheduler: Any, end_step: Callable[[], None]) -> Iterator[None]:
    """For the duration of one pipeline call, ``end_step()`` after every ``scheduler.step`` (and
    every step of a copy of it): the scheduler's step is where a pipeline's denoising step ends,
    whatever its loop looks like. The engine ends a step only once per denoiser call, so several
    schedulers stepping after one call (one per frame) end one step."""
    original = type(scheduler)
    scheduler.__class__ = _marking_class(original)
    token = _STEP_END.set(end_step)
    try:
        yield
    finally:
        _STEP_END.reset(token)
        scheduler.__class__ = original


def _resetting_subclass(cls: type) -> type:
    """``cls`` with a ``__call__`` that resets the engine's state first (state lives per call) and
    tells the engine where denoising steps end (Note [branches] in engine/runtime.py)."""
    if cls not in _SUBCLASSES:
        @functools.wraps(cls.__call__)  # keeps the pipeline's signature visible to inspect
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            engine = self._asyncdiff.engine
            engine.reset_state()
            scheduler = getattr(self, "scheduler", None)
            engine.marks_steps = callable(getattr(scheduler, "step", None))
            try:
                with _marking_steps(scheduler, engine.end_step) if engine.marks_steps else contextlib.nullcontext():
                    return cls.__call__(self, *args, **kwargs)
            finally:
                engine.marks_steps = False  # calls outside a pipeline call are one step each

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]
