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
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.meta_tracer import MetaTracer

from asyncdiff.partition.blocks import CONTAINERS, BlockPolicy
from asyncdiff.partition.diagnose import (
    TRACE_REASONS,
    TraceError,
    innermost_module,
    meta_error,
    quiet_meta_warnings,
    trace_reason,
)
from asyncdiff.partition.passes import order_updates, share_device_nodes
from asyncdiff.partition.proxies import ShapeProxy, TracedDevice, proxies_are_tensors
from asyncdiff.partition.specs import ROOT, CallSignature, meta_copy, module_tensors
from asyncdiff.partition.traced import TracedDenoiser, TracedRoot, make_root

__all__ = ["guard", "trace_denoiser"]


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
        self.device = device  # where the traced call's tensors live (TracedDevice)
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

    def proxy(self, node: torch.fx.Node) -> ShapeProxy:
        return ShapeProxy(node, self)

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
            if isinstance(v, TracedDevice):
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

    def decide(self, proxy: ShapeProxy, kind: type, what: str) -> Any:
        answer = kind(proxy._tensor_meta)
        self.guards.append(self.create_node("call_function", guard, (proxy.node, answer, what), {}))
        return answer


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
    root, names = make_root(skeleton, arguments)
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
            root, _ = make_root(skeleton, arguments)
            continue
        repeated = _repeated_weighted_blocks(graph, skeleton)
        if not repeated:
            break
        parents = {_enclosing_module(m, skeleton) for m in repeated} - {""}
        if not parents:
            break  # no module contains the calls (a loop over a ModuleList): the planner keeps them together
        blocks = {b for b in blocks if not any(b == p or b.startswith(f"{p}.") for p in parents)} | parents
        merged.extend(sorted(parents))
        root, _ = make_root(skeleton, arguments)
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
    order_updates(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    share_device_nodes(graph, placeholders[0] if placeholders else None)
    graph.lint()
    traced = TracedDenoiser(root, graph, names, latent, signature, constants)
    traced.merged = tuple(merged)
    traced.by_values = by_values
    traced.guards = len(tracer.guards) if isinstance(tracer, _ValueTracer) else 0
    return traced


def _holds_weights(denoiser: torch.nn.Module, skeleton: torch.nn.Module) -> bool:
    """Whether every weight of ``denoiser`` is here (none released or on meta): a value trace can run."""
    return all(not t.is_meta and t.shape == s.shape for t, s in zip(module_tensors(denoiser), module_tensors(skeleton)))


def _run_tracer(tracer: _BlockTracer, root: TracedRoot, names: list[str], tensors: list[torch.Tensor],
                denoiser: torch.nn.Module, skeleton: torch.nn.Module, policy: BlockPolicy) -> torch.fx.Graph:
    meta_args = {n: t if isinstance(tracer, _ValueTracer) else torch.empty_like(t, device="meta")
                 for n, t in zip(names, tensors)}
    try:
        with proxies_are_tensors(), torch.no_grad(), quiet_meta_warnings() as caught:
            graph = tracer.trace(root, meta_args=meta_args)
    except Exception as err:
        if caught:  # the first value without a shape is the cause; the error is where it was used
            raise meta_error(denoiser, *caught[0]) from err
        where, reason = innermost_module(err, skeleton), trace_reason(err)
        raise TraceError(
            f"tracing {type(denoiser).__name__} at {'predicate' if policy.predicate else f'depth={policy.depth}'} "
            f"granularity failed{f' inside {where}' if where else ''}: {type(err).__name__}: {err}. "
            f"{TRACE_REASONS[reason]}: make the module that contains it a block (policy='coarse', or a "
            "predicate that returns True for it)", reason
        ) from err
    if caught:
        raise meta_error(denoiser, *caught[0])
    return graph


def _repeated_weighted_blocks(graph: torch.fx.Graph, skeleton: torch.nn.Module) -> list[str]:
    """Modules with weights that the graph calls more than once (Note [merged blocks])."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return sorted(name.removeprefix(f"{ROOT}.") for name, k in counts.items()
                  if k > 1 and next(iter(module_tensors(skeleton.get_submodule(name.removeprefix(f"{ROOT}.")))), None) is not None)


def _enclosing_module(name: str, root: torch.nn.Module) -> str:
    """The nearest module above ``name`` that is not a container ("" for the root)."""
    parts = name.split(".")
    while parts:
        parts = parts[:-1]
        parent = ".".join(parts)
        if not parts or not isinstance(root.get_submodule(parent), CONTAINERS):
            return parent
    return ""
