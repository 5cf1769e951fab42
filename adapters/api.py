"""The two-line API of the AsyncDiff seed.

Example (under ``torchrun --nproc_per_node=2``)::

    from asyncdiff import AsyncDiff
    async_diff = AsyncDiff(pipeline, model_n=2, stride=1, warm_up=1, time_shift=False)
    async_diff.reset_state(warm_up=1)
    image = pipeline(prompt).images[0]
    async_diff.remove()   # the plain pipeline again

Note [several denoisers]: some pipelines call more than one denoiser per call: Wan 2.2 calls
``transformer`` above a boundary timestep and ``transformer_2`` (its low-noise expert) below it,
and the combined pipelines (Kandinsky, Stable Cascade) run a prior's loop (``prior_prior``,
stepped by ``prior_scheduler``) before the decoder's. Each such denoiser (:func:`other_denoisers`)
gets an engine of its own: its own plan (made at its first call; a given ``plan`` is the main
denoiser's), its own weights released, its own stale state. An engine's steps count from its own
first call, so the second expert starts with its own warm-up, as a second loop does (Note [a
second loop] in engine/runtime.py). Every scheduler of the pipeline marks step ends; only an
engine called since the last end ends a step. Under time shift or stride 2 a later denoiser's
step k is the pipeline's step at which it began plus k (``AsyncDiff._timestep_of_later``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from asyncdiff.adapters.hooks import attach, detach
from asyncdiff.adapters.registry import DENOISER_ATTRS, Adapter, adapter_for, registered_adapter, timestep_arg
from asyncdiff.engine.launch import init_from_env, local_device, under_torchrun
from asyncdiff.engine.config import WarmUp
from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.diagnose import TraceError

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
    in :mod:`asyncdiff.adapters.encoders`). ``released``, ``weights_from``: set by
    :meth:`from_pretrained` (weights this rank never loaded, and the reader of the checkpoint
    that :meth:`remove` reads them from: Note [reload from the checkpoint]).

    On a GPU, a pipeline still on the CPU is planned first (on FLOPs, or ``cost="bytes"``; no
    timing profile) and each rank moves to its GPU only the denoiser weights its stage uses, as
    :meth:`from_pretrained` loads them (``stage_in_memory`` in :mod:`asyncdiff.adapters.loading`;
    not with ``parallel="auto"``, which chooses at the first call, nor for a second denoiser).
    """

    def __init__(self, pipeline: Any, model_n: int = 2, stride: int = 1, warm_up: WarmUp = 1,
                 time_shift: bool = False, *, config: EngineConfig | None = None, plan: Plan | None = None,
                 text_encoders: str = "every", adapter: Adapter | None = None,
                 released: dict[str, tuple[Any, Any, Any]] | None = None,
                 weights_from: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                 record: str | None = None, **options: Any) -> None:
        if text_encoders not in TEXT_ENCODERS:
            raise ValueError(f"text_encoders={text_encoders!r} must be 'every' (each rank keeps its own) or "
                             f"'rank0' (rank 0 keeps them and broadcasts the prompt embeddings)")
        config = engine_config(config, model_n=model_n, stride=stride, warm_up=warm_up, time_shift=time_shift,
                               **options)
        _join_processes(config)
        self.pipeline = pipeline
        self.adapter = adapter or adapter_for(pipeline)
        self.denoiser = getattr(pipeline, self.adapter.denoiser)
        self.shared_encoders = None  # Note [encoders on one rank]
        if text_encoders == "rank0" and dist.is_initialized() and dist.get_world_size() > 1:
            from asyncdiff.adapters.encoders import share_text_encoders

            self.shared_encoders = share_text_encoders(pipeline, owner=0, device=local_device())
        device, plan_source = local_device(), None
        if device.type == "cuda" and getattr(self.denoiser, "device", device).type != "cuda":
            if released is None and config.model_n > 1 and config.parallel is None:
                plan, released, plan_source = self._stage_on(device, config, plan)
            pipeline.to(device)  # the rest; released weights stay placeholders
        # Note [several denoisers]: the main one, then every other the loop may call, each split on its own
        self.engines: dict[str, AsyncEngine] = {}
        for name in (self.adapter.denoiser, *other_denoisers(pipeline, self.adapter.denoiser, self.denoiser)):
            module, main = getattr(pipeline, name), name == self.adapter.denoiser
            alike = type(module) is type(self.denoiser)  # else its first tensor argument is the latent
            self.engines[name] = AsyncEngine(
                module, config, plan=plan if main else None, latent=self.adapter.latent if alike else None,
                timestep_arg=self.adapter.timestep if alike else timestep_arg(module),
                timesteps=self._timestep_of_step if main else functools.partial(self._timestep_of_later, name),
                marks_steps=True, guided=functools.partial(_guided, pipeline), released=released if main else None,
                weights_from=weights_from if main else None, loop_steps=functools.partial(self._loop_steps, name))
        self.engine = self.engines[self.adapter.denoiser]
        for engine in self.engines.values():
            engine.record(record)  # Note [run records] in engine/record.py (None: no record)
        if plan_source is not None:
            self.engine.planning.plan_source = plan_source
        self._steps = 0  # denoising steps of the running pipeline call, every denoiser's
        for name, engine in self.engines.items():
            attach(getattr(pipeline, name), engine)
        self._original_class = type(pipeline)
        pipeline.__class__ = _resetting_subclass(self._original_class)
        pipeline._asyncdiff = self

    def _stage_on(self, device: torch.device, config: EngineConfig,
                  plan: Plan | None) -> tuple[Plan | None, dict[str, tuple[Any, Any, Any]] | None, str | None]:
        """Note [stage-only loading] in memory: the plan made without weights (FLOPs, or bytes),
        the other stages' denoiser weights freed on the CPU, this stage's moved to ``device``:
        (plan, released weights, where the plan came from)."""
        from asyncdiff.adapters.loading import stage_in_memory

        rank = dist.get_rank() if dist.is_initialized() else 0
        try:
            load = stage_in_memory(self.pipeline, self.adapter.denoiser, latent=self.adapter.latent,
                                   model_n=config.model_n, stage=min(rank % config.stage_world, config.model_n - 1),
                                   device=device, plan=plan, policy=config.policy, layouts=config.plan_layouts,
                                   max_slowdown=config.slowdown("depth"), bandwidth=config.planner_bandwidth(device),
                                   cost="flops" if config.cost == "time" else config.cost)
        except TraceError as err:  # then it moves whole, and the first call plans with its weights
            warnings.warn(_loaded_whole(err), stacklevel=3)
            return plan, None, None
        return load.plan, load.released, load.source

    @classmethod
    def from_pretrained(cls, path: str, model_n: int = 2, stride: int = 1, warm_up: WarmUp = 1,
                        time_shift: bool = False, *, config: EngineConfig | None = None,
                        torch_dtype: torch.dtype | None = None, variant: str | None = None, plan: Plan | None = None,
                        call_kwargs: dict[str, Any] | None = None, text_encoders: str = "every",
                        components: dict[str, Any] | None = None, record: str | None = None,
                        **options: Any) -> AsyncDiff:
        """Load the diffusers pipeline at ``path`` (folder or hub id) with this rank holding only
        its stage's denoiser weights from the start (Note [stage-only loading] in
        :mod:`asyncdiff.adapters.loading`), the engine attached: ``async_diff.pipeline(prompt)``.

        The plan is counted on the weight-free model (the same on every rank) in FLOPs (the
        default here, ``cost="flops"``) or in weight bytes (``cost="bytes"``: each rank holds about
        1/N of the denoiser, for a model that does not fit one device), unless ``plan`` is given
        or cached. ``call_kwargs``: the call whose denoiser input the planner traces (default: an
        empty prompt at the pipeline's default size). ``components``: pipeline components to use
        instead of loading them, as diffusers' ``from_pretrained`` takes them (``text_encoder=None``).
        ``options``, ``config``: as for :class:`AsyncDiff`. ``remove()`` gathers the whole denoiser
        on every rank.

        A denoiser whose code depends on tensor values cannot be planned without its weights (Note
        [value trace]): then every rank loads it whole, with a warning, and releases the other
        stages' weights after the first call, as :class:`AsyncDiff` does with a loaded pipeline."""
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
        given = {**(components or {}), **weight_free}
        try:
            load = load_stage_only(str(folder), denoiser_attr=registered.denoiser if registered else None,
                                   latent=registered.latent if registered else None, model_n=config.model_n,
                                   stage=min(rank % config.stage_world, config.model_n - 1), device=device,
                                   torch_dtype=torch_dtype, variant=variant, plan=plan, policy=config.policy,
                                   layouts=config.plan_layouts, max_slowdown=config.slowdown("depth"),
                                   bandwidth=config.planner_bandwidth(device), call_kwargs=call_kwargs,
                                   components=given, cost=config.cost)
        except TraceError as err:
            warnings.warn(_loaded_whole(err), stacklevel=2)
            pipeline = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant, **given)
            return cls(pipeline, config=config, plan=plan, text_encoders=text_encoders, adapter=registered,
                       record=record)
        async_diff = cls(load.pipeline, config=config, plan=load.plan, text_encoders=text_encoders,
                         adapter=registered, released=load.released, weights_from=load.checkpoint.read, record=record)
        async_diff.engine.planning.plan_source = load.source
        return async_diff

    def _timestep_of_step(self, step: int) -> Any:
        """The timestep of denoising step ``step`` of the running call (clamped to the last one)."""
        return _timestep_at(self.pipeline.scheduler, step)

    def _loop_steps(self, name: str) -> int | None:
        """The steps denoiser ``name``'s loop has from now (Note [relative warm-up]): its scheduler's
        timesteps from the loop's begin index (a step ends at each scheduler step, so a second-order
        scheduler's repeated timesteps count), less the pipeline steps already run for one that
        begins later (Note [several denoisers]); None before the timesteps are set."""
        prefix = name.split("_")[0]
        scheduler = getattr(self.pipeline, f"{prefix}_scheduler", None) or self.pipeline.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        return max(1, len(timesteps) - begin - (self._steps if name != self.adapter.denoiser else 0))

    def _timestep_of_later(self, name: str, step: int) -> Any:
        """Note [several denoisers]: the timestep of step ``step`` of denoiser ``name``, which began
        at a later step of the pipeline's loop (Wan 2.2's ``transformer_2``) or in a loop of its own
        (a combined pipeline's ``prior_prior``, stepped by ``prior_scheduler``); it runs at the
        loop's step ``self._steps`` now, which is its own step ``engine.step``."""
        prefix = name.split("_")[0]
        scheduler = getattr(self.pipeline, f"{prefix}_scheduler", None) or self.pipeline.scheduler
        return _timestep_at(scheduler, self._steps + step - self.engines[name].step)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """One pipeline call: every engine's state starts afresh (state lives per call), and the
        engines hear where denoising steps end (Note [branches] in engine/runtime.py)."""
        schedulers = _schedulers(self.pipeline)
        self._steps = 0
        for engine in self.engines.values():
            engine.reset_state()
            engine.marks_steps = bool(schedulers)
        try:
            with _marking_steps(schedulers, self._end_step):
                yield
        except BaseException as err:  # Note [failures reach every rank]: the peers report the cause
            for engine in self.engines.values():
                engine.announce(err)
            raise
        finally:
            for engine in self.engines.values():
                engine.marks_steps = False  # calls outside a pipeline call are one step each

    def _end_step(self) -> None:
        ended = [engine.end_step() for engine in self.engines.values()]  # only the one that ran ends one
        self._steps += any(ended)

    def reset_state(self, warm_up: WarmUp | None = None) -> None:
        """Forget all stale state; a new ``warm_up`` applies from the next pipeline call on."""
        for engine in self.engines.values():
            engine.reset_state(warm_up)

    @property
    def plan(self) -> Plan | None:
        return self.engine.plan

    def summary(self, steps: int) -> dict[str, Any]:
        """What the last pipeline call ran (:func:`~asyncdiff.engine.summary.summary` of the main
        engine), with the plans of the pipeline's other denoisers (Note [several denoisers])."""
        from asyncdiff.engine.summary import summary

        result = summary(self.engine, steps)
        others = {name: e for name, e in self.engines.items() if e is not self.engine and e.plan is not None}
        if others:
            result["other_denoisers"] = {name: {"plan": [len(s) for s in e.plan.stages], "plan_source": e.plan_source}
                                         for name, e in others.items()}
        return result

    def remove(self) -> None:
        """Detach the engines; released weights come back from the checkpoint they were loaded
        from, else from their owners (all ranks call it)."""
        for name, engine in self.engines.items():
            engine.reset_state()
            engine.restore_weights()
            detach(getattr(self.pipeline, name))
        if self.shared_encoders is not None:
            self.shared_encoders.restore()
            self.shared_encoders = None
        self.pipeline.__class__ = self._original_class
        del self.pipeline._asyncdiff


def _timestep_at(scheduler: Any, index: int) -> Any:
    """``scheduler``'s timestep ``index`` of the running loop (clamped to the last one)."""
    begin = getattr(scheduler, "begin_index", None) or 0
    return scheduler.timesteps[min(begin + index, len(scheduler.timesteps) - 1)]


def _schedulers(pipeline: Any) -> list[Any]:
    """The schedulers whose ``step`` ends a denoising step: ``pipeline.scheduler`` and any other
    ``*scheduler`` component (a combined pipeline's ``prior_scheduler``)."""
    found = [getattr(pipeline, "scheduler", None)]
    try:
        found += [c for name, c in pipeline.components.items() if name.endswith("scheduler")]
    except Exception:  # not a diffusers pipeline, or one whose modules do not match its signature
        pass
    unique = {id(s): s for s in found if callable(getattr(s, "step", None))}
    return list(unique.values())


def _loaded_whole(err: Exception) -> str:
    """The warning when a denoiser cannot be planned without its weights (Note [value trace])."""
    return (f"the denoiser cannot be planned without its weights ({str(err).splitlines()[0][:300]}); every rank "
            f"holds it whole until the first call has traced it with its weights and released the other stages' "
            f"(Note [value trace]), so the peak memory per rank is the whole denoiser")


def other_denoisers(pipeline: Any, attr: str, denoiser: torch.nn.Module) -> list[str]:
    """Note [several denoisers]: components that are denoisers too but not ``attr``: of the
    denoiser's class (Wan 2.2's ``transformer_2`` takes the low-noise steps; Stable Cascade
    combined's ``prior_prior``), named ``<attr>_<k>``, or named as a combined pipeline names its
    prior's denoiser (``prior_prior``, Kandinsky's)."""
    try:
        components = pipeline.components
    except Exception:  # not a diffusers pipeline, or one whose modules do not match its signature
        return []
    return [name for name, c in components.items() if name != attr and isinstance(c, torch.nn.Module)
            and c is not denoiser and (type(c) is type(denoiser) or name.startswith(f"{attr}_")
                                       or name.removeprefix("prior_") in DENOISER_ATTRS)]


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
_MARKING: dict[type, Callable[..., Any]] = {}


def _marking_step(cls: type) -> Callable[..., Any]:
    """``cls.step`` followed by the running pipeline call's step-end callback, with ``cls.step``'s
    signature (pipelines read it: ``"eta" in inspect.signature(self.scheduler.step).parameters``)."""
    if cls not in _MARKING:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = cls.step(self, *args, **kwargs)
            end_step = _STEP_END.get()
            if end_step is not None:
                end_step()
            return out

        _MARKING[cls] = functools.wraps(cls.step)(step)
    return _MARKING[cls]


@contextlib.contextmanager
def _marking_steps(schedulers: list[Any], end_step: Callable[[], None]) -> Iterator[None]:
    """For the duration of one pipeline call, ``end_step()`` after every ``step`` of one of
    ``schedulers`` (and of a copy of one): the scheduler's step is where a pipeline's denoising
    step ends, whatever its loop looks like. The engine ends a step only once per denoiser call,
    so several schedulers stepping after one call (one per frame) end one step.

    An instance attribute (a bound method), not another class: no object changes its type (Bria
    tests ``type(self.scheduler) != FlowMatchEulerDiscreteScheduler``), and a deep copy of a
    scheduler (SkyReels-V2's diffusion forcing makes one per latent frame) gets the method bound
    to the copy (``copy`` rebinds bound methods), so copies step themselves."""
    for scheduler in schedulers:
        scheduler.step = types.MethodType(_marking_step(type(scheduler)), scheduler)
    token = _STEP_END.set(end_step)
    try:
        yield
    finally:
        _STEP_END.reset(token)
        for scheduler in schedulers:
            scheduler.__dict__.pop("step", None)


def _resetting_subclass(cls: type) -> type:
    """``cls`` with a ``__call__`` that runs under :meth:`AsyncDiff._running`: every engine's state
    resets first, and the engines hear where steps end (Note [branches] in engine/runtime.py)."""
    if cls not in _SUBCLASSES:
        @functools.wraps(cls.__call__)  # keeps the pipeline's signature visible to inspect
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            with self._asyncdiff._running():
                return cls.__call__(self, *args, **kwargs)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]
