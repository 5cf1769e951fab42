"""How to split and run a denoiser: :class:`EngineConfig`, one frozen value validated once, and
the device arithmetic (:func:`stages_for`).

Example:
    >>> config = EngineConfig(model_n=2, guidance=2)
    >>> config.world_size, stages_for(config.world_size, 1, config.data)
    (4, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncdiff.engine.schedule import Schedule
from asyncdiff.kernels.pack import FP8
from asyncdiff.partition.auto import COSTS
from asyncdiff.partition.blocks import BlockPolicy
from asyncdiff.partition.planner import LAYOUTS, MAX_SLOWDOWN
from asyncdiff.partition.report import LINKS

__all__ = ["DEADLINE_FACTOR", "DEADLINE_FLOOR_S", "TRANSFER_DTYPES", "EngineConfig", "check_warm_up", "stages_for"]

DEADLINE_FACTOR = 10.0  # Note [deadlines] in runtime.py: a wait may take this many median steps
DEADLINE_FLOOR_S = 30.0  # and at least this long (a loaded machine's step varies)
TRANSFER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8": FP8}  # wire dtypes by name


def stages_for(devices: int, stride: int, data: int = 1) -> int:
    """How many stages ``devices`` processes run with ``stride`` in each of ``data`` slices (guidance
    x batch, Note [hybrid mesh]): one each for stride 1; for stride 2 the extra process repeats
    the last stage (Note [stride 2]). The inverse of :attr:`EngineConfig.world_size`; the one
    place this arithmetic lives."""
    return devices // data - stride + 1


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



def check_warm_up(warm_up: int) -> int:
    if not isinstance(warm_up, int) or warm_up < 0:
        raise ValueError(f"warm_up={warm_up!r} must be an integer >= 0 (sequential steps per call)")
    return warm_up
