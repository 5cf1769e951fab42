"""Why a trace failed, told by type: :class:`TraceError` with a stable ``reason`` (one of
:data:`TRACE_REASONS`), found from the exception's type and the torch.fx function that raised it,
never from its message (issue 25); and the module it failed in, and the block without a meta shape."""

from __future__ import annotations

import contextlib
import re
import traceback
import warnings
from collections.abc import Iterator

import torch
import torch.fx

from asyncdiff.partition.specs import ROOT

__all__ = ["TRACE_REASONS", "TraceError", "ValueRead", "innermost_module", "meta_error", "quiet_meta_warnings",
           "trace_reason"]


class TraceError(RuntimeError):
    """The denoiser could not be traced at the requested block granularity; ``reason``: the cause
    as a stable word, one of :data:`TRACE_REASONS`, told by the exception's type and the function
    that raised it, never by its message (issue 25)."""

    def __init__(self, message: str, reason: str = "untraceable") -> None:
        super().__init__(message)
        self.reason = reason


class ValueRead(TypeError):
    """Traced code read a traced value as a Python number (``float(x)``, ``int(x)``)."""


TRACE_REASONS = {
    "non-tensor-argument": "The code hands an object that is not a tensor (a KV cache, a custom state) to a block, "
                           "which a traced program cannot carry between stages",
    "reads-a-number": "The code reads a tensor's value as a Python number, which a traced program cannot hold",
    "branches-on-values": "The code branches on a tensor's values, which a trace cannot follow",
    "iterates": "The code iterates over a value of unknown length",
    "untraceable": "The tracer cannot run this code on meta tensors",
    "unknown-constant": "The traced code made a tensor constant whose value the trace cannot know",
    "no-meta-shape": "A block cannot run on meta tensors to infer its output shape",
}


def trace_reason(err: BaseException) -> str:
    """Why tracing failed, as a key of :data:`TRACE_REASONS`: by the exception's type and the
    torch.fx function that raised it (``create_arg``, ``to_bool``, ``iter``), not by its text."""
    fx = {f.name for f in traceback.extract_tb(err.__traceback__) if "torch/fx/" in f.filename.replace("\\", "/")}
    if isinstance(err, ValueRead):
        return "reads-a-number"
    if isinstance(err, NotImplementedError) and "create_arg" in fx:
        return "non-tensor-argument"
    if isinstance(err, torch.fx.proxy.TraceError) and "to_bool" in fx:
        return "branches-on-values"
    if isinstance(err, torch.fx.proxy.TraceError) and "iter" in fx:
        return "iterates"
    return "untraceable"


def meta_error(denoiser: torch.nn.Module, target: str, reason: str) -> TraceError:
    return TraceError(f"tracing {type(denoiser).__name__}: {target.removeprefix(f'{ROOT}.')!r} cannot run on meta "
                      f"tensors to infer its output shape ({reason.strip().splitlines()[0][:200]}); {meta_hint(reason)}",
                      "no-meta-shape")


def meta_hint(reason: str) -> str:
    """Why a block cannot run on meta tensors, in words (issue 11: name the real cause)."""
    if any(k in reason for k in ("item()", "data-dependent", "nonzero", "bincount", "unique", "masked_select",
                                 "copy out of meta")):
        return ("its output depends on tensor values (a data-dependent shape or a branch on values), which a "
                "trace cannot know: asyncdiff cannot partition this denoiser at this block")
    if "does not have an associated meta" in reason:
        return ("an input's shape was lost earlier in the trace (a data-dependent shape, such as boolean-mask "
                "indexing, upstream)")
    return "make the code depend on shapes only, or use a policy where it sits inside a larger block"


@contextlib.contextmanager
def quiet_meta_warnings() -> Iterator[list[tuple[str, str]]]:
    """Collect MetaTracer's "could not compute metadata" warnings as (target, reason), also
    when the trace fails (a value without a shape fails later, elsewhere)."""
    caught: list[tuple[str, str]] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            yield caught
        finally:
            for record in records:
                found = re.match(r"Could not compute metadata for \w+ target (\S+): (.*)", str(record.message), re.S)
                if found:
                    caught.append((found.group(1), found.group(2)))


def innermost_module(err: BaseException, root: torch.nn.Module) -> str | None:
    names = {id(m): f"{name} ({type(m).__name__})" for name, m in root.named_modules() if name}
    tb, where = err.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names and tb.tb_frame.f_code.co_name == "forward":
            where = names[id(owner)]
        tb = tb.tb_next
    return where
