"""Passes over a traced graph: in-place updates ordered before later reads (Note [in-place
updates]), the latent-dependent nodes, and one shared device read."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

__all__ = ["INPLACE_OPS", "after", "latent_dependent", "order_updates", "setitem", "share_device_nodes",
           "updated_base"]


# Note [in-place updates]: Python runs ``x += y`` as ``x = x.__iadd__(y)``, and a torch.fx proxy
# without ``__iadd__`` falls back to ``x = x + y``: a new value, while eager code mutates the one
# tensor that every other holder (a skip-connection tuple, say) also sees. So augmented
# assignments on traced values are recorded as the in-place operators themselves; at run time
# they mutate the same tensor as eager code does (and keep its dtype). The planner keeps the
# blocks from the mutated value's producer to the update on one stage (``inplace_spans``), so
# that everything sent from there is sent after the update, as eager code would have read it.
INPLACE_OPS = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
               "__itruediv__": operator.itruediv}


def setitem(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``x[index] = value``, returning ``x``: item assignment as a graph node (Note [in-place updates])."""
    x[index] = value
    return x


def after(x: torch.Tensor, *updates: Any) -> torch.Tensor:
    """``x``, once ``updates`` (in-place updates of ``x`` or of a view of it) have run."""
    return x


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


def order_updates(graph: torch.fx.Graph) -> None:
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


def latent_dependent(graph: torch.fx.Graph, latent: str) -> set[str]:
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


def share_device_nodes(graph: torch.fx.Graph, first_input: torch.fx.Node | None) -> None:
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
