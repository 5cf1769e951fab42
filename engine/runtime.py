"""The engine: runs one stage of a planned denoiser per rank, with stale inputs after warm-up.

:class:`AsyncEngine` stands in for the denoiser's ``forward`` on every rank. Per call (one
denoising step) it runs this rank's stage program, exchanges boundary values point to point
(Note [stale inputs] in :mod:`asyncdiff.engine.schedule`), and broadcasts the final output so
that the pipeline's own loop (scheduler, guidance, decoding) runs unchanged on every rank.

The first call of a new call signature traces the denoiser (Note [specialised trace]); the very
first one also makes the plan: rank 0 profiles the blocks, plans, and broadcasts the plan so
that every rank uses the same cuts. After planning, each rank releases the weights of blocks
that other stages own (:meth:`AsyncEngine.restore_weights` brings them back).

The engine's other rooms: ``config.py`` (:class:`EngineConfig`, the device arithmetic),
``stage.py`` (one stage's state and one step of it), ``weights.py`` (release and restore),
``errors.py`` (``[stage k | step t]`` errors, Note [first error]), ``mesh.py`` (guidance and
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

import contextlib
import dataclasses
import datetime
import inspect
import itertools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff.engine.comm import StageChannel
from asyncdiff.engine.config import DEADLINE_FACTOR, DEADLINE_FLOOR_S, TRANSFER_DTYPES, EngineConfig, check_warm_up, stages_for
from asyncdiff.engine.errors import StageError, located
from asyncdiff.engine.mesh import (
    ProcessMesh,
    TwoCalls,
    batch_size,
    exchange_outputs,
    gather_batch,
    model_option,
    split_batch,
    verify_batch_split,
)
from asyncdiff.engine.schedule import Layout, StepKind
from asyncdiff.engine.stage import CompiledCall, StageState, drifted, output_template, run_stage
from asyncdiff.engine.weights import block_tensors, foreign_tensors, release_foreign, restore
from asyncdiff.kernels.pack import PackLayout
from asyncdiff.partition.cache import cached_plan, device_kind
from asyncdiff.partition.hybrid import ParallelOption, choose_parallel, parallel_degrees, two_calls
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.split import SplitDenoiser, split_graph
from asyncdiff.partition.trace import (
    CallSignature,
    TracedDenoiser,
    call_signature,
    meta_copy,
    trace_denoiser,
)
from asyncdiff.partition.verify import verify_split

# EngineConfig, StageError, StageState and the weight helpers are re-exported: they were defined here.
__all__ = ["TRANSFER_DTYPES", "AsyncEngine", "EngineConfig", "StageError", "StageState", "block_tensors",
           "foreign_tensors", "stages_for"]



_ENGINES = itertools.count()


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
        self._loop: CompiledCall | None = None  # Note [a second loop]
        self.branch_name: str | None = None  # the pipeline's name for the running call, if it gives one
        self._branch_names: dict[str, int] = {}  # branch name -> branch, in order of first appearance
        self.branch_log: list[int] = []  # the branch of every call of this pipeline call
        self._calls_at_step_end = 0  # len(branch_log) when the last step ended
        self.seconds: list[tuple[StepKind, float]] = []  # (step kind, wall time) per call, this pipeline call
        self._calls = 0  # pipeline calls so far (reset_state), to key errors by (Note [first error])
        self._engine = next(_ENGINES)  # engines made in this process; every rank makes them in one order
        self._step_seconds: list[float] = []  # step times, all calls (Note [deadlines])
        self._compiled: dict[CallSignature | tuple[CallSignature, int], CompiledCall] = {}
        self._deferred_release: list[torch.nn.Module] | None = None  # Note [value trace]: until step 1
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
        if self.branch_name is not None and self.marks_steps:  # Note [branches]: the pipeline names it
            self.branch = self._branch_names.setdefault(self.branch_name, len(self._branch_names))
        self.branch_log.append(self.branch)
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
            if self.step > 0 and self._deferred_release is not None:  # Note [value trace]: every branch traced
                release_foreign(self.denoiser, self.plan, self.stage, self._deferred_release, self._released)
                self._deferred_release = None
            compiled = self._compile(args, kwargs, branch)
            if branch == 0:
                if step > 0 and compiled is not self._loop:  # Note [a second loop]
                    self._new_loop()
                    step = 0
                self._loop = compiled
            while len(self.branches) <= branch:
                self.branches.append(StageState())
            state = self.branches[branch]
            state.drain()  # the previous step's sends, an asynchronous step's receives
            kind = self.schedule.kind(step)
            if state.channel is not compiled.channel(branch) and kind != StepKind.WARM_UP:
                # Note [late branches]: this branch has no stale values of this signature yet
                kind = self._first_of_branch(kind)
            state.channel = compiled.channel(branch)
            fresh = compiled.calls == 0  # this rank (and so every rank) traced, planned and checked it just now
            compiled.calls += 1
            state.channel.deadline = self._deadline(new=fresh)
            if self.config.refresh_drift is not None and drifted(state, compiled, kind == StepKind.ASYNC, self.config.refresh_drift, self.collective):
                kind = StepKind.REFRESH
            program = self.schedule.program(step, self.rank, compiled.layout, kind)  # Note [schedule as program]
            if program.timestep != step:
                args, kwargs = self._with_timestep(args, kwargs, program.timestep)
            output = run_stage(compiled, state, compiled.traced.flatten_call(args, kwargs), program, self.ranks,
                               self.collective)
        self.seconds.append((kind, time.perf_counter() - start))
        if not fresh:  # a first call's time is mostly tracing
            self._step_seconds.append(self.seconds[-1][1])
        if counted and self.marks_steps:
            self.branch += 1
        elif counted:
            self.step += 1
        return output

    def _deadline(self, new: bool) -> datetime.timedelta:
        """Note [deadlines]: how long this step may wait for its peers. A wait that outlasts it
        means a peer failed or stalled, and this rank raises (so every rank stops, naming the
        cause, instead of hanging). Before any step is measured, and at a call of a signature
        the ranks have not run yet (every rank traces, plans and checks it first), the deadline
        is ``timeout_s``; after that ``DEADLINE_FACTOR`` times the median measured step, at least
        ``DEADLINE_FLOOR_S``, at most ``timeout_s``."""
        measured = sorted(self._step_seconds[-64:])
        if new or len(measured) < 2:
            return datetime.timedelta(seconds=self.config.timeout_s)
        median = measured[len(measured) // 2]
        return datetime.timedelta(seconds=min(self.config.timeout_s, max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * median)))

    def _first_of_branch(self, kind: StepKind) -> StepKind:
        """Note [late branches]: a call whose branch (or whose signature on this branch) first
        appears after warm-up (skip-layer guidance on some steps only) has no values from a last
        step to run on: it runs sequentially (a refresh step), and the next one asynchronously."""
        if self.config.stride == 2:
            raise ValueError("this pipeline makes a new kind of denoiser call after the warm-up steps (a call "
                             "with another signature, or an extra call per step, on some steps only); stride 2 "
                             "cannot start it there: use stride=1, or warm_up covering those steps")
        return StepKind.REFRESH

    def _new_loop(self) -> None:
        """Note [a second loop]: a step's first call has another call signature than the last
        step's: the pipeline has begun another denoising loop in the same call (a second
        resolution, a refiner pass). Stale values of the other shapes mean nothing to it, so it
        starts as a call does: step 0, fresh state, warm-up first."""
        self.drain()
        self.branches, self.step = [StageState()], 0

    def end_step(self) -> None:
        """The pipeline finished a denoising step (``marks_steps``): the next call starts the next
        one. Without a denoiser call since the last end, nothing ends (several schedulers, one
        per frame, may step after one call)."""
        if len(self.branch_log) > self._calls_at_step_end:
            self.step, self.branch = self.step + 1, 0
            self._calls_at_step_end = len(self.branch_log)

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

    def drain(self) -> None:
        """Wait for the transfers still in flight (the last step's sends): before the process
        group goes away, or a new call starts."""
        for state in self.branches:
            state.drain()

    def reset_state(self, warm_up: int | None = None) -> None:
        """Start a new pipeline call (optionally with a new ``warm_up``); drains pending transfers."""
        if warm_up is not None:
            self.schedule = self.config.schedule(check_warm_up(warm_up))
        self.drain()
        self.branches = [StageState()]
        self.two_calls = TwoCalls()
        self._loop: CompiledCall | None = None  # the call signature of this loop's first calls
        self._branch_names, self.branch_log, self._calls_at_step_end = {}, [], 0
        self.step, self.branch, self.seconds = 0, 0, []
        self._calls += 1

    # -- guidance and batch slices (Note [hybrid mesh]) ---------------------------------------
    def _batch_size(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        return batch_size(self.denoiser, self.latent, args, kwargs)

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
        if not config.verify or self._released:  # nothing to check with, or asked not to
            return
        signature, _ = call_signature(self.denoiser, args, kwargs)
        if signature not in self._split_checked:
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
    def _compile(self, args: tuple[Any, ...], kwargs: dict[str, Any], branch: int = 0) -> CompiledCall:
        """The compiled call for this signature (Note [specialised trace]); a program traced with
        real values holds for its own branch only (Note [value trace]: the guidance calls of a
        step may differ in value-dependent lengths), so those are kept per branch."""
        signature, _ = call_signature(self.denoiser, args, kwargs)
        compiled = self._compiled.get(signature) or self._compiled.get((signature, branch))
        if compiled is not None:
            return compiled
        start = time.perf_counter()
        traced = trace_denoiser(self.denoiser, args, kwargs, policy=self.config.policy, latent=self.latent,
                                skeleton=self.skeleton)
        if self.plan is None:
            self.plan = self._make_plan(traced, args, kwargs)
        # a call may skip planned blocks (skip-layer guidance): the others keep their stages
        split = split_graph(traced, self.plan.restricted_to(traced.blocks))
        if self.config.verify and not self._released:  # every weight is still here (Note [verify])
            self._verify(traced, split, args, kwargs)
        program = split.stages[self.stage]
        modules = [seg.module(self.denoiser) for seg in program.segments]
        if traced.by_values and not self.config.compile and self.step == 0:
            # the other branches of this step trace with real values too: release after it
            self._deferred_release = modules
        else:
            release_foreign(self.denoiser, self.plan, self.stage, modules, self._released)
        if self.config.compile:  # after the release: compiled code must not capture released weights
            modules = [torch.compile(m) for m in modules]
        device = _device_of(traced.flatten_call(args, kwargs))
        out_specs = [traced.specs[n.name] for n in output_template(traced) if isinstance(n, torch.fx.Node)]
        destinations = {k: [self.ranks[k]] for k in range(self.config.model_n)}
        if self.config.stride == 2:  # the extra rank receives what the last stage receives
            destinations[self.config.model_n - 1].append(self.ranks[-1])
        transfer_dtype = TRANSFER_DTYPES.get(self.config.transfer_dtype)
        compiled = CompiledCall(traced, split, program, modules,
                             lambda branch: StageChannel(program, len(split.segments), destinations, self.group,
                                                         device, transfer_dtype, branch=branch),
                             PackLayout.of([(s.shape, s.torch_dtype) for s in out_specs]), device, Layout.of(split))
        self._compiled[(signature, branch) if traced.by_values else signature] = compiled
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
    @property
    def bytes_sent_per_step(self) -> int:
        """Point-to-point bytes this rank sends per step (boundary values only)."""
        return max((c.channel(0).bytes_sent_per_step for c in self._compiled.values()), default=0)

    @property
    def released_weights(self) -> list[str]:
        return sorted(self._released)

    def restore_weights(self) -> None:
        """Bring back released weights from the ranks that own them (collective: all ranks call it)."""
        if self.plan is not None and self.collective is not None:
            restore(self.denoiser, self.plan, self._released, self.ranks, self.collective)

    # -- helpers ----------------------------------------------------------------------------
    def _where(self, step: int) -> contextlib.AbstractContextManager[None]:
        return located(self.stage, step, f"{self._engine}.{self._calls}")


def _device_of(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


