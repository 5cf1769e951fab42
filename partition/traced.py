"""The traced result: :class:`TracedDenoiser` (a denoiser's top-level graph at block granularity
for one call signature), the generated root module a trace runs through, and the holder a traced
graph runs on (Note [specialised trace] in :mod:`asyncdiff.partition.trace`)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff.partition.passes import latent_dependent
from asyncdiff.partition.specs import ROOT, CallSignature, TensorSpec, module_of, module_tensors

__all__ = ["TracedDenoiser", "TracedRoot", "call_signature", "holder", "make_root"]


def _identifier(path: tuple[Any, ...]) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    name = re.sub(r"\W", "_", "_".join(parts)) or "arg"
    return name if not name[0].isdigit() else f"arg_{name}"


class TracedRoot(torch.nn.Module):
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


def make_root(denoiser: torch.nn.Module, arguments: dict[str, Any]) -> tuple[TracedRoot, list[str]]:
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
    cls = type(f"Traced{type(denoiser).__name__}", (TracedRoot,), {"forward": namespace["forward"]})
    return cls(denoiser, inspect.signature(denoiser.forward), template, tree, slots), names


class TracedDenoiser:
    """A denoiser's top-level graph at block granularity, for one call signature.

    ``graph`` calls blocks as ``call_module`` nodes with targets ``denoiser.<block name>``.
    ``blocks`` are the blocks that depend on the latent, in program order: the units to
    partition. Blocks that depend only on the timestep and conditioning (time embedding, ...)
    are *replicated*: every stage that needs them computes them with the current step's values.
    """

    def __init__(self, root: TracedRoot, graph: torch.fx.Graph, input_names: list[str], latent: str,
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
        self.latent_nodes = latent_dependent(graph, latent)
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
                if len(ix) > 1 and next(iter(module_tensors(skeleton.get_submodule(m))), None) is not None]

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
    device = next((t.device for t in module_tensors(denoiser)), None)
    for name, value in constants.items():
        setattr(root, name, value.to(device) if device is not None and value.dim() > 0 else value)
    return root


def call_signature(denoiser: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """``(CallSignature, tensor leaves)`` of calling ``denoiser(*args, **kwargs)``."""
    module = getattr(denoiser, ROOT) if isinstance(denoiser, TracedRoot) else denoiser
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return CallSignature.of(dict(bound.arguments))
