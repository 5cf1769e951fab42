"""The engine: runs one stage of a planned denoiser per rank, with stale inputs after warm-up.

:class:`AsyncEngine` stands in for the denoiser's ``forward`` on every rank. Per call (one
denoising step) it runs this rank's stage program, exchanges boundary values point to point
(Note [stale inputs] in :mod:`asyncdiff.engine.schedule`), and broadcasts the final output so
that the pipeline's own loop (scheduler, guidance, decoding) runs unchanged on every rank.

The first call of a new call signature traces the denoiser (Note [specialised trace]); the very
first one also makes the plan: rank 0 profiles the blocks, plans, and broadcasts the plan so
that every rank uses the same cuts (``planning.py``). After planning, each rank releases the
weights of blocks that other stages own (:meth:`AsyncEngine.restore_weights` brings them back).
Each call then runs the step's program from the schedule (Note [schedule as program]).

The engine's other rooms: ``config.py`` (:class:`EngineConfig`, the device arithmetic),
``planning.py`` (the first call's decisions, taken on rank 0 for every rank), ``stage.py`` (one
stage's state and executing one step's program), ``weights.py`` (release and restore),
``errors.py`` (``[rank r | stage k | step t]`` errors, Note [first error]), ``mesh.py`` (guidance and
batch slices, Note [hybrid mesh]), ``schedule.py`` and ``comm.py``.

Note [branches]: some pipelines call their denoiser more than once per denoising step, e.g.
classifier-free guidance as two calls (conditional, then unconditional) instead of one batch of
two. Each such call is a *branch*: its stale inputs must come from the same branch of the
previous step, never from the other branch's call just before it (that would mix conditional
and unconditional activations). So every branch has its own :class:`StageState` and its own
channel (tags and receive buffers). A pipeline that names its calls (diffusers'
``cache_context("cond" | "uncond")``, heard by the hook in ``adapters/hooks.py``) gets a branch
per name, in order of first appearance; otherwise the k-th call of a step is branch k. Where a step ends is
told by :meth:`AsyncEngine.end_step` (the ``AsyncDiff`` API calls it after each
``scheduler.step`` of the pipeline); without ``marks_steps`` every call is a step of its own.
A branch that a step skips (guidance only in some steps) keeps its stale values from the last
step it ran.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff.engine.comm import StageChannel, output_template
from asyncdiff.engine.compensation import spacing_at
from asyncdiff.engine.config import TRANSFER_DTYPES, EngineConfig, WarmUp, relative_warm_up, stages_for, warm_up_steps
from asyncdiff.engine.errors import StageError, announce, located
from asyncdiff.engine.mesh import ProcessMesh, TwoCalls, batch_size, exchange_outputs, gather_batch, split_batch
from asyncdiff.engine.planning import Planning, device_of
from asyncdiff.engine.record import Recorder, read_checksums, step_entry
from asyncdiff.engine.refresh import PredictedRefresh
from asyncdiff.engine.schedule import Layout, Signals, StepDecision, StepKind, decide_step, needs_drift
from asyncdiff.engine.stage import CompiledCall, StageState, boundary_drift, run_stage, with_timestep
from asyncdiff.engine.weights import block_tensors, foreign_tensors, release_foreign, reload, restore
from asyncdiff.kernels.pack import PackLayout
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.traced import call_signature
from asyncdiff.partition.verify import fresh as fresh_copy

# EngineConfig, StageError, StageState and the weight helpers are re-exported: they were defined here.
__all__ = ["TRANSFER_DTYPES", "AsyncEngine", "EngineConfig", "StageError", "StageState", "block_tensors",
           "foreign_tensors", "stages_for"]

log = logging.getLogger(__name__)

MAX_SIGNATURES = 16  # compiled call signatures an engine keeps (least recently used first to go)

_ENGINES = itertools.count()


@dataclasses.dataclass
class CallState:
    """Where the running pipeline call is; a new one at every call (:meth:`AsyncEngine.reset_state`)."""

    step: int = 0  # the denoising step of this loop
    branch: int = 0  # which call of the running step comes next (Note [branches])
    branches: list[StageState] = dataclasses.field(default_factory=lambda: [StageState()])
    two_calls: TwoCalls = dataclasses.field(default_factory=TwoCalls)  # Note [two-call guidance]
    loop: CompiledCall | None = None  # the compiled call of this loop's first calls (Note [a second loop])
    branch_names: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> branch, in order of first use
    branch_log: list[int] = dataclasses.field(default_factory=list)  # the branch of every denoiser call
    calls_at_step_end: int = 0  # len(branch_log) when the last step ended
    seconds: list[tuple[StepKind, float]] = dataclasses.field(default_factory=list)  # (step kind, wall time) per call
    decisions: list[StepDecision] = dataclasses.field(default_factory=list)  # per call (Note [step decision])

    def drain(self) -> None:
        """Wait for the transfers still in flight (the last step's sends)."""
        for state in self.branches:
            state.drain()


class AsyncEngine:
    """Runs this rank's stage of ``denoiser``; call it like the denoiser.

    Example (under ``torchrun --nproc_per_node=2``, see ``examples/``)::

        engine = AsyncEngine(unet, EngineConfig(model_n=2, warm_up=1))
        noise = engine(latents, t, encoder_hidden_states=emb, return_dict=False)[0]
    """

    def __init__(self, denoiser: torch.nn.Module, config: EngineConfig, *, plan: Plan | None = None,
                 latent: str | None = None, timestep_arg: str | None = None, timesteps: Callable[[int], Any] | None = None,
                 marks_steps: bool = False, guided: Callable[[], bool | None] | None = None,
                 released: dict[str, tuple[torch.Size, torch.dtype, torch.device]] | None = None,
                 weights_from: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                 loop_steps: Callable[[], int | None] | None = None) -> None:
        """``timestep_arg`` names the denoiser's timestep argument and ``timesteps(step)`` gives the
        timestep of any step of the current call; both are needed for stride 2 and time shift.
        ``marks_steps`` (settable per pipeline call): the caller calls :meth:`end_step` after every
        denoising step, and the calls in between are branches with stale state of their own (Note
        [branches]); without it every call is a step. ``released``: weights this rank never loaded
        (Note [stage-only loading] in :mod:`asyncdiff.adapters.loading`), by name: (true shape,
        dtype, device) of 0-size placeholders, which :meth:`restore_weights` fills from their
        owners, or from ``weights_from(names)`` where it reads them (the checkpoint, Note [reload
        from the checkpoint]); the check of Note [verify] then runs streamed (Note [verify on
        stage-only loads]).
        ``guided()``: whether the running pipeline call batches classifier-free guidance (None:
        unknown), which ``parallel="auto"`` needs to offer a guidance dimension. ``loop_steps()``:
        the steps of the denoising loop that begins (None: unknown), for a relative ``warm_up``."""
        self.denoiser, self.config, self.latent = denoiser, config, latent
        if (config.stride == 2 or config.time_shift) and (timestep_arg is None or timesteps is None):
            raise ValueError("stride=2 and time_shift=True feed stages other steps' timesteps: pass "
                             "timestep_arg and timesteps (AsyncDiff does this from the pipeline's scheduler)")
        self.timestep_arg, self.timesteps, self.loop_steps = timestep_arg, timesteps, loop_steps
        self.warm_up = relative_warm_up(config.warm_up, loop_steps)  # Note [relative warm-up]
        distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if distributed else 1
        self.global_rank = dist.get_rank() if distributed else 0
        config.check_world_size(self.world)
        if plan is not None and plan.model_n != config.model_n and config.parallel is None:
            raise ValueError(f"plan has {plan.model_n} stages but model_n={config.model_n}; "
                             "pass a plan with model_n stages")
        self.guided = guided
        self._released: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = dict(released or {})
        self._weights_from = weights_from
        self.planning = Planning(denoiser, plan=plan, latent=latent, released=self._released,
                                 stage_only=released is not None, world=self.world,
                                 global_rank=self.global_rank, timeout_s=config.timeout_s)
        self._setup(config if config.parallel is None else self._placeholder(config))
        self.marks_steps = marks_steps
        self.branch_name: str | None = None  # the pipeline's name for the running call, if it gives one
        self.call = CallState()
        self._calls = 0  # pipeline calls so far (reset_state), to key errors by (Note [first error])
        self.recorder: Recorder | None = None  # Note [run records]
        self._engine = next(_ENGINES)  # engines made in this process; every rank makes them in one order
        self._step_seconds: list[float] = []  # step times, all calls (Note [deadlines])
        self._compiled: collections.OrderedDict[Any, CompiledCall] = collections.OrderedDict()  # LRU, MAX_SIGNATURES
        self._deferred_release: list[torch.nn.Module] | None = None  # Note [value trace]: until step 1

    # what the first calls decided (Note [plan cache], Note [choosing the mesh]), and what it cost
    plan = property(lambda self: self.planning.plan)
    plan_source = property(lambda self: self.planning.plan_source)
    parallel_options = property(lambda self: self.planning.parallel_options)
    compile_seconds = property(lambda self: self.planning.compile_seconds)
    # this pipeline call so far: its step, and (step kind, wall time) of every stage run
    step = property(lambda self: self.call.step)
    seconds = property(lambda self: self.call.seconds)

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
            self.ranks, self.group, self.collective = list(range(self.world)), None, self.planning.decisions
        self.rank = self.ranks.index(self.global_rank)  # this rank's place in its slice
        self.stage = min(self.rank, config.model_n - 1)  # stride 2: the extra rank repeats the last stage
        self.schedule = config.schedule(warm_up_steps(self.warm_up, None))
        self.refresh = PredictedRefresh(config.refresh_error) if config.refresh_error is not None else None

    @staticmethod
    def _placeholder(config: EngineConfig) -> EngineConfig:
        """Until ``parallel="auto"`` has chosen (at the first call): nothing runs in parallel yet."""
        return dataclasses.replace(config, model_n=1, stride=1, guidance=1, batch=1)

    # -- per call ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One denoiser call: this slice's share of the batch through its stages (Note [hybrid
        mesh]), or this slice's guidance branch (Note [two-call guidance])."""
        call = self.call
        if self.branch_name is not None and self.marks_steps:  # Note [branches]: the pipeline names it
            call.branch = call.branch_names.setdefault(self.branch_name, len(call.branch_names))
        call.branch_log.append(call.branch)
        if self.config.parallel == "auto" and not self.parallel_options:
            with self._where(call.step):
                n, guided = self._batch_size(args, kwargs), self.guided() if self.guided is not None else None
                chosen = self.planning.choose_parallel(self.config, self.world, n, guided, args, kwargs)
                self._setup(dataclasses.replace(self.config, model_n=chosen.stages, guidance=chosen.guidance,
                                                batch=chosen.batch))
        if self.config.data == 1:
            return self._call_stages(args, kwargs)
        step, parts = call.step, self.config.data
        with self._where(step):
            n = self._batch_size(args, kwargs)
            if n % parts and self.config.guidance == 2 and self.config.batch == 1 and self.marks_steps:
                return self._call_branch(args, kwargs)
            self.planning.check_split(self.config, n, args, kwargs)
            whole = None  # the whole batch's inputs, for Note [batch split] on a stage-only load
            if self.planning.stage_only and self.config.verify and self.planning.split_unchecked(args, kwargs):
                whole = (fresh_copy(args), fresh_copy(kwargs))
            assert self.mesh is not None
            index = self.mesh.data_index
            args, kwargs = split_batch(args, n, parts, index), split_batch(kwargs, n, parts, index)
        output = self._call_stages(args, kwargs)
        with self._where(step):
            output = gather_batch(output, n // parts, self.mesh.data_group, parts)
            if whole is not None and self.call.seconds[-1][0].synchronous:  # Note [batch split], streamed
                self.planning.check_split_streamed(self.config, whole, output, n, self.mesh.data_index == 0,
                                                   self.ranks, self.group, self.collective)
            return output

    def _call_branch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Note [two-call guidance]: this slice runs its own branch of the step; at the first call
        of a step the second slice runs its branch's predicted call; one all-gather shares both."""
        assert self.mesh is not None
        branch, mine, calls = self.call.branch, self.mesh.data_index, self.call.two_calls
        self.call.branch += 1
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if branch > 1:
            raise ValueError("guidance=2 runs the two guidance calls of a step on two slices, but this pipeline "
                             "calls its denoiser more than twice per step; use guidance=1")
        if branch == 0:
            if self.call.step > 0 and not calls.learned:  # no second call in the first step: no guidance
                self.planning.check_split(self.config, self._batch_size(args, kwargs), args, kwargs)
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
        call = self.call
        counted = branch is None  # a call of the pipeline's own sequence (else _call_branch counts)
        step, branch = call.step, call.branch if branch is None else branch
        start = time.perf_counter()
        with self._where(step):
            if step > 0 and self._deferred_release is not None:  # Note [value trace]: every branch traced
                self._release(self._deferred_release)
                self._deferred_release = None
            compiled = self._compile(args, kwargs, branch)
            new_loop = branch == 0 and step > 0 and compiled is not call.loop  # Note [a second loop]
            if new_loop:
                self._new_loop()
            if branch == 0:
                call.loop = compiled
            if (step == 0 or new_loop) and branch == 0 and not isinstance(self.warm_up, int):
                self.schedule = self.config.schedule(warm_up_steps(self.warm_up, self.loop_steps()))
            while len(call.branches) <= branch:
                call.branches.append(StageState())
            state = call.branches[branch]
            state.drain()  # the previous step's sends, an asynchronous step's receives
            if self.planning.pilot is not None:  # Note [measured plan choice]
                compiled = self.planning.pilot.step(self, compiled, state, args, kwargs, call.step, branch)
                call.loop = compiled if branch == 0 else call.loop
            # Note [late branches]: a branch (or a signature on it) without stale values yet
            signals = Signals(new_loop=new_loop, new_branch=state.channel is not compiled.channel(branch))
            state.channel = compiled.channel(branch)
            fresh = compiled.calls == 0  # this rank (and so every rank) traced, planned and checked it just now
            compiled.calls += 1
            state.channel.deadline = self.config.deadline(self._step_seconds[-64:], new=fresh)
            if self.config.refresh_drift is not None:  # Note [adaptive refresh]: every step keeps its values
                drift = boundary_drift(state, compiled, needs_drift(self.schedule, step, signals), self.collective)
                signals = dataclasses.replace(signals, drift=drift, drift_limit=self.config.refresh_drift)
            if self.refresh is not None and branch == 0 and needs_drift(self.schedule, step, signals):
                signals = dataclasses.replace(signals, error=self.refresh.predicted(self.plan.notes),
                                              error_limit=self.refresh.limit)
            decision = decide_step(self.schedule, step, signals)  # Note [step decision]
            step, kind = decision.step, decision.kind
            call.decisions.append(decision)
            program = self.schedule.program(step, self.rank, compiled.layout, decision)  # Note [schedule as program]
            if self.config.compensate != "none":  # Note [compensation]
                state.stale = state.extrapolation.step(state.stale, self.config.compensate, spacing_at(self.timesteps, step),
                                                       kind == StepKind.ASYNC)
            if program.timestep != step:
                args, kwargs = with_timestep(self.denoiser, self.timestep_arg, self.timesteps, args, kwargs,
                                             program.timestep)
            check = fresh and self.planning.stage_only and self.config.verify and kind.synchronous \
                and self.config.model_n > 1
            inputs = (fresh_copy(args), fresh_copy(kwargs)) if check else None  # before the step may update them
            read = read_checksums(state, kind) if self.recorder is not None else None  # Note [run records]
            output = run_stage(compiled, state, compiled.traced.flatten_call(args, kwargs), program, self.ranks)
            if self.refresh is not None and branch == 0:  # Note [predicted refresh]
                self.refresh.observe(output, step)
            if inputs is not None:  # Note [verify on stage-only loads]
                state.drain()
                self.planning.verify_streamed(inputs, output, self.ranks, self.group, self.collective,
                                              state.channel.deadline)
            if self.recorder is not None:  # Note [run records]
                self.recorder.write(step_entry(self, compiled, state, program, decision, branch, output, read,
                                               time.perf_counter() - start))
        call.seconds.append((kind, time.perf_counter() - start))
        if not fresh:  # a first call's time is mostly tracing
            self._step_seconds.append(call.seconds[-1][1])
        if counted and self.marks_steps:
            call.branch += 1
        elif counted:
            call.step += 1
        return output

    def _new_loop(self) -> None:
        """Note [a second loop]: a step's first call has another call signature than the last
        step's: the pipeline has begun another denoising loop in the same call (a second
        resolution, a refiner pass). Stale values of the other shapes mean nothing to it, so it
        starts as a call does: step 0, fresh state, warm-up first."""
        self.call.drain()
        self.call.branches, self.call.step = [StageState()], 0

    def end_step(self) -> bool:
        """The pipeline finished a denoising step (``marks_steps``): the next call starts the next
        one. Without a denoiser call since the last end, nothing ends (several schedulers, one
        per frame, may step after one call; another denoiser ran this step): False."""
        call = self.call
        if len(call.branch_log) == call.calls_at_step_end:
            return False
        call.step, call.branch = call.step + 1, 0
        call.calls_at_step_end = len(call.branch_log)
        return True

    def record(self, path: str | None) -> None:
        """Append a record of every step this rank runs to ``path`` (None: stop; Note [run records])."""
        self.recorder = Recorder(path) if path is not None else None  # an older one closes when collected

    def drain(self) -> None:
        """Wait for the transfers still in flight (the last step's sends): before the process
        group goes away, or a new call starts."""
        self.call.drain()

    def reset_state(self, warm_up: WarmUp | None = None) -> None:
        """Start a new pipeline call (optionally with a new ``warm_up``); drains pending transfers."""
        if warm_up is not None:
            self.warm_up = relative_warm_up(warm_up, self.loop_steps)
            self.schedule = self.config.schedule(warm_up_steps(self.warm_up, None))
        self.drain()
        self.call = CallState()
        self._calls += 1

    def _batch_size(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return batch_size(self.denoiser, self.latent, args, kwargs)

    # -- compiling a call signature -----------------------------------------------------------
    def _compile(self, args: tuple[Any, ...], kwargs: dict[str, Any], branch: int = 0) -> CompiledCall:
        """The compiled call for this signature (Note [specialised trace]); a program traced with
        real values holds for its own branch only (Note [value trace]: the guidance calls of a
        step may differ in value-dependent lengths), so those are kept per branch."""
        signature, _ = call_signature(self.denoiser, args, kwargs)
        key = signature if signature in self._compiled else (signature, branch)
        compiled = self._compiled.get(key)
        if compiled is not None:
            self._compiled.move_to_end(key)
            return compiled
        start = time.perf_counter()
        traced, split = self.planning.split(self.config, args, kwargs)
        program = split.stages[self.stage]
        modules = [seg.module(self.denoiser) for seg in program.segments]
        piloted = self.planning.pilot is not None  # Note [measured plan choice]: every weight stays until it chose
        if not piloted and traced.by_values and not self.config.compile and self.call.step == 0:
            self._deferred_release = modules  # the other branches of this step trace with real values too
        elif not piloted:
            self._release(modules)
            modules = self._compiled_modules(modules)
        device = device_of(traced.flatten_call(args, kwargs))
        out_specs = [traced.specs[n.name] for n in output_template(traced) if isinstance(n, torch.fx.Node)]
        destinations = {k: [self.ranks[k]] for k in range(self.config.model_n)}
        if self.config.stride == 2:  # the extra rank receives what the last stage receives
            destinations[self.config.model_n - 1].append(self.ranks[-1])
        transfer_dtype = TRANSFER_DTYPES.get(self.config.transfer_dtype)
        compiled = CompiledCall(traced, split, program, modules,
                                lambda branch: StageChannel(program, len(split.segments), destinations, self.group,
                                                            device, transfer_dtype, branch, self.collective),
                                PackLayout.of([(s.shape, s.torch_dtype) for s in out_specs]), device, Layout.of(split))
        compiled.signature = hashlib.sha1(repr(signature).encode()).hexdigest()[:12]
        self._compiled[(signature, branch) if traced.by_values else signature] = compiled
        while len(self._compiled) > MAX_SIGNATURES:
            self._compiled.popitem(last=False)
        seconds = time.perf_counter() - start
        self.planning.compile_seconds += seconds
        log.info("compiled call signature %d (branch %d) in %.2f s: %d segment(s), %d bytes sent per step",
                 len(self._compiled), branch, seconds, len(program.segments),
                 compiled.channel(branch).bytes_sent_per_step)
        return compiled

    def _release(self, modules: list[torch.nn.Module] | CompiledCall) -> None:
        """Free the weights of other stages' blocks that ``modules`` (this stage's programs) do not
        use; a whole compiled call's modules are compiled after (Note [measured plan choice])."""
        compiled = modules if isinstance(modules, CompiledCall) else None
        release_foreign(self.denoiser, self.plan, self.stage, compiled.modules if compiled else modules, self._released)
        self.planning.complete = False  # on every rank at the same call
        if compiled is not None:
            compiled.modules = self._compiled_modules(compiled.modules)

    def _compiled_modules(self, modules: list[Any]) -> list[Any]:
        """After the release: compiled code must not capture released weights."""
        return [torch.compile(m) for m in modules] if self.config.compile else modules

    # -- weights ----------------------------------------------------------------------------
    @property
    def bytes_sent_per_step(self) -> int:
        """Point-to-point bytes this rank sends per step (boundary values only)."""
        return max((c.channel(0).bytes_sent_per_step for c in self._compiled.values()), default=0)

    @property
    def released_weights(self) -> list[str]:
        return sorted(self._released)

    def restore_weights(self) -> None:
        """Bring back released weights: from the checkpoint where they were loaded from one, else
        (and what it lacks) from the ranks that own them (collective: all ranks call it)."""
        if self._weights_from is not None and self._released:
            reload(self.denoiser, self._released, self._weights_from)
        if self.plan is not None and self.collective is not None:
            restore(self.denoiser, self.plan, self._released, self.ranks, self.collective)

    def announce(self, err: BaseException) -> None:
        """``err`` stopped this rank's pipeline call outside a step: record it as the call's first
        failure for the peers to report (Note [failures reach every rank] in errors.py)."""
        if self.world > 1:
            announce(f"{self._engine}.{self._calls}", err)

    # -- helpers ----------------------------------------------------------------------------
    def _where(self, step: int) -> contextlib.AbstractContextManager[None]:
        return located(self.stage, step, f"{self._engine}.{self._calls}")
