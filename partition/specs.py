"""What a trace is specialised on and carries: the call signature, tensor specs, the weight-free
copy a trace runs on, and block names (Note [specialised trace] in :mod:`asyncdiff.partition.trace`).

Example:
    >>> TensorSpec.of(torch.zeros(2, 3)).nbytes, module_of("blocks.0#2")
    (24, 'blocks.0')
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["ROOT", "CallSignature", "TensorSpec", "constant_key", "memory_order", "meta_copy", "module_of",
           "module_tensors"]

ROOT = "denoiser"  # attribute under which the traced root holds the denoiser


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str
    order: tuple[int, ...] = ()  # a dense, non-contiguous value's dims, outermost first (Note [strides on the wire])

    @classmethod
    def of(cls, t: torch.Tensor, strided: bool = False) -> TensorSpec:
        """``strided``: record the memory order too (values of the graph; not call inputs, whose
        specs key the trace)."""
        return cls(tuple(t.shape), str(t.dtype).removeprefix("torch."), memory_order(t) if strided else ())

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.torch_dtype).element_size()


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """Note [strides on the wire]: the permutation of ``t``'s dims, outermost in memory first, where
    ``t`` is dense but not contiguous (an attention output transposed back, a channels-last
    activation); ``()`` where it is contiguous, or not dense (a slice, an expanded view).

    Example:
        >>> memory_order(torch.empty(2, 3, 4).transpose(1, 2)), memory_order(torch.empty(2, 3))
        ((0, 2, 1), ())
    """
    if t.dim() < 2 or t.is_contiguous():
        return ()
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))  # stable: ties keep the dim order
    return order if t.permute(order).is_contiguous() else ()


@dataclass(frozen=True)
class CallSignature:
    """What a trace is specialised on (Note [specialised trace])."""

    tree: pytree.TreeSpec
    leaves: tuple[Any, ...]  # TensorSpec for tensors, the value itself otherwise

    @classmethod
    def of(cls, arguments: dict[str, Any]) -> tuple[CallSignature, list[torch.Tensor]]:
        leaves, tree = pytree.tree_flatten(arguments)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        keys = tuple(TensorSpec.of(x) if isinstance(x, torch.Tensor) else constant_key(x) for x in leaves)
        return cls(tree, keys), tensors


def constant_key(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return ("unhashable", type(x).__name__, id(x))


def meta_copy(module: torch.nn.Module, shapes: Mapping[str, torch.Size] | None = None) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters and buffers live on ``meta`` (no memory).
    ``shapes``: the true shapes of tensors (by qualified name) that are placeholders here."""
    memo: dict[int, Any] = {}
    shapes = shapes or {}
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        meta = torch.empty(shapes[name], dtype=t.dtype, device="meta") if name in shapes \
            else torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def module_of(block: str) -> str:
    """The qualified module name of a block (Note [block names])."""
    return block.split("#", 1)[0]


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
