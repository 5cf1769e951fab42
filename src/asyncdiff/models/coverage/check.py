"""Run coverage cases on a process group: sequential reference, then under AsyncDiff.

:func:`check_cases` runs on every rank of a group of ``model_n + stride - 1`` processes (use
:func:`asyncdiff.engine.launch.launch`). Per case it runs the plain pipeline, then the same call
under :class:`asyncdiff.AsyncDiff` with every step a warm-up step (which must equal the plain
pipeline: nothing is stale), then with warm-up 1 (which must run and stay finite). A case that
fails records the phase and the first line of the error, and the next case runs: an engine error
is raised on every rank (Note [errors] in engine/errors.py), so the ranks stay in step.

Example (starts processes, so not run as a doctest)::

    results = launch(check_cases, 2, ["flux", "sd15"], 3, 1)[0]
    results[0].status   # 'exact'
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ATOL", "CaseResult", "check_cases", "output_tensor"]

ATOL = 1e-5  # full warm-up: nothing is stale, so the result is the sequential one up to summation order
TIMEOUT_S = 60.0  # a case whose ranks fall out of step fails within this, and the next case runs
EVERY_STEP = 1000  # a warm-up longer than any case's denoiser calls (second-order schedulers call twice per step)


@dataclass
class CaseResult:
    """What one case did. ``status``: ``exact``, ``differs`` (full warm-up did not reproduce the
    plain pipeline: a defect), or ``error`` (``phase`` and ``error`` say where and why)."""

    name: str
    denoiser: str = ""  # the attributes and classes AsyncDiff split
    status: str = "error"
    phase: str = "build"
    error: str = ""
    max_diff: float | None = None
    stale_ok: bool | None = None  # warm-up 1 ran and stayed finite
    deviation: float | None = None  # warm-up 1 against the reference (relative)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def cell(self) -> str:
        if self.status == "exact":
            return "exact" if self.stale_ok is not False else "exact, async fails"
        if self.status == "differs":
            return f"differs ({self.max_diff:.2g})"
        return f"{self.phase}: {self.error}"


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor a pipeline call returned (``images``, ``frames`` or the first field)."""
    for value in (getattr(output, "images", None), getattr(output, "frames", None),
                  output[0] if isinstance(output, (tuple, list)) else None):
        if isinstance(value, torch.Tensor):
            return value.detach().float().cpu()
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return torch.stack([v.detach().float().cpu() for v in value])
        if value is not None and hasattr(value, "__array__"):
            return torch.as_tensor(value).float()
    raise TypeError(f"{type(output).__name__} carries no tensor output; give the case output_type='latent' or 'pt'")


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= 300 else f"{text[:150]} ... {text[-150:]}"  # the end names the first failure


def check_cases(names: list[str], steps: int = 3, stride: int = 1, stale: bool = True) -> list[CaseResult]:
    """Check coverage cases ``names`` on this process group (every rank calls it the same way)."""
    import warnings

    from asyncdiff import AsyncDiff
    from asyncdiff.models.coverage import case

    world = dist.get_world_size() if dist.is_initialized() else 1
    results = []
    for name in names:
        result, started = CaseResult(name), time.perf_counter()
        async_diff = None
        try:
            pipe, kwargs = case(name).build()

            def run() -> torch.Tensor:
                with torch.no_grad():
                    return output_tensor(pipe(num_inference_steps=steps,
                                              generator=torch.Generator().manual_seed(0), **kwargs))

            result.phase = "sequential"
            reference = run()
            result.phase = "setup"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                async_diff = AsyncDiff(pipe, model_n=world - stride + 1, stride=stride, warm_up=EVERY_STEP,
                                       timeout_s=TIMEOUT_S)
                result.denoiser = ", ".join(f"{name} ({type(e.denoiser).__name__})"
                                            for name, e in async_diff.engines.items())
                result.phase = "exact"
                exact = run()
            result.warnings = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                      if issubclass(w.category, UserWarning) and "asyncdiff" in w.filename})
            result.max_diff = (exact - reference).abs().max().item()
            result.status = "exact" if result.max_diff <= ATOL * max(1.0, reference.abs().max().item()) else "differs"
            if stale:
                result.phase = "async"
                async_diff.reset_state(warm_up=1)
                out = run()
                result.stale_ok = bool(torch.isfinite(out).all())
                result.deviation = ((out - reference).norm() / reference.norm().clamp_min(1e-12)).item()
            result.phase = ""
        except Exception as err:  # recorded per case; the next case runs
            result.status, result.error = "error", _first_line(err)
            if "ASYNCDIFF_COVERAGE_TRACEBACK" in os.environ:
                print(f"rank {dist.get_rank() if dist.is_initialized() else 0}, case {name}:", flush=True)
                traceback.print_exc()
        finally:
            if async_diff is not None:
                try:
                    async_diff.remove()
                except Exception as err:
                    if result.status != "error":  # an earlier phase's error is the one to report
                        result.status, result.phase, result.error = "error", "remove", _first_line(err)
        result.seconds = time.perf_counter() - started
        results.append(result)
    return results
