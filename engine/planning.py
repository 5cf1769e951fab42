"""The first call's decisions: the traced and split program, the plan, its check, the mesh.

At the first call of a call signature every rank traces the denoiser (Note [specialised trace]
in :mod:`asyncdiff.partition.trace`) and splits it by the plan. Decisions that depend on
measurements (the plan from a timing profile, the check of the split against the denoiser,
``parallel="auto"``'s choice of slices) are taken on rank 0 only and broadcast, so every rank
takes the same decision or raises the same error (:meth:`Planning.from_rank0`, Note [failures
reach every rank] in errors.py).

Example (one process: rank 0 decides for itself)::

    planning = Planning(unet, plan=None, latent="sample", released={}, stage_only=False, world=1, global_rank=0,
                        timeout_s=600)
    traced, split = planning.split(EngineConfig(model_n=2, warm_up=1), args, kwargs)
"""

from __future__ import annotations

import datetime
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from asyncdiff.engine.config import EngineConfig
from asyncdiff.engine.errors import Failure, PeerFailed, decided
from asyncdiff.engine.mesh import model_option, split_difference, verify_batch_split
from asyncdiff.engine.pilot import PlanPilot, horizon_for, unmeasured
from asyncdiff.engine.weights import streamed
from asyncdiff.partition.cache import cached_choice, cached_plan, device_kind
from asyncdiff.partition.hybrid import ParallelOption, choose_parallel, parallel_degrees, two_calls
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.split import SplitDenoiser, split_graph
from asyncdiff.partition.specs import CallSignature, meta_copy
from asyncdiff.partition.trace import trace_denoiser
from asyncdiff.partition.traced import TracedDenoiser, call_signature
from asyncdiff.partition.verify import ADVICE, compare_outputs, eager, mismatch_text, tensor_leaves, verify_split

__all__ = ["Planning", "device_of"]

log = logging.getLogger(__name__)


class Planning:
    """What every rank decides alike for ``denoiser``: the plan (given, cached or made on rank 0),
    the split program per call signature, and the checks that run once. ``released``: weights
    this rank does not hold (Note [stage-only loading]); the checks that need every weight do not
    run then. ``compile_seconds``: tracing, profiling, planning, checking, all signatures."""

    def __init__(self, denoiser: torch.nn.Module, *, plan: Plan | None, latent: str | None,
                 released: dict[str, tuple[torch.Size, torch.dtype, torch.device]], stage_only: bool, world: int,
                 global_rank: int, timeout_s: float) -> None:
        self.denoiser, self.plan, self.latent, self.released = denoiser, plan, latent, released
        # the same on every rank (a rank-dependent check would mismatch the collectives of the checks):
        self.stage_only = stage_only  # loaded stage-only (Note [verify on stage-only loads])
        self.complete = not stage_only  # every rank still holds every weight (until the engine releases)
        self.skeleton = meta_copy(denoiser, {name: shape for name, (shape, _, _) in released.items()})
        self.global_rank = global_rank
        # Rank 0's decisions (plan, verification, the mesh) reach every rank on their own group.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.decisions = dist.new_group(list(range(world)), timeout=timeout) if world > 1 else None
        self.plan_source = "given" if plan is not None else ""  # where the plan came from (Note [plan cache])
        self.parallel_options: list[ParallelOption] = []  # what parallel="auto" chose from
        self.pilot: PlanPilot | None = None  # the plan's choice while it is measured (Note [measured plan choice])
        self.measured: list[tuple[Plan, float]] = []  # the candidates it measured, with their predicted errors
        self.compile_seconds = 0.0
        self._split_checked: set[CallSignature] = set()  # call signatures whose batch split is verified
        self.streamed_checks = 0  # Note [verify on stage-only loads] run so far

    def from_rank0(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, its result on every rank; whatever it raises is raised on every
        rank (Note [failures reach every rank]: a ``ValueError`` with the same message)."""
        return decided(compute, src=0, group=self.decisions, rank=self.global_rank)

    def split(self, config: EngineConfig, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[TracedDenoiser, SplitDenoiser]:
        """This call's traced denoiser and its split by the plan (made now if there is none yet),
        checked against the denoiser where every weight is here (Note [verify])."""
        start = time.perf_counter()
        traced = trace_denoiser(self.denoiser, args, kwargs, policy=config.policy, latent=self.latent,
                                skeleton=self.skeleton)
        log.info("traced %s in %.2f s: %d blocks", type(self.denoiser).__name__, time.perf_counter() - start,
                 len(traced.blocks))
        if self.plan is None:
            start = time.perf_counter()
            unmeasurable = unmeasured(config, self.stage_only)  # Note [measured plan choice]
            text, self.plan_source, drafts = self.from_rank0(
                lambda: self._plan_here(config, traced, args, kwargs, unmeasurable))
            self.plan = Plan.from_json(text)
            if drafts is not None:
                key, plans = drafts
                self.pilot = PlanPilot([Plan.from_json(p) for p in plans], key, self.plan_source, horizon_for(config))
                self.plan_source += f", {len(plans)} candidates to measure (provisional: the depth rule's)"
            log.info("plan (%s) in %.2f s: %s blocks per stage", self.plan_source, time.perf_counter() - start,
                     " + ".join(str(len(stage)) for stage in self.plan.stages))
        # a call may skip planned blocks (skip-layer guidance): the others keep their stages
        split = split_graph(traced, self.plan.restricted_to(traced.blocks))
        if config.verify and self.complete:
            start = time.perf_counter()
            error = self.from_rank0(lambda: verify_split(traced, split, self.denoiser, args, kwargs))
            if error is not None:
                raise ValueError(error)
            log.info("split checked against the denoiser in %.2f s", time.perf_counter() - start)
        return traced, split

    def _plan_here(self, config: EngineConfig, traced: TracedDenoiser, args: tuple[Any, ...],
                   kwargs: dict[str, Any], unmeasurable: str | None) -> tuple[str, str, Any]:
        """(plan JSON, where it came from, (cache key, candidate plans' JSON) or None): the cached
        plan of this call and options, or a new one, or candidates to measure (Note [measured plan
        choice]; ``unmeasurable``: why the fidelity rule cannot measure here)."""
        device = device_of(traced.flatten_call(args, kwargs))

        def profile() -> Any:
            return profile_blocks(traced, self.denoiser, args, kwargs, repeats=config.profile_repeats,
                                  measure_time=config.cost == "time")

        options = dict(cost=config.cost, bandwidth=config.planner_bandwidth(device), layouts=config.plan_layouts,
                       device=device_kind(device), replan=config.replan)
        if unmeasurable is None:
            plan, source, candidates, key = cached_choice(traced, config.model_n, profile,
                                                          max_slowdown=config.slowdown("fidelity"),
                                                          depth_slowdown=config.slowdown("depth"), **options)
            return plan.to_json(), source, (key, [c.to_json() for c in candidates]) if candidates else None
        plan, source = cached_plan(traced, config.model_n, profile, max_slowdown=config.slowdown("depth"), **options)
        if config.plan_rule == "fidelity" and config.model_n > 1:
            source = f"{source}; depth rule (fidelity not measured: {unmeasurable})"
        return plan.to_json(), source, None

    def check_split(self, config: EngineConfig, n: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """That this call's batch ``n`` splits evenly over the slices; the first call of each call
        signature also checks that splitting it is exact (Note [batch split])."""
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
        if not config.verify or not self.complete:  # asked not to, or streamed after the step (stage-only)
            return
        signature, _ = call_signature(self.denoiser, args, kwargs)
        if signature not in self._split_checked:
            start = time.perf_counter()
            error = self.from_rank0(lambda: verify_batch_split(self.denoiser, args, kwargs, n, config.data))
            self.compile_seconds += time.perf_counter() - start
            if error is not None:
                raise ValueError(error)
            self._split_checked.add(signature)

    def split_unchecked(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether splitting this call's batch is not yet checked for its call signature (Note [batch split])."""
        return call_signature(self.denoiser, args, kwargs)[0] not in self._split_checked

    @property
    def split_checks(self) -> int:
        """Call signatures whose batch split was checked (Note [batch split])."""
        return len(self._split_checked)

    def choose_parallel(self, config: EngineConfig, world: int, n: int, guided: bool | None,
                        args: tuple[Any, ...], kwargs: dict[str, Any]) -> ParallelOption:
        """``parallel="auto"``: rank 0 models every way to use the ``world`` processes for this call
        (batch ``n``; ``guided``: whether it batches classifier-free guidance) and picks one (Note
        [choosing the mesh]); every rank gets the same choice, and the plan that comes with it."""
        start = time.perf_counter()
        degrees = parallel_degrees(world, config.stride, n, guided)
        profiles: dict[int, Any] = {}

        def model() -> list[ParallelOption]:
            tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            bandwidth = config.planner_bandwidth(device_of(tensors))
            return [model_option(self.denoiser, args, kwargs, d, n, policy=config.policy, latent=self.latent,
                                 skeleton=self.skeleton, cost=config.cost, bandwidth=bandwidth,
                                 layouts=config.plan_layouts, max_slowdown=config.slowdown("depth"),
                                 repeats=config.profile_repeats, profiles=profiles,
                                 two_calls=two_calls(n, guided)) for d in degrees]

        self.parallel_options = self.from_rank0(model)
        chosen = choose_parallel(self.parallel_options, config.slowdown(config.plan_rule))
        log.info("parallel='auto' chose %s in %.2f s", chosen.name, time.perf_counter() - start)
        if chosen.plan is not None:
            self.plan, self.plan_source = Plan.from_json(chosen.plan), "measured now (parallel='auto')"
        self.compile_seconds += time.perf_counter() - start
        return chosen

    def verify_streamed(self, inputs: tuple[tuple[Any, ...], dict[str, Any]], output: Any, ranks: list[int],
                        group: dist.ProcessGroup | None, collective: dist.ProcessGroup | None,
                        deadline: datetime.timedelta) -> None:
        """Note [verify on stage-only loads]: Note [verify] needs the whole denoiser in one process,
        which a rank of a stage-only load never holds. So the check moves after the first warm-up
        step of a call signature, whose ``output`` is the split program's, exactly (every stage
        waited for this step's values): the first rank of the slice runs the denoiser eagerly on
        the same ``inputs`` (copies taken before the step), with each other stage's block weights
        sent by their owner as the block is entered and freed as it exits (one foreign block at a
        time, :func:`~asyncdiff.engine.weights.streamed`), and compares. Every rank of the slice
        stops with the same error if they differ. The first differing block is not named (that
        needs every weight at once); a denoiser that calls a block twice cannot be streamed, which
        is a warning, not an error."""
        def differs(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
            mismatch = compare_outputs(got, want)
            return None if mismatch is None else (
                f"{mismatch_text(self.denoiser, mismatch)}, checked against the denoiser run with its weights "
                f"streamed from their owners (Note [verify on stage-only loads]). {ADVICE}")

        self._streamed_check(inputs, output, differs, ranks, group, collective, collective, deadline, True)
        self.streamed_checks += 1

    def check_split_streamed(self, config: EngineConfig, inputs: tuple[tuple[Any, ...], dict[str, Any]],
                             output: Any, n: int, lead: bool, ranks: list[int], group: dist.ProcessGroup | None,
                             collective: dist.ProcessGroup | None) -> None:
        """Note [batch split] on a stage-only load (Note [verify on stage-only loads]): after the
        first warm-up step of a call signature, the whole batch's ``output`` gathered from the
        slices (each slice's share already checked against the denoiser) is compared with one
        streamed eager run of the denoiser on the whole batch, ``inputs``, on global rank 0; the
        ranks of its slice (``lead``) send their blocks; every rank gets the verdict."""
        signature, _ = call_signature(self.denoiser, *inputs)
        if signature in self._split_checked:
            return

        def differs(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
            return split_difference(self.denoiser, got, want,
                                    f"between the slices' outputs on chunks of {n // config.data} and the denoiser "
                                    f"on the batch of {n} (its weights streamed from their owners)")

        deadline = datetime.timedelta(seconds=config.timeout_s)
        self._streamed_check(inputs, output, differs, ranks, group, collective, self.decisions, deadline, lead)
        self._split_checked.add(signature)

    def _streamed_check(self, inputs: tuple[tuple[Any, ...], dict[str, Any]], output: Any,
                        differs: Callable[[list[torch.Tensor], list[torch.Tensor]], str | None], ranks: list[int],
                        group: dist.ProcessGroup | None, collective: dist.ProcessGroup | None,
                        verdict_group: dist.ProcessGroup | None, deadline: datetime.timedelta, streams: bool) -> None:
        """``differs(output, eager output)`` on ``ranks[0]``, the denoiser run there with its blocks'
        weights streamed by the other ``ranks`` (where ``streams``: this rank's slice takes part);
        the verdict reaches every rank of ``verdict_group`` from ``ranks[0]``: an error stops them
        all, a denoiser that cannot be streamed (a block entered twice) is a warning."""
        start, verdict, original = time.perf_counter(), None, None
        if streams:
            try:
                with streamed(self.denoiser, self.plan, self.released, ranks, group, collective, deadline):
                    if dist.get_rank() == ranks[0]:
                        with torch.no_grad():
                            want = eager(self.denoiser)(*inputs[0], **inputs[1])
                        error = differs(tensor_leaves(output), tensor_leaves(want))
                        verdict = None if error is None else ("error", error)
            except LookupError as err:
                verdict = ("skipped", f"the split could not be checked against the denoiser on a stage-only load: "
                                      f"{err}")
            except BaseException as err:  # noqa: BLE001 -- Note [failures reach every rank]
                verdict, original = ("failed", Failure.of(err, dist.get_rank())), err
        box = [verdict]
        if verdict_group is not None:
            dist.broadcast_object_list(box, src=ranks[0] if streams else 0, group=verdict_group)
        self.compile_seconds += time.perf_counter() - start
        if original is not None:
            raise original
        if box[0] is not None and box[0][0] == "failed":
            raise PeerFailed(box[0][1])
        if box[0] is not None and box[0][0] == "error":
            raise ValueError(box[0][1])
        if box[0] is not None:
            warnings.warn(box[0][1], stacklevel=3)
        log.info("split checked with streamed weights in %.2f s", time.perf_counter() - start)


def device_of(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")
