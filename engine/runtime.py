"""The engine: runs one stage of a planned denoiser per rank, with stale inputs after warm-up.

:class:`AsyncEngine` stands in for the denoiser's ``forward`` on every rank. Per call (one
denoising step) it runs this rank's stage program, exchanges boundary values point to point
(Note [stale inputs] in :mod:`asyncdiff.engine.schedule`), and broadcasts the final output so
that the pipeline's own loop (scheduler, guidance, decoding) runs unchanged on every rank.

The first call of a new call signature traces the denoiser (Note [specialised trace]); the very
first one also makes the plan: rank 0 profiles the blocks, plans, and broadcasts the plan so
that every rank uses the same cuts. After planning, each rank releases the weights of blocks
that other stages own (:meth:`AsyncEngine.restore_weights` brings them back).

Note [branches]: some pipelines call their denoiser more than once per denoising step, e.g.
classifier-free guidance as two calls (conditional, then unconditional) instead of one batch of
two. Each such call is a *branch*: its stale inputs must come from the same branch of the
previous step, never from the other branch's call just before it (that would mix conditional
and unconditional activations). So every branch has its own :class:`StageState` and its own
channel (tags and receive buffers); the k-th call of a step is branch k. Where a step ends is
told by :meth:`AsyncEngine.end_step` (the ``AsyncDiff`` API calls it after each
``scheduler.step`` of the pipeline); without ``marks_steps`` every call is a step of its own.
A branch that a step skips (guidance only in some steps) keeps its stale values from the last
step it ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff.engine.comm import Pending, StageChannel
from asyncdiff.engine.mesh import (
    ProcessMesh,
    TwoCalls,
    exchange_outputs,
    gather_batch,
    model_option,
    split_batch,
    verify_batch_split,
)
from asyncdiff.engine.schedule import Schedule, StepKind
from asyncdiff.kernels.pack import FP8, PackLayout, pack, unpack
from asyncdiff.partition.auto import COSTS
from asyncdiff.partition.blocks import BlockPolicy
from asyncdiff.partition.cache import cached_plan, device_kind
from asyncdiff.partition.hybrid import ParallelOption, choose_parallel, parallel_degrees, two_calls
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.planner import LAYOUTS, MAX_SLOWDOWN
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.report import LINKS
from asyncdiff.partition.split import SplitDenoiser, StageProgram, split_graph
from asyncdiff.partition.trace import (
    CallSignature,
    TracedDenoiser,
    call_signature,
    meta_copy,
    module_of,
    trace_denoiser,
)
from asyncdiff.partition.verify import verify_split

__all__ = ["TRANSFER_DTYPES", "AsyncEngine", "EngineConfig", "StageError", "StageState", "block_tensors",
           "foreign_tensors", "stages_for"]

TRANSFER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8": FP8}  # wire dtypes by name


def stages_for(devices: int, stride: int, data: int = 1) -> int:
    """How many stages ``devices`` processes run with ``stride`` in each of ``data`` slices (guidance
    x batch, Note [hybrid mesh]): one each for stride 1; for stride 2 the extra process repeats
    the last stage (Note [stride 2]). The inverse of :attr:`EngineConfig.world_size`; the one
    place this arithmetic lives."""
    return devices // data - stride + 1


class StageError(RuntimeError):
    """An error inside the engine, prefixed with where it happened: ``[stage k | step t]``."""


@dataclass(frozen=True)
class EngineConfig:
    """How to split and run a denoiser. Validated here; no side effects.

    ``model_n``: number of stages; ``stride``: denoising steps per parallel round; ``warm_up``:
    sequential steps at the start of every pipeline call; ``policy``: block granularity;
    ``cost``: what the planner balances (``"time"`` measured on rank 0, or ``"flops"``);
    ``bandwidth``: the link the planner's communication term assumes: a preset name of
    :data:`asyncdiff.partition.report.LINKS`, ``"auto"`` (``gloo`` on CPU, ``pcie`` on CUDA), or
    ``None`` to plan for compute only;
    ``layouts``: which plan shapes the planner may choose (``"contiguous"``, ``"wrapped"``);
    ``max_slowdown``: the planner takes the least stale plan whose modelled step is within this
    fraction of the fastest (Note [staleness] in :mod:`asyncdiff.partition.planner`; 0: the fastest);
    ``replan``: plan anew even where the plan cache holds a plan for this call (Note [plan cache]
    in :mod:`asyncdiff.partition.cache`), and overwrite it;
    ``verify``: on the first call, check that the stage programs reproduce the denoiser before
    relying on them (Note [verify] in :mod:`asyncdiff.partition.verify`; about two denoiser calls
    on rank 0), and stop every rank with an error naming the first differing block if not;
    ``transfer_dtype``: send boundary values of asynchronous steps in ``"bfloat16"`` or ``"float16"``
    (half the bytes of float32) or ``"float8"`` (e4m3 with a per-tensor scale: a quarter), at a
    rounding cost; warm-up and refresh steps still send exact values (Note [exact warm-up]);
    ``refresh_every``: run every K-th step after warm-up sequentially again (stride 1);
    ``refresh_drift``: run a step sequentially when the boundary values changed by more than this
    relative amount over the last step (stride 1; Note [adaptive refresh]);
    ``compile``: run this rank's stage programs under ``torch.compile`` (inductor). Each segment
    is compiled on its first call; measured on an H200, an SD 1.5 stage ran 1.7x faster
    (BENCHMARKS.md, GPU check). Compiled kernels round differently from eager ones (float noise);
    ``guidance`` (1 or 2) and ``batch``: slices that each take a share of every denoiser call's
    batch, exactly (Note [hybrid mesh] in :mod:`asyncdiff.engine.mesh`); the world is
    ``guidance * batch * (model_n + stride - 1)`` processes;
    ``parallel="auto"``: choose ``guidance``, ``batch`` and ``model_n`` for the world size at the
    first call (Note [choosing the mesh] in :mod:`asyncdiff.partition.hybrid`); the given ones
    are a placeholder until then.
    """

    model_n: int
    stride: int = 1
    warm_up: int = 1
    time_shift: bool = False
    policy: str | BlockPolicy = "fine"
    cost: str = "time"
    bandwidth: str | None = "auto"
    profile_repeats: int = 3
    timeout_s: float = 300.0
    layouts: tuple[str, ...] = LAYOUTS
    transfer_dtype: str | None = None
    refresh_every: int | None = None
    refresh_drift: float | None = None
    compile: bool = False
    max_slowdown: float = MAX_SLOWDOWN
    replan: bool = False
    verify: bool = True
    guidance: int = 1
    batch: int = 1
    parallel: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_n, int) or self.model_n < 1:
            raise ValueError(f"model_n={self.model_n!r} must be an integer >= 1 (the number of stages)")
        if self.stride not in (1, 2):
            raise ValueError(f"stride={self.stride!r} must be 1 or 2")
        if not isinstance(self.warm_up, int) or self.warm_up < 0:
            raise ValueError(f"warm_up={self.warm_up!r} must be an integer >= 0 (sequential steps per call)")
        if not isinstance(self.time_shift, bool):
            raise ValueError(f"time_shift={self.time_shift!r} must be True or False")
        if self.cost not in COSTS:
            raise ValueError(f"cost={self.cost!r} must be one of {COSTS}")
        if not self.layouts or set(self.layouts) - set(LAYOUTS):
            raise ValueError(f"layouts={self.layouts!r} must be a non-empty subset of {LAYOUTS}")
        if self.bandwidth is not None and self.bandwidth != "auto" and self.bandwidth not in LINKS:
            raise ValueError(f"bandwidth={self.bandwidth!r} must be 'auto', None or a link preset {sorted(LINKS)}")
        if self.transfer_dtype is not None and self.transfer_dtype not in TRANSFER_DTYPES:
            raise ValueError(f"transfer_dtype={self.transfer_dtype!r} must be one of "
                             f"{(None, *TRANSFER_DTYPES)}")
        if self.stride == 2 and "contiguous" not in self.layouts:
            raise ValueError(f"stride=2 runs contiguous plans only (the extra rank repeats the last stage); "
                             f"layouts={self.layouts!r} must include 'contiguous'")
        if self.refresh_drift is not None and (self.refresh_drift < 0 or self.stride != 1):
            raise ValueError(f"refresh_drift={self.refresh_drift!r} must be >= 0, with stride=1 "
                             f"(stride={self.stride}); or None: never")
        if not isinstance(self.max_slowdown, (int, float)) or not self.max_slowdown >= 0:
            raise ValueError(f"max_slowdown={self.max_slowdown!r} must be a number >= 0 (0: the fastest plan)")
        for flag in ("compile", "replan", "verify"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.guidance not in (1, 2):
            raise ValueError(f"guidance={self.guidance!r} must be 1 or 2 (2: the guidance halves of the batch "
                             f"on different slices)")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch={self.batch!r} must be an integer >= 1 (slices the prompt batch is split over)")
        if self.parallel not in (None, "auto"):
            raise ValueError(f"parallel={self.parallel!r} must be None (the degrees as given) or 'auto'")
        if self.profile_repeats < 1:
            raise ValueError(f"profile_repeats={self.profile_repeats} must be >= 1")
        BlockPolicy.parse(self.policy)
        self.schedule(self.warm_up)  # validates refresh_every against stride

    def schedule(self, warm_up: int) -> Schedule:
        return Schedule(self.model_n, warm_up, self.stride, self.time_shift, self.refresh_every)

    def planner_bandwidth(self, device: torch.device) -> float | None:
        """Bytes per cost unit for the planner's communication term on ``device`` (``"auto"``:
        ``pcie`` on CUDA, ``gloo`` on CPU); None where the plan ignores communication."""
        name = self.bandwidth
        if name is None:
            return None
        if name == "auto":
            name = "pcie" if device.type == "cuda" else "gloo"
        return LINKS[name].planner_bandwidth("s" if self.cost == "time" else "flop")

    @property
    def plan_layouts(self) -> tuple[str, ...]:
        return ("contiguous",) if self.stride == 2 else self.layouts

    @property
    def data(self) -> int:
        """Slices the batch of each denoiser call is split over: ``guidance * batch``."""
        return self.guidance * self.batch

    @property
    def stage_world(self) -> int:
        """Processes of one stage engine: ``model_n`` for stride 1, ``model_n + 1`` for stride 2."""
        return self.model_n + self.stride - 1

    @property
    def world_size(self) -> int:
        """Processes this configuration needs: ``guidance * batch * (model_n + stride - 1)``."""
        return self.data * self.stage_world

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size and self.parallel != "auto":
            fix = (f"or use model_n={stages_for(world_size, self.stride, self.data)}"
                   if world_size % self.data == 0 and stages_for(world_size, self.stride, self.data) >= 1
                   else "or parallel='auto'")
            raise ValueError(
                f"world size is {world_size} but guidance={self.guidance} x batch={self.batch} x "
                f"(model_n={self.model_n} + stride={self.stride} - 1) = {self.world_size} processes; "
                f"launch with --nproc_per_node={self.world_size} {fix}"
            )


@dataclass
class StageState:
    """What lives across the steps of one pipeline call, for one branch (Note [branches]);
    :meth:`reset` at every call."""

    stale: dict[str, torch.Tensor] = field(default_factory=dict)  # values received for use at the next step
    pending: Pending | None = None  # an asynchronous step's sends, and receives for the next step
    inflight: list[Pending] = field(default_factory=list)  # a warm-up step's sends
    channel: StageChannel | None = None  # where ``pending`` was posted
    reuse: tuple[Any, ...] = ()  # stride 2: the last stage's round output, the next step's prediction
    previous: dict[str, torch.Tensor] = field(default_factory=dict)  # last step's stale values (adaptive refresh)

    def drain(self) -> None:
        if self.pending is not None and self.channel is not None:
            self.stale = self.channel.wait(self.pending)
        for pending in self.inflight:
            for work in pending.works:
                work.wait()
        self.pending, self.inflight = None, []

    def reset(self) -> None:
        self.stale, self.pending, self.inflight, self.channel, self.reuse, self.previous = {}, None, [], None, (), {}


@dataclass
class _Compiled:
    """Everything this rank needs for one call signature."""

    traced: TracedDenoiser
    split: SplitDenoiser
    program: StageProgram
    modules: list[Callable[..., Any]]  # one per segment of this stage (compiled or not)
    make_channel: Callable[[int], StageChannel]  # the channel of a branch (Note [branches])
    output_layout: PackLayout
    device: torch.device
    channels: list[StageChannel] = field(default_factory=list)

    def channel(self, branch: int) -> StageChannel:
        while len(self.channels) <= branch:
            self.channels.append(self.make_channel(len(self.channels)))
        return self.channels[branch]


class AsyncEngine:
    """Runs this rank's stage of ``denoiser``; call it like the denoiser.

    Example (under ``torchrun --nproc_per_node=2``, see ``examples/``)::

        engine = AsyncEngine(unet, EngineConfig(model_n=2, warm_up=1))
        noise = engine(latents, t, encoder_hidden_states=emb, return_dict=False)[0]
    """

    def __init__(self, denoiser: torch.nn.Module, config: EngineConfig, *, plan: Plan | None = None,
                 latent: str | None = None, timestep_arg: str | None = None, timesteps: Callable[[int], Any] | None = None,
                 marks_steps: bool = False, guided: Callable[[], bool | None] | None = None,
                 released: dict[str, tuple[torch.Size, torch.dtype, torch.device]] | None = None) -> None:
        """``timestep_arg`` names the denoiser's timestep argument and ``timesteps(step)`` gives the
        timestep of any step of the current call; both are needed for stride 2 and time shift.
        ``marks_steps`` (settable per pipeline call): the caller calls :meth:`end_step` after every
        denoising step, and the calls in between are branches with stale state of their own (Note
        [branches]); without it every call is a step. ``released``: weights this rank never loaded
        (Note [stage-only loading] in :mod:`asyncdiff.adapters.loading`), by name: (true shape,
        dtype, device) of 0-size placeholders, which :meth:`restore_weights` fills from their
        owners; the check of Note [verify] needs every weight, so it does not run then.
        ``guided()``: whether the running pipeline call batches classifier-free guidance (None:
        unknown), which ``parallel="auto"`` needs to offer a guidance dimension."""
        self.denoiser, self.config, self.plan, self.latent = denoiser, config, plan, latent
        if (config.stride == 2 or config.time_shift) and (timestep_arg is None or timesteps is None):
            raise ValueError("stride=2 and time_shift=True feed stages other steps' timesteps: pass "
                             "timestep_arg and timesteps (AsyncDiff does this from the pipeline's scheduler)")
        self.timestep_arg, self.timesteps = timestep_arg, timesteps
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.global_rank = dist.get_rank() if self.distributed else 0
        config.check_world_size(self.world)
        if plan is not None and plan.n_stages != config.model_n and config.parallel is None:
            raise ValueError(f"plan has {plan.n_stages} stages but model_n={config.model_n}; "
                             "pass a plan with model_n stages")
        self.guided = guided
        self.parallel_options: list[ParallelOption] = []  # what parallel="auto" chose from
        timeout = datetime.timedelta(seconds=config.timeout_s)
        # Rank 0's decisions (plan, verification, the mesh) reach every rank on their own group.
        self.decisions = dist.new_group(list(range(self.world)), timeout=timeout) if self.world > 1 else None
        self._setup(config if config.parallel is None else self._placeholder(config))
        self._split_checked: set[CallSignature] = set()  # call signatures whose batch split is verified
        self._released: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = dict(released or {})
        self.skeleton = meta_copy(denoiser, {name: shape for name, (shape, _, _) in self._released.items()})
        self.marks_steps = marks_steps
        self.step = 0  # the denoising step of the running pipeline call
        self.branch = 0  # which call of the running step comes next (Note [branches])
        self.branches: list[StageState] = [StageState()]
        self.two_calls = TwoCalls()  # Note [two-call guidance]
        self.seconds: list[tuple[str, float]] = []  # (step kind, wall time) per call, this pipeline call
        self._calls = 0  # pipeline calls so far (reset_state), to key errors by (Note [first error])
        self._compiled: dict[CallSignature, _Compiled] = {}
        self.compile_seconds = 0.0  # tracing, profiling, planning and splitting, all signatures
        self.plan_source = "given" if plan is not None else ""  # where the plan came from (Note [plan cache])

    def _setup(self, config: EngineConfig) -> None:
        """Take ``config``'s degrees: this rank's slice, stage and groups (Note [hybrid mesh])."""
        self.config = config
        self.mesh: ProcessMesh | None = None
        if config.data > 1:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
            self.mesh = ProcessMesh(config.guidance, config.batch, config.stage_world, device_type, config.timeout_s)
            self.ranks, self.group, self.collective = self.mesh.stage_ranks, self.mesh.stage_group, \
                self.mesh.stage_collective
        else:
            self.ranks, self.group, self.collective = list(range(self.world)), None, self.decisions
        self.rank = self.ranks.index(self.global_rank)  # this rank's place in its slice
        self.stage = min(self.rank, config.model_n - 1)  # stride 2: the extra rank repeats the last stage
        self.schedule = config.schedule(config.warm_up)

    @staticmethod
    def _placeholder(config: EngineConfig) -> EngineConfig:
        """Until ``parallel="auto"`` has chosen (at the first call): nothing runs in parallel yet."""
        return dataclasses.replace(config, model_n=1, stride=1, guidance=1, batch=1)

    # -- per call ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One denoiser call: this slice's share of the batch through its stages (Note [hybrid
        mesh]), or this slice's guidance branch (Note [two-call guidance])."""
        if self.config.parallel == "auto" and not self.parallel_options:
            with self._where(self.step):
                self._choose_parallel(args, kwargs)
        if self.config.data == 1:
            return self._call_stages(args, kwargs)
        step, parts = self.step, self.config.data
        with self._where(step):
            n = self._batch_size(args, kwargs)
            if n % parts and self.config.guidance == 2 and self.config.batch == 1 and self.marks_steps:
                return self._call_branch(args, kwargs)
            self._check_split(n, args, kwargs)
            assert self.mesh is not None
            index = self.mesh.data_index
            args, kwargs = split_batch(args, n, parts, index), split_batch(kwargs, n, parts, index)
        output = self._call_stages(args, kwargs)
        with self._where(step):
            return gather_batch(output, n // parts, self.mesh.data_group, parts)

    def _call_branch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Note [two-call guidance]: this slice runs its own branch of the step; at the first call
        of a step the second slice runs its branch's predicted call; one all-gather shares both."""
        assert self.mesh is not None
        branch, mine, calls = self.branch, self.mesh.data_index, self.two_calls
        self.branch += 1
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if branch > 1:
            raise ValueError("guidance=2 runs the two guidance calls of a step on two slices, but this pipeline "
                             "calls its denoiser more than twice per step; use guidance=1")
        if branch == 0:
            if self.step > 0 and not calls.learned:  # no second call in the first step: no guidance
                n = self._batch_size(args, kwargs)
                self._check_split(n, args, kwargs)
            calls.first = leaves
            predicted = calls.predict(leaves, spec)
            if predicted is None:  # the first step: learn what the second call changes
                calls.pending = None
                return self._call_stages(args, kwargs, branch=0 if mine == 0 else 1)
            own = (args, kwargs) if mine == 0 else predicted
            output = self._call_stages(*own, branch=0)
            both = exchange_outputs(output, self.mesh.data_group, 2)
            calls.pending = both[1]
            return both[0]
        try:
            if calls.pending is not None and calls.held(leaves):
                return calls.pending
            if calls.pending is not None and self.config.model_n > 1:
                raise ValueError("guidance=2 with stages predicts a step's second guidance call from its first "
                                 "and the last step's second (Note [two-call guidance]), but this pipeline's second "
                                 "call differed; use guidance=1")
            # the first step, or a prediction that failed: both slices run it (stateless: one stage)
            return self._call_stages(args, kwargs, branch=0 if mine == 1 else 1)
        finally:
            calls.learn(leaves, spec)

    def _call_stages(self, args: tuple[Any, ...], kwargs: dict[str, Any], branch: int | None = None) -> Any:
        """This rank's stage of one call (Note [stale inputs]); ``branch``: whose stale state it
        uses (Note [branches]), by default the running call's."""
        counted = branch is None  # a call of the pipeline's own sequence (else _call_branch counts)
        step, branch = self.step, self.branch if branch is None else branch
        start = time.perf_counter()
        with self._where(step):
            compiled = self._compile(args, kwargs)
            while len(self.branches) <= branch:
                self.branches.append(StageState())
            state = self.branches[branch]
            state.drain()  # the previous step's sends, an asynchronous step's receives
            state.channel = compiled.channel(branch)
            kind = self.schedule.kind(step)
            if self.config.refresh_drift is not None and self._drifted(state, compiled, decide=kind == StepKind.ASYNC):
                kind = StepKind.REFRESH
            shifted = self.schedule.timestep_step(step, self.rank)
            if shifted != step:
                args, kwargs = self._with_timestep(args, kwargs, shifted)
            tensors = compiled.traced.flatten_call(args, kwargs)
            leaves = self._run_stage(compiled, state, tensors, kind)
            if self.config.model_n == 1:
                output = compiled.traced.unflatten_output(list(leaves))
            else:
                output = self._share_output(compiled, leaves, self._output_rank(compiled, kind))
        self.seconds.append((kind, time.perf_counter() - start))
        if not counted:
            pass
        elif self.marks_steps:
            self.branch += 1
        else:
            self.step += 1
        return output

    def end_step(self) -> None:
        """The pipeline finished a denoising step (``marks_steps``): the next call starts the next one."""
        self.step, self.branch = self.step + 1, 0

    @property
    def state(self) -> StageState:
        """The first branch's state (the only one for pipelines that batch their guidance)."""
        return self.branches[0]

    def predicted_step_seconds(self, bytes_per_s: float) -> float | None:
        """The step-time model for an asynchronous step: the slowest stage's profiled time plus the
        bytes it receives, plus the final output's broadcast, over ``bytes_per_s``. Needs a plan
        made with ``cost="time"`` (None otherwise)."""
        if self.plan is None or self.plan.cost_unit != "s" or not self._compiled:
            return None
        compiled = next(reversed(self._compiled.values()))
        recv = [sum(t.spec.nbytes for t in compiled.split.transfers if t.dst == k) for k in range(self.plan.n_stages)]
        stage = max(cost + nbytes / bytes_per_s for cost, nbytes in zip(self.plan.costs, recv))
        return stage + compiled.output_layout.nbytes / bytes_per_s

    def _output_rank(self, compiled: _Compiled, kind: str) -> int:
        if kind == StepKind.ROUND:
            return self.ranks[-1]  # the extra rank: this step's prediction (Note [stride 2])
        return self.ranks[compiled.split.output_stage]

    def _with_timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any], step: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self.timesteps is not None and self.timestep_arg is not None
        bound = inspect.signature(self.denoiser.forward).bind(*args, **kwargs)
        current = bound.arguments[self.timestep_arg]
        value = self.timesteps(step)
        if isinstance(current, torch.Tensor):  # no float(value): that would wait for the GPU
            value = torch.as_tensor(value).to(current.device, current.dtype, non_blocking=True) \
                .expand(current.shape).clone()
        bound.arguments[self.timestep_arg] = value
        return bound.args, bound.kwargs

    def _run_stage(self, compiled: _Compiled, state: StageState, tensors: list[torch.Tensor],
                   kind: str) -> tuple[Any, ...]:
        """This rank's segments for one step (Note [stale inputs] and [stride 2] in schedule.py).

        Warm-up: before each segment, wait for this step's values from other stages; after it,
        send. Asynchronous step or round: run every segment on the values received for it during
        the previous computing step, then send this step's values and post the receives for the
        next one. Reuse step (stride 2): nothing runs.
        """
        channel, split = state.channel, compiled.split
        assert channel is not None
        if kind == StepKind.REUSE:
            return state.reuse
        sync = kind in (StepKind.WARM_UP, StepKind.REFRESH)
        if sync and self.rank >= self.config.model_n:  # the extra rank only collects its first inputs
            state.stale = channel.wait(channel.post({}, [], channel.recv_keys, exact=True))
            return ()
        env: dict[str, torch.Tensor] = {}
        received: dict[str, torch.Tensor] = {}
        leaves: tuple[Any, ...] = ()
        for seg, module in zip(compiled.program.segments, compiled.modules):
            if sync and channel.recvs_into(seg.index):
                received.update(channel.wait(channel.post({}, [], channel.recvs_into(seg.index), exact=True)))
            fresh = {**received, **env} if sync else {**state.stale, **env}
            outputs, seg_leaves = module(*tensors, *[fresh[v] for v in seg.inputs])
            env.update(zip(seg.outputs, outputs))
            if seg.index == split.output_segment:
                leaves = seg_leaves
            if sync and channel.sends_from(seg.index):
                state.inflight.append(channel.post(env, channel.sends_from(seg.index), [], exact=True))
        if sync:
            state.stale = received  # what the first asynchronous step after warm-up consumes
        elif channel.send_groups or channel.recv_groups:
            state.pending = channel.post(env, list(channel.send_groups), channel.recv_keys)
        if kind == StepKind.ROUND:
            state.reuse = leaves
        return leaves

    def _drifted(self, state: StageState, compiled: _Compiled, decide: bool) -> bool:
        """Note [adaptive refresh]: whether the boundary values changed, over the last step, by more
        than ``refresh_drift`` (relative L2 norm, the largest over all values and ranks). Stale
        inputs are one step old, so this is how wrong they are about to be. All ranks take the
        same decision (an all-reduce of one number), as a sequential step needs every rank. Every
        step keeps a copy of the values it received; only ``decide`` steps compare and reduce."""
        previous = state.previous
        state.previous = {name: value.clone() for name, value in state.stale.items()}  # receive buffers get reused
        if not decide:
            return False
        drift = 0.0
        for name, value in state.stale.items():
            if name in previous:
                before = previous[name].float()
                drift = max(drift, ((value.float() - before).norm() / before.norm().clamp_min(1e-12)).item())
        if self.collective is not None:
            flag = torch.tensor([drift], dtype=torch.float64, device=compiled.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.collective)
            drift = flag.item()
        return drift > self.config.refresh_drift

    def _share_output(self, compiled: _Compiled, leaves: tuple[Any, ...], owner: int) -> Any:
        template = _output_template(compiled.traced)
        mine = self.global_rank == owner
        if mine:
            buffer = pack([x for x in leaves if isinstance(x, torch.Tensor)], compiled.output_layout)
        else:
            buffer = torch.empty(compiled.output_layout.nbytes, dtype=torch.uint8, device=compiled.device)
        dist.broadcast(buffer, src=owner, group=self.collective)
        if mine:
            return compiled.traced.unflatten_output(list(leaves))
        received = iter(unpack(buffer, compiled.output_layout))
        return compiled.traced.unflatten_output(
            [next(received) if isinstance(x, torch.fx.Node) else x for x in template])

    def drain(self) -> None:
        """Wait for the transfers still in flight (the last step's sends): before the process
        group goes away, or a new call starts."""
        for state in self.branches:
            state.drain()

    def reset_state(self, warm_up: int | None = None) -> None:
        """Start a new pipeline call (optionally with a new ``warm_up``); drains pending transfers."""
        if warm_up is not None:
            self.schedule = self.config.schedule(_check_warm_up(warm_up))
        self.drain()
        self.branches = [StageState()]
        self.two_calls = TwoCalls()
        self.step, self.branch, self.seconds = 0, 0, []
        self._calls += 1

    # -- guidance and batch slices (Note [hybrid mesh]) ---------------------------------------
    def _batch_size(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """The first dimension of the latent argument (or of the first tensor argument)."""
        bound = inspect.signature(type(self.denoiser).forward).bind(None, *args, **kwargs).arguments
        latent = bound.get(self.latent) if self.latent else None
        if not isinstance(latent, torch.Tensor):
            latent = next((x for x in pytree.tree_leaves(list(bound.values())) if isinstance(x, torch.Tensor)), None)
        if latent is None or latent.dim() == 0:
            raise ValueError(f"{type(self.denoiser).__name__} was called without a batched tensor; guidance/batch "
                             f"parallelism needs one: use guidance=1, batch=1")
        return latent.shape[0]

    def _check_split(self, n: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """That this call's batch ``n`` splits evenly over the slices; the first call of each call
        signature also checks that splitting it is exact (Note [batch split])."""
        config = self.config
        if n % config.data:
            need = []
            if config.guidance > 1:
                need.append("guidance=2 needs a pipeline with classifier-free guidance (guidance_scale > 1), "
                            "batched into one denoiser call or made as two calls per step"
                            + (" (with batch=1)" if config.batch > 1 else ""))
            if config.batch > 1:
                need.append(f"batch={config.batch} needs a number of prompts x images per prompt divisible by "
                            f"{config.batch}")
            raise ValueError(f"this denoiser call's batch is {n}, which guidance={config.guidance} x "
                             f"batch={config.batch} = {config.data} slices cannot split evenly: {'; '.join(need)}; "
                             f"use parallel='auto' or fewer slices")
        signature, _ = call_signature(self.denoiser, args, kwargs)
        if config.verify and not self._released and signature not in self._split_checked:
            start = time.perf_counter()
            error = self._from_rank0(lambda: verify_batch_split(self.denoiser, args, kwargs, n, config.data))
            self.compile_seconds += time.perf_counter() - start
            if error is not None:
                raise ValueError(error)
        self._split_checked.add(signature)

    def _choose_parallel(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """``parallel="auto"``: rank 0 models every way to use the world's processes for this call
        and picks one (Note [choosing the mesh]); every rank then takes it."""
        start = time.perf_counter()
        n = self._batch_size(args, kwargs)
        guided = self.guided() if self.guided is not None else None
        degrees = parallel_degrees(self.world, self.config.stride, n, guided)
        config = self.config

        profiles: dict[int, Any] = {}

        def model() -> list[ParallelOption]:
            tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            bandwidth = config.planner_bandwidth(_device_of(tensors))
            return [model_option(self.denoiser, args, kwargs, d, n, policy=config.policy, latent=self.latent,
                                 skeleton=self.skeleton, cost=config.cost, bandwidth=bandwidth,
                                 layouts=config.plan_layouts, max_slowdown=config.max_slowdown,
                                 repeats=config.profile_repeats, profiles=profiles,
                                 two_calls=two_calls(n, guided)) for d in degrees]

        self.parallel_options = self._from_rank0(model)
        chosen = choose_parallel(self.parallel_options, self.config.max_slowdown)
        if chosen.plan is not None:
            self.plan, self.plan_source = Plan.from_json(chosen.plan), "measured now (parallel='auto')"
        self._setup(dataclasses.replace(self.config, model_n=chosen.stages, guidance=chosen.guidance,
                                        batch=chosen.batch))
        self.compile_seconds += time.perf_counter() - start

    # -- planning ---------------------------------------------------------------------------
    def _compile(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Compiled:
        signature, _ = call_signature(self.denoiser, args, kwargs)
        compiled = self._compiled.get(signature)
        if compiled is not None:
            return compiled
        start = time.perf_counter()
        traced = trace_denoiser(self.denoiser, args, kwargs, policy=self.config.policy, latent=self.latent,
                                skeleton=self.skeleton)
        if self.plan is None:
            self.plan = self._make_plan(traced, args, kwargs)
        split = split_graph(traced, self.plan)
        if self.config.verify and not self._released:  # every weight is still here (Note [verify])
            self._verify(traced, split, args, kwargs)
        program = split.stages[self.stage]
        modules = [seg.module(self.denoiser) for seg in program.segments]
        self._release_foreign_weights(modules)
        if self.config.compile:  # after the release: compiled code must not capture released weights
            modules = [torch.compile(m) for m in modules]
        device = _device_of(traced.flatten_call(args, kwargs))
        out_specs = [traced.specs[n.name] for n in _output_template(traced) if isinstance(n, torch.fx.Node)]
        destinations = {k: [self.ranks[k]] for k in range(self.config.model_n)}
        if self.config.stride == 2:  # the extra rank receives what the last stage receives
            destinations[self.config.model_n - 1].append(self.ranks[-1])
        transfer_dtype = TRANSFER_DTYPES.get(self.config.transfer_dtype)
        compiled = _Compiled(traced, split, program, modules,
                             lambda branch: StageChannel(program, len(split.segments), destinations, self.group,
                                                         device, transfer_dtype, branch=branch),
                             PackLayout.of([(s.shape, s.torch_dtype) for s in out_specs]), device)
        self._compiled[signature] = compiled
        self.compile_seconds += time.perf_counter() - start
        return compiled

    def _from_rank0(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, its result on every rank; a ``ValueError`` it raises is raised
        on every rank, with the same message."""
        result, error = None, None
        if self.global_rank == 0:
            try:
                result = compute()
            except ValueError as err:
                error = str(err)
        if self.decisions is not None:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0, group=self.decisions)
            result, error = box[0]
        if error is not None:
            raise ValueError(error)
        return result

    def _make_plan(self, traced: TracedDenoiser, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
        """Rank 0 plans (or reads the plan cache); every rank gets the same plan, or the same error."""
        text, self.plan_source = self._from_rank0(lambda: self._plan_on_this_rank(traced, args, kwargs))
        return Plan.from_json(text)

    def _plan_on_this_rank(self, traced: TracedDenoiser, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        """(plan JSON, where it came from): the cached plan of this call and options, or a new one."""
        config = self.config
        device = _device_of(traced.flatten_call(args, kwargs))
        plan, source = cached_plan(
            traced, config.model_n,
            lambda: profile_blocks(traced, self.denoiser, args, kwargs, repeats=config.profile_repeats,
                                   measure_time=config.cost == "time"),
            cost=config.cost, bandwidth=config.planner_bandwidth(device), layouts=config.plan_layouts,
            max_slowdown=config.max_slowdown, device=device_kind(device), replan=config.replan)
        return plan.to_json(), source

    def _verify(self, traced: TracedDenoiser, split: SplitDenoiser, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> None:
        """Rank 0 checks the split against the denoiser; every rank raises the same error if it fails."""
        error = self._from_rank0(lambda: verify_split(traced, split, self.denoiser, args, kwargs))
        if error is not None:
            raise ValueError(error)

    # -- weights ----------------------------------------------------------------------------
    def _release_foreign_weights(self, modules: list[torch.fx.GraphModule]) -> None:
        """Free parameters and buffers of blocks other stages own (kept: anything ``modules`` use)."""
        assert self.plan is not None
        for name, t in foreign_tensors(self.denoiser, self.plan, self.stage, modules):
            if name not in self._released:
                self._released[name] = (t.shape, t.dtype, t.device)
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    @property
    def bytes_sent_per_step(self) -> int:
        """Point-to-point bytes this rank sends per step (boundary values only)."""
        return max((c.channel(0).bytes_sent_per_step for c in self._compiled.values()), default=0)

    @property
    def released_weights(self) -> list[str]:
        return sorted(self._released)

    def restore_weights(self) -> None:
        """Bring back released weights from the ranks that own them (collective: all ranks call it)."""
        if self.plan is None or self.collective is None:
            return
        for k, stage in enumerate(self.plan.stages):
            for block in stage:
                for name, t in block_tensors(self.denoiser, block):
                    if name in self._released:
                        shape, dtype, device = self._released.pop(name)
                        t.data = torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(t.data, src=self.ranks[k], group=self.collective)

    # -- helpers ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _where(self, step: int) -> Iterator[None]:
        try:
            yield
        except StageError:
            raise
        except Exception as err:
            raise StageError(self._with_first_error(f"[stage {self.stage} | step {step}] {type(err).__name__}: {err}")) \
                from err

    def _with_first_error(self, mine: str) -> str:
        """Note [first error]: when a stage fails, its peers fail too, with a lost connection, and
        the launcher may report either. So every failing rank records its error in the process
        group's store unless one is there already, and reports that first one beside its own.
        The stage that really failed records first: its peers only notice once it has gone."""
        store = _default_store()
        if store is None:
            return mine
        try:
            first = store.compare_set(f"asyncdiff/first_error/{self._calls}", "", mine).decode()
        except Exception:  # the store left with the rank that hosted it
            return mine
        same = first.split("] ", 1)[-1] == mine.split("] ", 1)[-1]  # one error all ranks raise (a broadcast one)
        return mine if first == mine or same else f"{mine}; the first failure was {first}"


def _default_store() -> dist.Store | None:
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _check_warm_up(warm_up: int) -> int:
    if not isinstance(warm_up, int) or warm_up < 0:
        raise ValueError(f"warm_up={warm_up!r} must be an integer >= 0 (sequential steps per call)")
    return warm_up


def _output_template(traced: TracedDenoiser) -> tuple[Any, ...]:
    output = next(n for n in traced.graph.nodes if n.op == "output")
    return tuple(output.args[0])


def foreign_tensors(denoiser: torch.nn.Module, plan: Plan, stage: int,
                    modules: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and buffers of other stages' blocks that none of ``modules`` (this stage's
    programs) uses: what a rank releases, or never loads (Note [stage-only loading])."""
    keep = {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}
    for k, blocks in enumerate(plan.stages):
        if k != stage:
            for block in blocks:
                for name, t in block_tensors(denoiser, block):
                    if id(t) not in keep:
                        yield name, t


def block_tensors(denoiser: torch.nn.Module, block: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(qualified name, tensor)`` of every parameter and buffer of ``block``'s module."""
    module = denoiser.get_submodule(module_of(block))
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        yield f"{module_of(block)}.{name}", t


def _device_of(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


