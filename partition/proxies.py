"""The tracer's proxies: :class:`ShapeProxy` answers shape questions from its meta value (and,
under a value trace, value questions from its real value, Note [value trace]); augmented and item
assignment are recorded as in-place updates (Note [in-place updates]); :class:`TracedDevice` is a
traced value's ``.device``; and the patches under which a trace runs (:func:`proxies_are_tensors`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.meta_tracer import MetaDeviceAttribute, MetaProxy

from asyncdiff.partition.diagnose import ValueRead
from asyncdiff.partition.passes import INPLACE_OPS, setitem

__all__ = ["MetaAutocast", "ShapeProxy", "TracedDevice", "proxies_are_tensors"]


class ShapeProxy(MetaProxy):
    """Answers ``numel()``, ``ndim`` and ``len()`` from the meta value, as MetaProxy does for ``size()``."""

    @property
    def ndim(self) -> Any:
        return self.dim()

    # tensor attributes that are values (MetaProxy's lazy attribute would carry no meta value)
    T = property(lambda self: self._attribute("T"))
    mT = property(lambda self: self._attribute("mT"))
    H = property(lambda self: self._attribute("H"))
    mH = property(lambda self: self._attribute("mH"))
    real = property(lambda self: self._attribute("real"))
    imag = property(lambda self: self._attribute("imag"))

    def _attribute(self, name: str) -> Any:
        return self.tracer.create_proxy("call_function", getattr, (self, name), {})

    @property
    def device(self) -> TracedDevice:
        return TracedDevice(self, "device")

    @property
    def data(self) -> ShapeProxy:
        # `.data` is the same storage without autograd history; inference runs without autograd
        return self

    def __len__(self) -> int:
        meta = getattr(self, "_tensor_meta", None)
        if isinstance(meta, (torch.Tensor, tuple, list)):
            return len(meta)
        return super().__len__()

    def numel(self) -> Any:
        meta = getattr(self, "_tensor_meta", None)
        if meta is not None:
            return meta.numel()
        return self.tracer.create_proxy("call_method", "numel", (self,), {})

    def size(self, dim: int | None = None) -> Any:
        # MetaProxy.size tests `if dim:`, so size(0) gave the whole shape (issue 11)
        meta = getattr(self, "_tensor_meta", None)
        if isinstance(meta, torch.Tensor):
            return meta.size() if dim is None else meta.size(dim)
        return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})

    def __bool__(self) -> bool:
        if hasattr(self.tracer, "decide"):  # a value tracer (Note [value trace])
            return self.tracer.decide(self, bool, "a branch on a tensor")
        return super().__bool__()

    def __int__(self) -> int:
        if hasattr(self.tracer, "decide"):
            return self.tracer.decide(self, int, "an integer read from a tensor")
        raise ValueRead("a traced value cannot be read as a Python int")

    __index__ = __int__

    def __float__(self) -> float:
        # without this, float() would fall back to __index__ and truncate
        raise ValueRead("float() argument cannot be a traced value: the code reads a tensor's value as a Python "
                        "float, which differs every call")

    def __complex__(self) -> complex:
        raise ValueRead("complex() argument cannot be a traced value")

    def __iter__(self) -> Iterator[Any]:
        # a value of known length (a tensor's first dimension, a tuple of tensors) iterates as
        # its items, like eager code: `for x in t.split(...)`, `zip(params, chunks)`, `list(...)`
        meta = getattr(self, "_tensor_meta", None)
        if isinstance(meta, (torch.Tensor, tuple, list)) and not (isinstance(meta, torch.Tensor) and meta.dim() == 0):
            return iter([self[i] for i in range(len(meta))])
        return super().__iter__()


class TracedDevice(MetaDeviceAttribute):
    """A traced value's ``.device``: in the graph a read of the device (every rank reads its own),
    while the traced code asks about it (``x.device.type == "mps"``, ``t.device != x.device``) it
    is the device the traced call's tensors live on: the trace specialises on it, as on shapes."""

    @property
    def _real(self) -> torch.device:
        return self.tracer.device

    @property
    def type(self) -> str:
        return self._real.type

    @property
    def index(self) -> int | None:
        return self._real.index

    def __eq__(self, other: object) -> bool:  # type: ignore[override]
        if isinstance(other, TracedDevice):
            return True
        try:
            return self._real == torch.device(other)  # type: ignore[arg-type]
        except (TypeError, RuntimeError):
            return False

    def __ne__(self, other: object) -> bool:  # type: ignore[override]
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self._real)


def _inplace_method(op: Any) -> Any:
    def method(self: ShapeProxy, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name, _op in INPLACE_OPS.items():
    setattr(ShapeProxy, _name, _inplace_method(_op))


def _setitem_method(self: ShapeProxy, index: Any, value: Any) -> None:
    self.tracer.create_proxy("call_function", setitem, (self, index, value), {})


ShapeProxy.__setitem__ = _setitem_method  # type: ignore[method-assign]


@contextlib.contextmanager
def proxies_are_tensors() -> Iterator[None]:
    # diffusers takes a `torch.tensor([timesteps])` path when `torch.is_tensor(t)` is False.
    # Blocks run on meta tensors to learn their output shapes; `torch.autocast(x.device.type)`
    # inside one (rotary embeddings) would ask for a "meta" autocast, which does not exist.
    original, autocast = torch.is_tensor, torch.autocast
    torch.is_tensor = lambda obj: isinstance(obj, (torch.Tensor, torch.fx.Proxy))  # type: ignore[assignment]
    torch.autocast = torch.amp.autocast = MetaAutocast  # type: ignore[misc]
    try:
        yield
    finally:
        torch.is_tensor = original
        torch.autocast = torch.amp.autocast = autocast  # type: ignore[misc]


class MetaAutocast(torch.autocast):
    """``torch.autocast`` that takes device type "meta" as "cpu" (the shapes are the same)."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)
