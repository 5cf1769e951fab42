"""How to split and run a denoiser: :class:`EngineConfig`, one frozen value validated once, and
the device arithmetic (:func:`stages_for`).

Example:
    >>> config = EngineConfig(model_n=2, guidance=2)
    >>> config.world_size, stages_for(config.world_size, 1, config.data)
    (4, 2)
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncdiff.engine.compensation import COMPENSATE
from asyncdiff.engine.schedule import Schedule
from asyncdiff.kernels.pack import FP8
from asyncdiff.partition.auto import COSTS
from asyncdiff.partition.blocks import BlockPolicy
from asyncdiff.partition.planner import FIDELITY_SLOWDOWN, LAYOUTS, MAX_SLOWDOWN
from asyncdiff.partition.report import LINKS

__all__ = ["AUTO_MIN_WARM_UP", "AUTO_WARM_UP", "DEADLINE_FACTOR", "DEADLINE_FLOOR_S", "PLAN_RULES", "TRANSFER_DTYPES", "EngineConfig",
           "WarmUp", "check_warm_up", "option", "relative_warm_up", "stages_for", "warm_up_steps"]

DEADLINE_FACTOR = 10.0  # Note [deadlines] (EngineConfig.deadline): a wait may take this many median steps
DEADLINE_FLOOR_S = 30.0  # and at least this long (a loaded machine's step varies)
PLAN_RULES = ("fidelity", "depth")  # Note [fidelity rule], Note [staleness]
TRANSFER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8": FP8}  # wire dtypes by name
WarmUp = int | float | str  # Note [relative warm-up]: steps, a fraction of the loop's steps, or "auto"
AUTO_WARM_UP = 0.1  # warm_up="auto": this fraction of the loop's steps, rounded up, ...
AUTO_MIN_WARM_UP = 2  # ... and at least this many (BENCHMARKS.md "Warm-up as a fraction of the steps, and auto")


def stages_for(devices: int, stride: int, data: int = 1) -> int:
    """How many stages ``devices`` processes run with ``stride`` in each of ``data`` slices (guidance
    x batch, Note [hybrid mesh]): one each for stride 1; for stride 2 the extra process repeats
    the last stage (Note [stride 2]). The inverse of :attr:`EngineConfig.world_size`; the one
    place this arithmetic lives."""
    return devices // data - stride + 1


def option(default: Any, help: str, **flag: Any) -> Any:
    """A setting of :class:`EngineConfig` with its one-line ``help``: the command line derives its
    flag from it (``--field-name``; ``flag``: ``name`` for another flag name, ``choices``,
    ``type``, ``const`` for a flag that sets this value, ``metavar``). Note [one config]."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class EngineConfig:
    """How to split and run a denoiser. Validated here; no side effects.

    Note [one config]: every setting of the engine is a field here, with its help text; the
    ``AsyncDiff`` API takes the fields as keyword arguments (or a whole ``config=``), ``generate``
    and ``bench`` carry this value to every process, and the command line derives each flag,
    its type, choices, default and help from the field. So a new setting is one field (and its
    check in ``__post_init__``), and it is a flag, an API argument and part of every run's
    settings at once.
    """

    model_n: int  # number of stages (no flag: the command line derives it from --devices)
    stride: int = option(1, "denoising steps per parallel round; with D processes the denoiser is cut into "
                            "D - stride + 1 stages (Note [stride 2])", choices=(1, 2))
    warm_up: WarmUp = option(1, "sequential steps at the start of every pipeline call: a count, a fraction of the "
                                "loop's steps (0 < f < 1, rounded up), or auto (Note [relative warm-up])",
                             type="warm_up")
    time_shift: bool = option(False, "feed stages the previous step's timestep after warm-up")
    policy: str | BlockPolicy = option("fine", "block granularity", choices=("coarse", "fine", "finer"))
    cost: str = option("time", "what the planner balances: measured time (rank 0), FLOPs, or the weight bytes each "
                               "rank holds", choices=COSTS)
    bandwidth: str | None = option("auto", "the link the planner's communication term assumes (auto: gloo on "
                                           "CPU, pcie on CUDA)", choices=("auto", *sorted(LINKS)))
    profile_repeats: int = 3  # timed runs per block when cost="time" (the median is taken)
    timeout_s: float = option(300.0, "the longest any rank waits for another, seconds (Note [deadlines])",
                              name="timeout", type=float)
    layouts: tuple[str, ...] = option(LAYOUTS, "plan shapes the planner may choose, comma-separated: contiguous, "
                                               "wrapped (stage 0 runs the first and the last blocks)", type="layouts")
    transfer_dtype: str | None = option(None, "send boundary values of asynchronous steps in this narrower dtype "
                                              "(float8: e4m3 with a per-tensor scale; warm-up and refresh steps stay "
                                              "exact)", choices=tuple(TRANSFER_DTYPES))
    refresh_every: int | None = option(None, "run every K-th step after warm-up sequentially again (stride 1)",
                                       type="positive", metavar="K")
    refresh_drift: float | None = option(None, "run a step sequentially when the boundary values moved by more "
                                               "than this (relative) over the last step (stride 1)", type=float)
    refresh_error: float | None = option(None, "run an asynchronous step sequentially when its predicted error "
                                               "(the output's motion times the error per motion the fidelity rule "
                                               "measured) is above this (stride 1; Note [predicted refresh])",
                                         type=float)
    compensate: str = option("none", "linear: extrapolate each stale input from the last two received, scaled by "
                                     "the timestep spacing; auto: per value, where it has predicted better so far "
                                     "(stride 1; Note [compensation])", choices=COMPENSATE)
    compile: bool = option(False, "run each rank's stage programs under torch.compile")
    plan_rule: str = option("fidelity", "how the default plan is chosen among those within max_slowdown of the "
                                        "fastest modelled step: fidelity: the lowest error predicted on the warm-up "
                                        "steps (Note [fidelity rule]); depth: the least stale main path",
                            choices=PLAN_RULES)
    max_slowdown: float | None = option(None, "the fraction of the fastest modelled step a more faithful plan may "
                                              "cost (0: the fastest; default 0.15 under the fidelity rule, 0.05 "
                                              "under the depth rule)", type=float)
    replan: bool = option(False, "plan anew instead of reusing the cached plan of this call (Note [plan cache])")
    verify: bool = option(True, "on the first call, check that the split reproduces the denoiser (Note [verify])")
    guidance: int = option(1, "split each denoiser call's guidance halves over two slices of processes (exact; "
                              "needs a pipeline with classifier-free guidance)", name="guidance-parallel", const=2)
    batch: int = option(1, "split the prompt batch over D slices (exact; needs a batch divisible by D)",
                        name="batch-parallel", type="positive", metavar="D")
    parallel: str | None = option(None, "auto: choose guidance, batch and stage degrees for the processes at the "
                                        "first call (Note [choosing the mesh])", choices=("auto",))

    def __post_init__(self) -> None:
        if not isinstance(self.model_n, int) or self.model_n < 1:
            raise ValueError(f"model_n={self.model_n!r} must be an integer >= 1 (the number of stages)")
        if self.stride not in (1, 2):
            raise ValueError(f"stride={self.stride!r} must be 1 or 2")
        check_warm_up(self.warm_up)
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
        if self.refresh_error is not None and (not isinstance(self.refresh_error, (int, float))
                                               or not self.refresh_error >= 0 or self.stride != 1
                                               or self.plan_rule != "fidelity"):
            raise ValueError(f"refresh_error={self.refresh_error!r} must be a number >= 0, with stride=1 "
                             f"(stride={self.stride}) and plan_rule='fidelity' (plan_rule={self.plan_rule!r}: its "
                             f"measurement is the prediction, Note [predicted refresh]); or None: never")
        if self.compensate not in COMPENSATE:
            raise ValueError(f"compensate={self.compensate!r} must be one of {', '.join(COMPENSATE)}")
        if self.compensate != "none" and (self.stride != 1 or self.time_shift):
            raise ValueError(f"compensate={self.compensate!r} extrapolates stale inputs one step old: it needs "
                             f"stride=1 without time_shift (stride={self.stride}, time_shift={self.time_shift}); "
                             f"use compensate='none' there")
        if self.max_slowdown is not None and (not isinstance(self.max_slowdown, (int, float))
                                              or not self.max_slowdown >= 0):
            raise ValueError(f"max_slowdown={self.max_slowdown!r} must be a number >= 0 (0: the fastest plan) or "
                             f"None (the plan rule's default)")
        if self.plan_rule not in PLAN_RULES:
            raise ValueError(f"plan_rule={self.plan_rule!r} must be one of {', '.join(PLAN_RULES)}")
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
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s!r} must be a number of seconds > 0 (the longest wait for a peer)")
        if self.profile_repeats < 1:
            raise ValueError(f"profile_repeats={self.profile_repeats} must be >= 1")
        BlockPolicy.parse(self.policy)
        self.schedule(warm_up_steps(self.warm_up, None))  # validates refresh_every against stride

    def deadline(self, measured: Sequence[float], new: bool) -> datetime.timedelta:
        """Note [deadlines]: how long a step may wait for its peers, given the
        ``measured`` times of recent steps. A wait that outlasts it means a peer failed or stalled,
        and the rank raises (so every rank stops, naming the cause, instead of hanging). Before
        two steps are measured, and at a call of a signature the ranks have not run yet (``new``:
        every rank traces, plans and checks it first), it is ``timeout_s``; after that
        ``DEADLINE_FACTOR`` times the median measured step, at least ``DEADLINE_FLOOR_S``, at most
        ``timeout_s``."""
        if new or len(measured) < 2:
            return datetime.timedelta(seconds=self.timeout_s)
        median = sorted(measured)[len(measured) // 2]
        return datetime.timedelta(seconds=min(self.timeout_s, max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * median)))

    def slowdown(self, rule: str) -> float:
        """The window of ``rule`` (Note [fidelity rule]): ``max_slowdown``, else the rule's default."""
        if self.max_slowdown is not None:
            return float(self.max_slowdown)
        return FIDELITY_SLOWDOWN if rule == "fidelity" else MAX_SLOWDOWN

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
        if self.cost == "bytes":
            return None  # balancing weights: the links do not enter
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


# Note [relative warm-up]: the seed's warm_up is a count of sequential steps, the same for a 4-step
# and a 50-step call. A fraction (0 < f < 1) is ceil(f x steps) of each denoising loop, at least 1.
# "auto" is what the warm-up table in BENCHMARKS.md chose: a tenth of the steps (AUTO_WARM_UP),
# rounded up, and at least two (AUTO_MIN_WARM_UP: the second sequential step bought the most on
# every trained model, most of all at 4 and 8 steps), but never every step (at least one step
# stays asynchronous): 4 steps -> 2, 8 -> 2, 25 -> 3, 50 -> 5.
# The engine resolves it at the first step of every loop, from the loop's step count (the
# scheduler's timesteps from where the loop begins, per scheduler order), so a call of another
# length gets its own count. An int keeps the seed's meaning exactly.


def check_warm_up(warm_up: WarmUp) -> WarmUp:
    """``warm_up`` if it is an integer >= 0, a fraction strictly between 0 and 1, or "auto"."""
    if isinstance(warm_up, bool) or not (isinstance(warm_up, int) and warm_up >= 0 or warm_up == "auto"
                                         or isinstance(warm_up, float) and 0 < warm_up < 1):
        raise ValueError(f"warm_up={warm_up!r} must be an integer >= 0 (sequential steps per call), a fraction "
                         f"0 < f < 1 of each loop's steps, or 'auto' (Note [relative warm-up])")
    return warm_up


def relative_warm_up(warm_up: WarmUp, loop_steps: Any) -> WarmUp:
    """``warm_up`` checked, unless it is relative and the engine is not told its loops' steps (``loop_steps`` None)."""
    check_warm_up(warm_up)
    if not isinstance(warm_up, int) and loop_steps is None:
        raise ValueError(f"warm_up={warm_up!r} is relative to the steps of each denoising loop, which this engine "
                         f"is not told: pass loop_steps (AsyncDiff does, from the scheduler) or an integer warm_up")
    return warm_up


def warm_up_steps(warm_up: WarmUp, steps: int | None) -> int:
    """The sequential steps ``warm_up`` means in a loop of ``steps`` steps (None: not known, then a
    relative warm-up is 1). Note [relative warm-up]."""
    if isinstance(warm_up, int):
        return warm_up
    if not steps:
        return 1
    if warm_up == "auto":
        return max(1, min(steps - 1, max(AUTO_MIN_WARM_UP, math.ceil(AUTO_WARM_UP * steps - 1e-9))))
    return max(1, math.ceil(float(warm_up) * steps - 1e-9))
