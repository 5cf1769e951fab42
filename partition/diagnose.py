"""Why a trace failed, told by type: :class:`TraceError` with a stable ``reason`` (one of
:data:`TRACE_REASONS`), found from the exception's type and the torch.fx function that raised it,
never from its message (issue 25); and the module it failed in, and the block without a meta shape."""

from __future__ import annotations

import contextlib
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch.overrides import TorchFunctionMode

from asyncdiff.partition.specs import ROOT

__all__ = ["TRACE_REASONS", "TraceError", "MetaValueReads", "ValueRead", "innermost_module", "meta_error",
           "meta_failures", "trace_reason"]


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


def meta_error(denoiser: torch.nn.Module, target: str, failure: BaseException) -> TraceError:
    """The trace stopped at ``target``, which MetaTracer could not run on meta tensors (``failure``)."""
    message = str(failure).strip().splitlines()[0][:200] if str(failure).strip() else type(failure).__name__
    return TraceError(f"tracing {type(denoiser).__name__}: {target.removeprefix(f'{ROOT}.')!r} cannot run on meta "
                      f"tensors to infer its output shape ({message}); {meta_hint(target, failure)}",
                      "no-meta-shape")


VALUE_OPS = frozenset({"item", "tolist", "nonzero", "bincount", "unique", "unique_consecutive", "masked_select",
                       "argwhere", "repeat_interleave"})


def meta_hint(target: str, failure: BaseException) -> str:
    """Why a block cannot run on meta tensors, in words (issue 11: name the real cause), told by
    the failing op and the exception's type (issue 25), not by its text."""
    if any(f.name == "proxys_to_metas" for f in traceback.extract_tb(failure.__traceback__)):
        # an argument is a proxy without a meta value: an upstream op lost it
        return ("an input's shape was lost earlier in the trace (a data-dependent shape, such as boolean-mask "
                "indexing, upstream)")
    if target.rsplit(".", 1)[-1] in VALUE_OPS or isinstance(failure, (ValueRead, NotImplementedError)):
        return ("its output depends on tensor values (a data-dependent shape, a read of values, or an op without "
                "a meta kernel), which a trace cannot know: asyncdiff cannot partition this denoiser at this block")
    return "make the code depend on shapes only, or use a policy where it sits inside a larger block"


class MetaValueReads(TorchFunctionMode):
    """A read of a meta tensor's value as a Python value (``bool``, ``item``, ...) raises
    :class:`ValueRead`, so that a meta failure says by its type that the code reads values
    (torch raises a plain ``RuntimeError``)."""

    READS = frozenset({torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
                       torch.Tensor.__float__, torch.Tensor.__index__})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func in self.READS and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            raise ValueRead(f"the code reads a tensor's value ({func.__name__}), which meta tensors do not have")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_failures() -> Iterator[list[BaseException]]:
    """The exceptions MetaTracer catches when it cannot compute a node's meta value (it only warns
    with their text): each is the exception being handled when its warning is shown."""
    caught: list[BaseException] = []

    def show(message: Any, category: type[Warning], *rest: Any) -> None:
        failure = sys.exc_info()[1]
        caught.append(failure if failure is not None else RuntimeError(str(message)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield caught


def innermost_module(err: BaseException, root: torch.nn.Module) -> str | None:
    names = {id(m): f"{name} ({type(m).__name__})" for name, m in root.named_modules() if name}
    tb, where = err.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names and tb.tb_frame.f_code.co_name == "forward":
            where = names[id(owner)]
        tb = tb.tb_next
    return where
