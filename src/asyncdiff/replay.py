"""``asyncdiff inspect --replay FILE``: run a recorded run again in one process and say where it differs.

Note [replay]: ``asyncdiff generate --record FILE`` starts the record with the run's settings
(a ``run`` line: the :class:`~asyncdiff.generate.GenerateSpec`, paths made absolute), and every
rank's step records carry the plan they ran (Note [run records]). The replay builds the same
pipeline in this process, and at each denoiser call runs every rank's program of that step
through the engine's own interpreter over the in-process transport
(:class:`~asyncdiff.engine.local.AsyncSimulator`, Note [one interpreter]), with the step's kind
*as recorded* (so a refresh the run decided from measured drift is replayed as such, and the
replay needs no measurement of its own). After each step it compares, rank by rank, what the
record says with what it computed: the program text, the timestep, the checksum of every
boundary value the stage read and of the output. The first difference is the step, rank and
value where the run went another way than its own settings say it must (a nondeterministic
kernel, a transfer that corrupted a message, a decision taken on one rank only); none is
"replay identical". It computes with the run's threads per device: a CPU matrix product rounds
by its thread count (measured: the tiny SD 1.5 UNet's first output differs between 1 and 2
threads). The warm-up is the record's (its leading warm-up steps), the plan the
record's, so replay needs neither the plan cache nor the fidelity pilot. A plan that changed
after the warm-up (Note [measured plan choice]) is replayed as the engine does it: the new
stages' stale values computed from this call's earlier inputs under the new plan.

Covers stage-parallel runs of one denoiser: stride 1 or 2, time shift, transfer dtypes,
compensation, refresh, guidance batched or as two calls per step (each branch its own
simulator, as each has its own stale state in the engine, Note [branches]); a record of
guidance or batch slices, or of several denoisers, is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from diffusers.hooks import HookRegistry, ModelHook

from asyncdiff.engine.local import AsyncSimulator
from asyncdiff.engine.record import checksum, read_run
from asyncdiff.engine.schedule import StepDecision, StepKind
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.specs import meta_copy
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.trace import trace_denoiser
from asyncdiff.partition.traced import call_signature
from asyncdiff.partition.verify import eager

__all__ = ["ReplayResult", "replay", "run_header"]

PATH_FIELDS = ("image", "mask", "plan", "prompts_file")
HOOK_NAME = "asyncdiff-replay"


def run_header(spec: Any) -> dict[str, Any]:
    """What a record's ``run`` line keeps of ``spec`` (Note [replay]): its fields, the input
    paths absolute, no output."""
    fields = dataclasses.asdict(spec)
    for name in PATH_FIELDS:
        if fields[name] is not None:
            fields[name] = os.path.abspath(fields[name])
    if fields["model"] is not None and os.path.isdir(fields["model"]):
        fields["model"] = os.path.abspath(fields["model"])
    fields.update(out=None, record=None)
    return fields


@dataclass(frozen=True)
class ReplayResult:
    steps: int  # denoiser calls replayed
    ranks: int
    checked: int  # checksums compared
    difference: str | None  # the first one, or None

    def __str__(self) -> str:
        if self.difference is None:
            return (f"replay identical: {self.steps} steps x {self.ranks} ranks, {self.checked} checksums of "
                    "boundary values and outputs equal")
        return f"replay differs: {self.difference}"


class _Replayer:
    """Stands in for the denoiser: each call replays one recorded step on every rank."""

    def __init__(self, pipe: Any, adapter: Any, denoiser: torch.nn.Module, config: Any,
                 entries: list[dict[str, Any]]) -> None:
        from asyncdiff.adapters.api import _timestep_at

        self.pipe, self.adapter, self.denoiser, self.config = pipe, adapter, denoiser, config
        self.timesteps = lambda step: _timestep_at(pipe.scheduler, step)
        self.by_call: dict[int, dict[int, list[dict[str, Any]]]] = {}
        for e in entries:
            self.by_call.setdefault(e["call"], {}).setdefault(e["index"], []).append(e)
        self.calls = sorted(self.by_call)
        self.traced: dict[Any, Any] = {}
        self.skeleton = meta_copy(denoiser)  # made before the replay hook: a copy would hold it
        self.plan: Plan | None = None
        self.simulator: AsyncSimulator | None = None  # the running call's
        self.steps = self.checked = 0
        self.difference: str | None = None

    def start_call(self, number: int) -> None:
        if number >= len(self.calls):
            raise ValueError(f"the record has {len(self.calls)} pipeline call(s); the run makes more: "
                             "record and replay the same settings")
        self.call = self.by_call[self.calls[number]]
        self.index = 0
        self.simulators: dict[int, tuple[Any, AsyncSimulator]] = {}  # by branch: (plan stages, signature), simulator
        self.inputs: dict[int, list[tuple[Any, Any]]] = {}  # by branch: this call's denoiser arguments
        steps = {e["step"]: e["kind"] for group in self.call.values() for e in group if e["branch"] == 0}
        self.warm_up = next((t for t in sorted(steps) if steps[t] != str(StepKind.WARM_UP)), len(steps))

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        group = self.call.get(self.index)
        if group is None:
            raise ValueError(f"the run calls its denoiser more often than the record says ({len(self.call)} calls "
                             f"in pipeline call {self.calls[0]}): record and replay the same settings")
        self.index += 1
        first = group[0]
        branch = first["branch"]  # Note [branches]: each has its own stale state, so its own simulator
        plan = next((Plan(stages=tuple(tuple(stage) for stage in e["plan"])) for e in group if "plan" in e), self.plan)
        if plan is None:
            raise ValueError("the record names no plan (a record from before plans were recorded): record again")
        self.plan = plan
        inputs = self.inputs.setdefault(branch, [])
        inputs.append((args, kwargs))
        key = (plan.stages, call_signature(self.denoiser, args, kwargs)[0])
        kept = self.simulators.get(branch)
        if kept is None or kept[0] != key:
            simulator = self._simulator(args, kwargs, branch)
            if kept is not None and kept[0][1] == key[1]:  # Note [replay]: a plan chosen after the warm-up
                for a, k in inputs[:-1]:
                    simulator.call(a, k)
            self.simulators[branch] = kept = (key, simulator)
        self.simulator = kept[1]
        decision = StepDecision(first["step"], StepKind(first["kind"]), first["why"])
        with torch.no_grad():
            results = self.simulator.call(args, kwargs, decision)
        self.steps += 1
        if self.difference is None:
            self.difference = self._compare(group, results)
        return AsyncSimulator.owned(results)[0]

    def _simulator(self, args: tuple[Any, ...], kwargs: dict[str, Any], branch: int) -> AsyncSimulator:
        """Every rank of this call's split by the record's plan (a value trace holds for its own branch only)."""
        assert self.plan is not None
        key = (call_signature(self.denoiser, args, kwargs)[0], branch)
        if key not in self.traced:
            self.traced[key] = trace_denoiser(self.denoiser, args, kwargs, policy=self.config.policy,
                                              latent=self.adapter.latent, skeleton=self.skeleton)
        traced = self.traced[key]
        split = split_graph(traced, self.plan.restricted_to(traced.blocks))
        c = self.config
        return AsyncSimulator(traced, split, self.denoiser, self.warm_up, c.compensate, self.timesteps, stride=c.stride,
                              time_shift=c.time_shift, transfer_dtype=c.transfer_dtype,
                              timestep_arg=self.adapter.timestep)

    def _compare(self, group: list[dict[str, Any]], results: list[tuple[Any, Any]]) -> str | None:
        simulator = self.simulator
        assert simulator is not None
        if len(group) != len(results):
            return f"step {group[0]['step']}: {len(group)} ranks recorded, the plan runs {len(results)}"
        for e in group:
            rank, where = e["rank"], f"call {e['call']}, step {e['step']} ({e['kind']}), rank {e['rank']}"
            program = str(simulator.programs[rank])
            if program != e["program"]:
                return f"{where}: program {e['program']!r} recorded, {program!r} replayed"
            timestep = float(self.timesteps(simulator.programs[rank].timestep))
            if e["timestep"] is not None and timestep != e["timestep"]:
                return f"{where}: timestep {e['timestep']} recorded, {timestep} replayed"
            replayed = {name: checksum(value) for name, value in sorted(simulator.states[rank].stale.items())}
            for name in sorted(set(replayed) | set(e["inputs"])):
                self.checked += 1
                if replayed.get(name) != e["inputs"].get(name):
                    return (f"{where}: boundary value {name!r} read with checksum {e['inputs'].get(name)} recorded, "
                            f"{replayed.get(name)} replayed")
            output = [checksum(leaf) for leaf in pytree.tree_leaves(results[rank][0])]
            self.checked += len(output)
            if output != e["output"]:
                k = next(i for i, (a, b) in enumerate(zip(output + [None] * 99, e["output"] + [None] * 99)) if a != b)
                return f"{where}: output leaf {k} checksum {e['output'][k:k + 1]} recorded, {output[k:k + 1]} replayed"
        return None


class _ReplayHook(ModelHook):
    def __init__(self, replayer: _Replayer) -> None:
        super().__init__()
        self.replayer, self.busy = replayer, False

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.busy:  # the tracer and the segments call the denoiser's own forward
            return eager(module)(*args, **kwargs)
        self.busy = True
        try:
            return self.replayer(args, kwargs)
        finally:
            self.busy = False


def replay(path: str | os.PathLike) -> ReplayResult:
    """Note [replay]: run the record ``path`` again in this process; where it first differs."""
    from asyncdiff.generate import GenerateSpec

    header, entries = read_run(path)
    if header is None:
        raise ValueError(f"replay={str(path)!r} has no run line: replay needs a record written by "
                         "asyncdiff generate --record (AsyncDiff(record=...) records steps, not the run)")
    engine = {k: tuple(v) if isinstance(v, list) else v for k, v in header.pop("engine", {}).items()}
    spec = GenerateSpec(**header, engine=engine)
    config = spec.config
    refused = [why for why, bad in (
        (f"guidance x batch slices ({config.guidance} x {config.batch})", config.guidance * config.batch > 1),
        ("several denoisers", len({e["denoiser"] for e in entries}) > 1)) if bad]
    if refused or not entries:
        raise ValueError(f"replay={str(path)!r}: " + (f"the run has {', '.join(refused)}; replay covers stage-parallel "
                         "runs of one denoiser" if refused else "the record has no steps"))
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads_per_device)  # a CPU matrix product rounds by its thread count
    try:
        return _replay(spec, config, entries)
    finally:
        torch.set_num_threads(threads)


def _replay(spec: Any, config: Any, entries: list[dict[str, Any]]) -> ReplayResult:
    from asyncdiff.adapters.registry import adapter_for
    from asyncdiff.generate import _load_pipeline, pipeline_call, use_scheduler

    pipe = _load_pipeline(spec)
    use_scheduler(pipe, spec.scheduler)
    adapter = adapter_for(pipe)
    denoiser = getattr(pipe, adapter.denoiser)
    replayer = _Replayer(pipe, adapter, denoiser, config, entries)
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    registry.register_hook(_ReplayHook(replayer), HOOK_NAME)
    try:
        for number, request in enumerate(spec.requests):
            replayer.start_call(number)
            with torch.no_grad():
                pipe(**pipeline_call(spec, pipe, {}, [request]))
    finally:
        registry.remove_hook(HOOK_NAME, recurse=False)
    ranks = len({e["rank"] for e in entries})
    return ReplayResult(replayer.steps, ranks, replayer.checked, replayer.difference)
