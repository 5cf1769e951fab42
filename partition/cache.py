"""Plans kept on disk, so that the same call plans the same way in every run.

Note [plan cache]: a plan made from measured block times depends on the noise of one timing run:
two runs of the same command could cut differently and so give different images for the same
seed. A plan is therefore a function of what it was made for, and made only once: the traced
graph (its nodes, every value's shape and dtype), the planning options (stages, cost model,
link, layouts, ``max_slowdown``) and the device kind. Their hash names a JSON file in the cache
directory; a later run with the same key reads the plan from there instead of measuring again,
and says so ("cached at PATH"). ``replan=True`` (``--replan``) measures anew and overwrites the
file. Only the planning rank reads and writes the cache; every rank still uses that rank's plan.

The directory is ``$ASYNCDIFF_PLAN_CACHE``, else ``$XDG_CACHE_HOME/asyncdiff/plans``, else
``~/.cache/asyncdiff/plans``; ``ASYNCDIFF_PLAN_CACHE=off`` turns the cache off (every run plans).

Example:
    >>> import tempfile, torch
    >>> from asyncdiff.partition.plan import Plan
    >>> from asyncdiff.partition.trace import trace_denoiser
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> traced = trace_denoiser(net, (torch.randn(1, 4),), {})
    >>> cache = PlanCache(tempfile.mkdtemp())
    >>> key = plan_key(traced, {"stages": 2, "cost": "time"}, device="cpu")
    >>> cache.load(key) is None
    True
    >>> path = cache.store(key, Plan(stages=(("0",), ("1",))))
    >>> cache.load(key).stages
    (('0',), ('1',))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from asyncdiff.partition.auto import auto_plan, candidate_plans
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import BlockCost
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["PlanCache", "cached_choice", "cached_plan", "device_kind", "plan_key"]


def device_kind(device: torch.device | str) -> str:
    """``"cpu"``, or the GPU's name (``"cuda:NVIDIA H200"``): plans from measured times are per kind."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def plan_key(traced: TracedDenoiser, options: Mapping[str, Any], device: str) -> str:
    """The hash of what a plan depends on (Note [plan cache])."""
    material = {
        "graph": str(traced.graph),
        "values": sorted((name, spec.shape, spec.dtype) for name, spec in traced.specs.items()),
        "blocks": list(traced.blocks),
        "options": {k: options[k] for k in sorted(options)},
        "device": device,
    }
    return hashlib.sha256(json.dumps(material, default=repr).encode()).hexdigest()[:24]


class PlanCache:
    """A directory of plan files named by :func:`plan_key`; ``directory=None``: the default place."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else _default_directory()

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.json"

    def load(self, key: str) -> Plan | None:
        if self.directory is None or not self.path(key).is_file():
            return None
        try:
            return Plan.from_json(self.path(key).read_text())
        except (ValueError, OSError):  # a damaged or foreign file: plan anew (and overwrite it)
            return None

    def store(self, key: str, plan: Plan) -> Path | None:
        """Write ``plan`` under ``key``; None where the cache is off or cannot be written (a
        read-only home): the run goes on with its plan, which is then not kept."""
        if self.directory is None:
            return None
        path = self.path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(plan.to_json())
            tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
        except OSError:
            return None
        return path


def cached_plan(traced: TracedDenoiser, model_n: int, profile: Callable[[], Mapping[str, BlockCost]], *,
                cost: str, bandwidth: float | None, layouts: Sequence[str], max_slowdown: float, device: str,
                replan: bool = False, cache: PlanCache | None = None) -> tuple[Plan, str]:
    """The plan for ``traced`` with these options, and where it came from (Note [plan cache]):
    the cached one, or one planned now from ``profile()`` and saved."""
    cache = cache if cache is not None else PlanCache()
    options = {"stages": model_n, "cost": cost, "bandwidth": bandwidth, "layouts": list(layouts),
               "max_slowdown": float(max_slowdown)}
    key = plan_key(traced, options, device)
    found = None if replan or not cache.enabled else cache.load(key)
    if found is not None and found.model_n == model_n:
        return found, f"cached at {cache.path(key)}"
    plan = auto_plan(traced, profile(), model_n, cost=cost, bandwidth=bandwidth, layouts=layouts,
                     max_slowdown=max_slowdown)
    path = cache.store(key, plan)
    made = {"time": "measured now", "flops": "counted now (FLOPs)"}.get(cost, f"counted now ({cost})")
    return plan, f"{made}, saved to {path}" if path else f"{made}, not cached"


def cached_choice(traced: TracedDenoiser, model_n: int, profile: Callable[[], Mapping[str, BlockCost]], *,
                  cost: str, bandwidth: float | None, layouts: Sequence[str], max_slowdown: float, device: str,
                  depth_slowdown: float, replan: bool = False,
                  cache: PlanCache | None = None) -> tuple[Plan, str, list[Plan], str]:
    """Note [fidelity rule]: ``(plan, source, candidates, key)``: the plan the fidelity rule chose
    for this call before (cached; no candidates), or, planned now from ``profile()``, the
    candidates to measure and the key to store the measured choice under
    (:meth:`PlanCache.store`); the plan is then the provisional one, the depth rule's (within
    ``depth_slowdown``), which runs until the choice and stays where nothing is measured, and the
    source says how the candidates were made. A single candidate is the choice."""
    cache = cache if cache is not None else PlanCache()
    options = {"stages": model_n, "cost": cost, "bandwidth": bandwidth, "layouts": list(layouts),
               "max_slowdown": float(max_slowdown), "rule": "fidelity"}
    key = plan_key(traced, options, device)
    found = None if replan or not cache.enabled else cache.load(key)
    if found is not None and found.model_n == model_n:
        return found, f"cached at {cache.path(key)}", [], key
    costs = profile()
    plans = candidate_plans(traced, costs, model_n, cost=cost, bandwidth=bandwidth, layouts=layouts,
                            max_slowdown=max_slowdown)
    provisional = auto_plan(traced, costs, model_n, cost=cost, bandwidth=bandwidth, layouts=layouts,
                            max_slowdown=depth_slowdown)
    if all(p.stages != provisional.stages for p in plans):
        plans.append(provisional)
    made = {"time": "measured now", "flops": "counted now (FLOPs)"}.get(cost, f"counted now ({cost})")
    if len(plans) == 1:
        path = cache.store(key, plans[0])
        return plans[0], f"{made}, the only plan within {max_slowdown:.0%} of the fastest, " + (
            f"saved to {path}" if path else "not cached"), [], key
    return provisional, made, plans, key


def _default_directory() -> Path | None:
    chosen = os.environ.get("ASYNCDIFF_PLAN_CACHE")
    if chosen is not None:
        return None if chosen.lower() in ("", "off", "0", "none") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncdiff" / "plans"
