"""Trace a denoiser into a graph of *blocks* with torch.fx.

Plain ``torch.fx.symbolic_trace`` fails on diffusers denoisers: their top-level ``forward``
branches on shapes. Here proxies carry ``meta`` tensors (``torch.fx.experimental.meta_tracer``),
so shapes are concrete and those branches specialise to the traced call. Blocks (see
:mod:`asyncdiff.partition.blocks`) are leaves. The trace runs on a weight-free ``meta`` copy of
the denoiser, so it costs no memory and works on models whose weights were released or never
materialized; the graph refers to blocks by qualified name and runs on the real module.

Note [specialised trace]: a trace holds for one *call signature*: the shapes and dtypes of the
tensor arguments and the values of the other arguments (``return_dict``, ``None`` inputs).
:class:`CallSignature` is that key; callers re-trace when it changes.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> traced = trace_denoiser(net, (torch.randn(3, 4),), {})
    >>> traced.blocks
    ('0', '1', '2')
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import re
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.meta_tracer import MetaDeviceAttribute, MetaProxy, MetaTracer

from asyncdiff.partition.blocks import CONTAINERS, BlockPolicy

__all__ = ["CallSignature", "TensorSpec", "TraceError", "TracedDenoiser", "holder", "memory_order", "meta_copy", "module_of",
           "trace_denoiser", "updated_base"]

ROOT = "denoiser"  # attribute under which the traced root holds the denoiser


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
        keys = tuple(TensorSpec.of(x) if isinstance(x, torch.Tensor) else _constant_key(x) for x in leaves)
        return cls(tree, keys), tensors


def _constant_key(x: Any) -> Any:
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


def _identifier(path: tuple[Any, ...]) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    name = re.sub(r"\W", "_", "_".join(parts)) or "arg"
    return name if not name[0].isdigit() else f"arg_{name}"


class _Root(torch.nn.Module):
    """Holds the denoiser; its generated ``forward`` takes the tensor leaves of one call signature."""

    def __init__(self, denoiser: torch.nn.Module, signature: inspect.Signature, template: list[Any],
                 tree: pytree.TreeSpec, tensor_slots: list[int]) -> None:
        super().__init__()
        setattr(self, ROOT, denoiser)
        self._signature, self._template, self._tree, self._slots = signature, template, tree, tensor_slots
        self.out_spec: pytree.TreeSpec | None = None

    def _run(self, tensors: tuple[Any, ...]) -> tuple[Any, ...]:
        leaves = list(self._template)
        for slot, t in zip(self._slots, tensors):
            leaves[slot] = t
        bound = inspect.BoundArguments(self._signature, pytree.tree_unflatten(leaves, self._tree))
        flat, self.out_spec = pytree.tree_flatten(getattr(self, ROOT)(*bound.args, **bound.kwargs))
        return tuple(flat)


def _make_root(denoiser: torch.nn.Module, arguments: dict[str, Any]) -> tuple[_Root, list[str]]:
    with_path, tree = pytree.tree_flatten_with_path(arguments)
    template = [None if isinstance(v, torch.Tensor) else v for _, v in with_path]
    slots = [i for i, (_, v) in enumerate(with_path) if isinstance(v, torch.Tensor)]
    names: list[str] = []
    for i in slots:
        name = _identifier(with_path[i][0])
        while name in names:
            name += "_"
        names.append(name)
    params = ", ".join(names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self._run(({params}{',' if names else ''}))\n", namespace)
    cls = type(f"Traced{type(denoiser).__name__}", (_Root,), {"forward": namespace["forward"]})
    return cls(denoiser, inspect.signature(denoiser.forward), template, tree, slots), names


class _ShapeProxy(MetaProxy):
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
    def device(self) -> _Device:
        return _Device(self, "device")

    @property
    def data(self) -> _ShapeProxy:
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
        if isinstance(self.tracer, _ValueTracer):  # Note [value trace]
            return self.tracer.decide(self, bool, "a branch on a tensor")
        return super().__bool__()

    def __int__(self) -> int:
        if isinstance(self.tracer, _ValueTracer):
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


class _Device(MetaDeviceAttribute):
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
        if isinstance(other, _Device):
            return True
        try:
            return self._real == torch.device(other)  # type: ignore[arg-type]
        except (TypeError, RuntimeError):
            return False

    def __ne__(self, other: object) -> bool:  # type: ignore[override]
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self._real)


# Note [in-place updates]: Python runs ``x += y`` as ``x = x.__iadd__(y)``, and a torch.fx proxy
# without ``__iadd__`` falls back to ``x = x + y``: a new value, while eager code mutates the one
# tensor that every other holder (a skip-connection tuple, say) also sees. So augmented
# assignments on traced values are recorded as the in-place operators themselves; at run time
# they mutate the same tensor as eager code does (and keep its dtype). The planner keeps the
# blocks from the mutated value's producer to the update on one stage (``inplace_spans``), so
# that everything sent from there is sent after the update, as eager code would have read it.
INPLACE_OPS = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
               "__itruediv__": operator.itruediv}


def _inplace_method(op: Any) -> Any:
    def method(self: _ShapeProxy, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name, _op in INPLACE_OPS.items():
    setattr(_ShapeProxy, _name, _inplace_method(_op))


def setitem(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``x[index] = value``, returning ``x``: item assignment as a graph node (Note [in-place updates])."""
    x[index] = value
    return x


def after(x: torch.Tensor, *updates: Any) -> torch.Tensor:
    """``x``, once ``updates`` (in-place updates of ``x`` or of a view of it) have run."""
    return x


def _setitem_method(self: _ShapeProxy, index: Any, value: Any) -> None:
    self.tracer.create_proxy("call_function", setitem, (self, index, value), {})


_ShapeProxy.__setitem__ = _setitem_method  # type: ignore[method-assign]
# views share their base's storage: an in-place update of a view updates the base
_VIEW_METHODS = {"view", "view_as", "reshape", "transpose", "permute", "unflatten", "flatten", "squeeze",
                 "unsqueeze", "narrow", "select", "expand", "chunk", "split", "unbind", "as_strided", "t"}
# in-place methods that do not update their tensor's values
_NOT_UPDATES = {"requires_grad_", "share_memory_", "retain_grad_"}


def updated_base(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor an in-place node updates, seen through views (``x.data[:, 1:].copy_(...)``
    updates ``x``); ``None`` if ``node`` updates nothing."""
    if node.op == "call_function" and (node.target in INPLACE_OPS.values() or node.target is setitem):
        target = node.args[0]
    elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("__") \
            and node.target not in _NOT_UPDATES:
        target = node.args[0]
    else:
        return None
    while isinstance(target, torch.fx.Node):
        if target.op == "call_function" and target.target in (operator.getitem, getattr) and \
                (target.target is not getattr or target.args[1] == "data"):
            target = target.args[0]
        elif target.op == "call_method" and target.target in _VIEW_METHODS:
            target = target.args[0]
        else:
            return target
    return None


def _order_updates(graph: torch.fx.Graph) -> None:
    """Note [in-place updates]: a node that reads a tensor after an in-place update of it (or of a
    view of it) reads ``after(tensor, update)`` instead, so the graph's edges say that the update
    comes first; for ``x += y`` Python's rebinding already does."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        base = updated_base(node)
        if base is None or (node.op == "call_function" and node.target in INPLACE_OPS.values() and node.args[0] is base):
            continue
        later = [u for u in base.users if order.get(u, -1) > order[node] and u is not node]
        if not later:
            continue
        with graph.inserting_after(node):
            ordered = graph.call_function(after, (base, node))
        if "asyncdiff_value" in base.meta:
            ordered.meta["asyncdiff_value"] = base.meta["asyncdiff_value"]
        order[ordered] = order[node]
        for user in later:
            user.replace_input_with(base, ordered)


# Note [merged blocks]: a block that holds weights and is called more than once per denoiser call
# (CogView4 runs one feed-forward on the image and on the text tokens) must run on one stage. The
# trace then makes the nearest module that contains it a block instead and traces again;
# ``TracedDenoiser.merged`` lists such modules, and inspect shows them. Where only the denoiser
# itself contains the calls (Stable Cascade's decoder loops over ModuleLists of blocks), the
# blocks stay, and the planner keeps every block from a module's first call to its last on one
# stage (``TracedDenoiser.repeated_spans``).
class _BlockTracer(MetaTracer):
    proxy_buffer_attributes = True  # a buffer read in traced code stays a reference to the buffer

    def __init__(self, blocks: set[str], device: torch.device) -> None:
        super().__init__()
        self.block_paths = {f"{ROOT}.{b}" for b in blocks}
        self.device = device  # where the traced call's tensors live (_Device)
        self.node_meta: dict[torch.fx.Node, Any] = {}

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     *rest: Any, **options: Any) -> Any:
        forward = getattr(self, "orig_forward", None)  # the leaf's forward; its children's calls replace it
        stack = copy.copy(self.module_stack)  # a failed meta run of a leaf leaves its children on it
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        if records:
            self.module_stack = stack
        if records and kind in ("call_function", "call_method", "call_module") and any(
                isinstance(v, torch.Tensor) and not v.is_meta for v in pytree.tree_leaves((args, kwargs))):
            # MetaTracer cannot mix a tensor constant (Note [tensor constants]) with meta values
            meta = self._meta_with_constants(kind, target if kind != "call_module" else forward, args, kwargs)
            if meta is not None:
                proxy.install_tensor_meta(meta)
                records = []
        for record in records:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
        meta = getattr(proxy, "_tensor_meta", None)
        if meta is not None and any(isinstance(t, torch.Tensor) and not t.is_meta for t in pytree.tree_leaves(meta)):
            # an op on a tensor constant and a meta value can answer with a real tensor (indexing a
            # cached CPU table by traced ids): its shape is what the trace needs, on meta
            meta = pytree.tree_map(lambda t: torch.empty_like(t, device="meta")
                                   if isinstance(t, torch.Tensor) and not t.is_meta else t, meta)
            proxy.install_tensor_meta(meta)
        # MetaTracer keeps each node's meta value on the proxy only; keep it per node.
        if meta is not None:
            self.node_meta[proxy.node] = meta
        return proxy

    def proxy(self, node: torch.fx.Node) -> _ShapeProxy:
        return _ShapeProxy(node, self)

    def _meta_with_constants(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def to_meta(v: Any) -> Any:
            if isinstance(v, torch.fx.Proxy):
                return getattr(v, "_tensor_meta", v)
            if isinstance(v, torch.Tensor) and not v.is_meta:
                return v.to("meta")
            return v

        args, kwargs = pytree.tree_map(to_meta, (args, kwargs))
        if any(isinstance(v, torch.fx.Proxy) for v in pytree.tree_leaves((args, kwargs))):
            return None  # an input without a meta value: the failure is elsewhere
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            self._disable_module_getattr = True
            try:
                return target(*args, **kwargs)
            finally:
                self._disable_module_getattr = False
        except Exception:
            return None

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.block_paths


# Note [value trace]: where the meta trace cannot know a shape or a branch (it depends on tensor
# values: mixture-of-experts routing, `nonzero`, boolean-mask indexing, `tolist()` lengths,
# `if torch.all(x == 0)`), and the denoiser's weights are all here, the trace runs again with
# proxies that carry the *real* values of the traced call: every node is computed on the real
# weights, once, as the call itself would compute it. Shapes are then concrete wherever they
# come from; a Python decision on a value (`bool`, `int` of a traced value) takes the traced
# call's answer and leaves a `guard` in the graph, which raises at run time if a later call would
# decide otherwise: the program is specialised on those values as on shapes, never silently wrong.


def guard(value: Any, expected: Any, what: str) -> None:
    """Raise unless ``what`` of ``value`` is still ``expected`` (Note [value trace])."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        return  # a run for shapes only (FLOP counting on meta tensors) has no value to check
    got = bool(value) if isinstance(expected, bool) else (float(value) if isinstance(expected, float) else int(value))
    if got != expected:
        raise RuntimeError(f"the denoiser's control flow depends on a tensor value ({what}: traced as {expected!r}, now "
                           f"{got!r}); its traced program does not hold for this call. Such a denoiser runs exactly "
                           "only while that value stays as traced")


@contextlib.contextmanager
def _eager_modules() -> Iterator[None]:
    """Module calls and attribute reads as outside a trace (torch.fx patches them while tracing)."""
    from torch.fx import _symbolic_trace as fx_trace

    call, getattr_ = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    torch.nn.Module.__call__, torch.nn.Module.__getattr__ = fx_trace._orig_module_call, fx_trace._orig_module_getattr
    try:
        yield
    finally:
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = call, getattr_


class _ValueTracer(_BlockTracer):
    """Note [value trace]: a block tracer whose proxies carry the traced call's real values,
    computed with ``real``'s weights."""

    def __init__(self, blocks: set[str], device: torch.device, real: torch.nn.Module) -> None:
        super().__init__(blocks, device)
        self.real = real
        self.guards: list[torch.fx.Node] = []

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     *rest: Any, **options: Any) -> Any:
        proxy = torch.fx.Tracer.create_proxy(self, kind, target, args, kwargs, *rest, **options)
        if kind == "placeholder":
            value = self.meta_args.get(target)
        elif kind == "get_attr":
            value = self._real_attr(str(target))
        elif kind in ("call_function", "call_method", "call_module"):
            value = self._compute(kind, target, args, kwargs)
        else:
            return proxy
        proxy.install_tensor_meta(value)
        self.node_meta[proxy.node] = pytree.tree_map(
            lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t, value)
        return proxy

    def _real_attr(self, path: str) -> Any:
        if path.startswith(f"{ROOT}."):
            owner: Any = self.real
            for atom in path.removeprefix(f"{ROOT}.").split("."):
                owner = getattr(owner, atom)
            return owner
        return getattr(self.root, path)  # a tensor constant the trace made

    def _compute(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def value(v: Any) -> Any:
            if isinstance(v, _Device):
                return self.device
            if isinstance(v, torch.fx.Proxy):
                return v._tensor_meta
            return v

        args, kwargs = pytree.tree_map(value, (args, kwargs))
        with _eager_modules():
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            return self.real.get_submodule(str(target).removeprefix(f"{ROOT}."))(*args, **kwargs)

    def decide(self, proxy: _ShapeProxy, kind: type, what: str) -> Any:
        answer = kind(proxy._tensor_meta)
        self.guards.append(self.create_node("call_function", guard, (proxy.node, answer, what), {}))
        return answer


@contextlib.contextmanager
def _proxies_are_tensors() -> Iterator[None]:
    # diffusers takes a `torch.tensor([timesteps])` path when `torch.is_tensor(t)` is False.
    # Blocks run on meta tensors to learn their output shapes; `torch.autocast(x.device.type)`
    # inside one (rotary embeddings) would ask for a "meta" autocast, which does not exist.
    original, autocast = torch.is_tensor, torch.autocast
    torch.is_tensor = lambda obj: isinstance(obj, (torch.Tensor, torch.fx.Proxy))  # type: ignore[assignment]
    torch.autocast = torch.amp.autocast = _MetaAutocast  # type: ignore[misc]
    try:
        yield
    finally:
        torch.is_tensor = original
        torch.autocast = torch.amp.autocast = autocast  # type: ignore[misc]


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` that takes device type "meta" as "cpu" (the shapes are the same)."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


class TracedDenoiser:
    """A denoiser's top-level graph at block granularity, for one call signature.

    ``graph`` calls blocks as ``call_module`` nodes with targets ``denoiser.<block name>``.
    ``blocks`` are the blocks that depend on the latent, in program order: the units to
    partition. Blocks that depend only on the timestep and conditioning (time embedding, ...)
    are *replicated*: every stage that needs them computes them with the current step's values.
    """

    def __init__(self, root: _Root, graph: torch.fx.Graph, input_names: list[str], latent: str,
                 signature: CallSignature, constants: Mapping[str, torch.Tensor] | None = None) -> None:
        self.root = root
        self.constants = dict(constants or {})  # Note [tensor constants]
        self.graph = graph
        self.input_names = tuple(input_names)
        self.latent = latent
        self.signature = signature
        self.out_spec = root.out_spec
        self.specs: dict[str, TensorSpec] = {}
        self.part_specs: dict[str, tuple[TensorSpec, ...]] = {}  # tuple/list-of-tensor values, by part
        for node in graph.nodes:
            meta = node.meta.get("asyncdiff_value")
            if isinstance(meta, torch.Tensor):
                self.specs[node.name] = TensorSpec.of(meta, strided=True)
            elif isinstance(meta, (tuple, list)) and meta and all(isinstance(m, torch.Tensor) for m in meta):
                self.part_specs[node.name] = tuple(TensorSpec.of(m, strided=True) for m in meta)
        self.latent_nodes = _latent_dependent(graph, latent)
        calls = [n for n in graph.nodes if n.op == "call_module"]
        # Note [block names]: a block is named by its module's qualified name; a module without
        # weights called several times (an activation) gives one block per call, "name#1", "name#2".
        counts: dict[str, int] = {}
        for n in calls:
            counts[n.target] = counts.get(n.target, 0) + 1
        seen: dict[str, int] = {}
        self.node_block: dict[str, str] = {}
        for n in calls:
            name = n.target.removeprefix(f"{ROOT}.")
            if counts[n.target] > 1:
                seen[name] = seen.get(name, 0) + 1
                name = f"{name}#{seen[name]}"
            self.node_block[n.name] = name
        self.block_node = {b: n for n, b in self.node_block.items() if n in self.latent_nodes}
        self.blocks = tuple(self.block_node)
        self.replicated = tuple(b for n, b in self.node_block.items() if n not in self.latent_nodes)
        self.merged: tuple[str, ...] = ()  # modules made blocks because a child was called twice
        self.by_values = False  # traced with the call's real values (Note [value trace])
        self.guards = 0  # value decisions the program checks at run time (Note [value trace])

    def notes(self) -> tuple[str, ...]:
        """What the trace did beyond tracing, for ``inspect`` (Notes [merged blocks], [value trace])."""
        found = [f"{m} is one block: a module inside it is called more than once" for m in self.merged]
        found += [f"{self.blocks[a]} .. {self.blocks[b]} stay on one stage: they call one module several times"
                  for a, b in self.repeated_spans()]
        if self.by_values:
            found.append(f"traced with the call's real values (Note [value trace]): {self.guards} decision(s) on "
                         "tensor values are checked at every call")
        return tuple(found)

    def repeated_spans(self) -> list[tuple[int, int]]:
        """Block index ranges ``(first, last)`` from a weighted module's first call to its last
        (Note [merged blocks]): they must run on one stage."""
        skeleton = getattr(self.root, ROOT)
        calls: dict[str, list[int]] = {}
        for i, b in enumerate(self.blocks):
            if "#" in b:
                calls.setdefault(module_of(b), []).append(i)
        return [(min(ix), max(ix)) for m, ix in calls.items()
                if len(ix) > 1 and next(iter(_tensors(skeleton.get_submodule(m))), None) is not None]

    def graph_module(self, denoiser: torch.nn.Module) -> torch.fx.GraphModule:
        """The traced graph bound to ``denoiser``'s real modules (same structure as traced)."""
        return torch.fx.GraphModule(holder(denoiser, self.constants), self.graph, f"Traced{type(denoiser).__name__}")

    def flatten_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Tensor leaves of a call, checked against the traced signature."""
        signature, tensors = call_signature(self.root, args, kwargs)
        if signature != self.signature:
            raise ValueError("call signature differs from the traced one; re-trace for this call")
        return tensors

    def unflatten_output(self, leaves: list[Any]) -> Any:
        return pytree.tree_unflatten(leaves, self.out_spec)


def holder(denoiser: torch.nn.Module, constants: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The root a traced graph runs on: ``denoiser`` under :data:`ROOT`, and the trace's tensor
    constants (Note [tensor constants]) on the denoiser's device."""
    root = torch.nn.Module()
    setattr(root, ROOT, denoiser)
    device = next((t.device for t in _tensors(denoiser)), None)
    for name, value in constants.items():
        setattr(root, name, value.to(device) if device is not None and value.dim() > 0 else value)
    return root


def _trace_reason(err: BaseException) -> str:
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


def module_of(block: str) -> str:
    """The qualified module name of a block (Note [block names])."""
    return block.split("#", 1)[0]


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def call_signature(denoiser: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """``(CallSignature, tensor leaves)`` of calling ``denoiser(*args, **kwargs)``."""
    module = getattr(denoiser, ROOT) if isinstance(denoiser, _Root) else denoiser
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return CallSignature.of(dict(bound.arguments))


def _latent_dependent(graph: torch.fx.Graph, latent: str) -> set[str]:
    found: set[str] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.target == latent:
                found.add(node.name)
        elif _is_device_read(node):
            continue  # metadata, not data: every rank reads it from its own inputs
        elif node.op != "output" and any(i.name in found for i in node.all_input_nodes):
            found.add(node.name)
    return found


def _is_device_read(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("device",)


def _share_device_nodes(graph: torch.fx.Graph, first_input: torch.fx.Node | None) -> None:
    # All tensors of one rank live on one device; reading it from an input (present on every
    # rank) instead of from an intermediate keeps `.device` from becoming a cross-stage edge.
    devices = [n for n in graph.nodes if _is_device_read(n)]
    if not devices or first_input is None:
        return
    with graph.inserting_after(first_input):
        shared = graph.call_function(getattr, (first_input, "device"))
    for node in devices:
        node.replace_all_uses_with(shared)
        graph.erase_node(node)


def trace_denoiser(denoiser: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                   policy: str | BlockPolicy = "fine", latent: str | None = None,
                   skeleton: torch.nn.Module | None = None) -> TracedDenoiser:
    """Trace ``denoiser(*args, **kwargs)`` at block granularity.

    ``latent`` names the argument that carries the noisy latent (default: the first tensor
    argument). ``skeleton`` is a :func:`meta_copy` of the denoiser to trace on (made here if
    not given; pass one when the denoiser's weights were released).
    """
    policy = BlockPolicy.parse(policy)
    skeleton = skeleton if skeleton is not None else meta_copy(denoiser)
    bound = inspect.signature(denoiser.forward).bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    signature, tensors = CallSignature.of(arguments)
    root, names = _make_root(skeleton, arguments)
    if not names:
        raise ValueError(f"{type(denoiser).__name__} was called without tensor arguments; nothing to trace")
    if latent is None:
        latent = names[0]
    elif latent not in names:
        raise ValueError(f"latent={latent!r} is not a tensor argument of this call; tensor arguments: {names}")
    blocks, merged, device = policy.blocks(skeleton), [], tensors[0].device
    by_values = False  # Note [value trace]
    while True:  # Note [merged blocks]
        tracer = _ValueTracer(blocks, device, denoiser) if by_values else _BlockTracer(blocks, device)
        try:
            graph = _run_tracer(tracer, root, names, tensors, denoiser, skeleton, policy)
        except TraceError:
            if by_values or not _holds_weights(denoiser, skeleton):
                raise
            by_values = True
            root, _ = _make_root(skeleton, arguments)
            continue
        repeated = _repeated_weighted_blocks(graph, skeleton)
        if not repeated:
            break
        parents = {_enclosing_module(m, skeleton) for m in repeated} - {""}
        if not parents:
            break  # no module contains the calls (a loop over a ModuleList): the planner keeps them together
        blocks = {b for b in blocks if not any(b == p or b.startswith(f"{p}.") for p in parents)} | parents
        merged.extend(sorted(parents))
        root, _ = _make_root(skeleton, arguments)
    for node, meta in tracer.node_meta.items():
        node.meta["asyncdiff_value"] = meta
    # Note [tensor constants]: a tensor the traced code built from Python values (position ids,
    # `torch.tensor([0] * batch)`) is part of the specialised program, like the shapes it came from
    constants = {n.target: getattr(root, n.target) for n in graph.nodes
                 if n.op == "get_attr" and not str(n.target).startswith(f"{ROOT}.")}
    for name, value in constants.items():
        if not isinstance(value, torch.Tensor) or value.is_meta:
            raise TraceError(f"tracing {type(denoiser).__name__}: the traced code made constant {name!r} "
                             f"({type(value).__name__}{' on meta' if isinstance(value, torch.Tensor) else ''}) "
                             "whose value the trace cannot know; make the module that builds it a block "
                             "(policy='coarse' or a predicate)", "unknown-constant")
    _order_updates(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    _share_device_nodes(graph, placeholders[0] if placeholders else None)
    graph.lint()
    traced = TracedDenoiser(root, graph, names, latent, signature, constants)
    traced.merged = tuple(merged)
    traced.by_values = by_values
    traced.guards = len(tracer.guards) if isinstance(tracer, _ValueTracer) else 0
    return traced


def _holds_weights(denoiser: torch.nn.Module, skeleton: torch.nn.Module) -> bool:
    """Whether every weight of ``denoiser`` is here (none released or on meta): a value trace can run."""
    return all(not t.is_meta and t.shape == s.shape for t, s in zip(_tensors(denoiser), _tensors(skeleton)))


def _run_tracer(tracer: _BlockTracer, root: _Root, names: list[str], tensors: list[torch.Tensor],
                denoiser: torch.nn.Module, skeleton: torch.nn.Module, policy: BlockPolicy) -> torch.fx.Graph:
    meta_args = {n: t if isinstance(tracer, _ValueTracer) else torch.empty_like(t, device="meta")
                 for n, t in zip(names, tensors)}
    try:
        with _proxies_are_tensors(), torch.no_grad(), _quiet_meta_warnings() as caught:
            graph = tracer.trace(root, meta_args=meta_args)
    except Exception as err:
        if caught:  # the first value without a shape is the cause; the error is where it was used
            raise _meta_error(denoiser, *caught[0]) from err
        where, reason = _innermost_module(err, skeleton), _trace_reason(err)
        raise TraceError(
            f"tracing {type(denoiser).__name__} at {'predicate' if policy.predicate else f'depth={policy.depth}'} "
            f"granularity failed{f' inside {where}' if where else ''}: {type(err).__name__}: {err}. "
            f"{TRACE_REASONS[reason]}: make the module that contains it a block (policy='coarse', or a "
            "predicate that returns True for it)", reason
        ) from err
    if caught:
        raise _meta_error(denoiser, *caught[0])
    return graph


def _meta_error(denoiser: torch.nn.Module, target: str, reason: str) -> TraceError:
    return TraceError(f"tracing {type(denoiser).__name__}: {target.removeprefix(f'{ROOT}.')!r} cannot run on meta "
                      f"tensors to infer its output shape ({reason.strip().splitlines()[0][:200]}); {_meta_hint(reason)}",
                      "no-meta-shape")


def _meta_hint(reason: str) -> str:
    """Why a block cannot run on meta tensors, in words (issue 11: name the real cause)."""
    if any(k in reason for k in ("item()", "data-dependent", "nonzero", "bincount", "unique", "masked_select",
                                 "copy out of meta")):
        return ("its output depends on tensor values (a data-dependent shape or a branch on values), which a "
                "trace cannot know: asyncdiff cannot partition this denoiser at this block")
    if "does not have an associated meta" in reason:
        return ("an input's shape was lost earlier in the trace (a data-dependent shape, such as boolean-mask "
                "indexing, upstream)")
    return "make the code depend on shapes only, or use a policy where it sits inside a larger block"


def _repeated_weighted_blocks(graph: torch.fx.Graph, skeleton: torch.nn.Module) -> list[str]:
    """Modules with weights that the graph calls more than once (Note [merged blocks])."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return sorted(name.removeprefix(f"{ROOT}.") for name, k in counts.items()
                  if k > 1 and next(iter(_tensors(skeleton.get_submodule(name.removeprefix(f"{ROOT}.")))), None) is not None)


def _enclosing_module(name: str, root: torch.nn.Module) -> str:
    """The nearest module above ``name`` that is not a container ("" for the root)."""
    parts = name.split(".")
    while parts:
        parts = parts[:-1]
        parent = ".".join(parts)
        if not parts or not isinstance(root.get_submodule(parent), CONTAINERS):
            return parent
    return ""


@contextlib.contextmanager
def _quiet_meta_warnings() -> Iterator[list[tuple[str, str]]]:
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


def _innermost_module(err: BaseException, root: torch.nn.Module) -> str | None:
    names = {id(m): f"{name} ({type(m).__name__})" for name, m in root.named_modules() if name}
    tb, where = err.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names and tb.tb_frame.f_code.co_name == "forward":
            where = names[id(owner)]
        tb = tb.tb_next
    return where
