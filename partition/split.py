"""Split a traced denoiser into per-stage programs according to a :class:`Plan`.

Every node of the traced graph gets a home:

- *blocks* that depend on the latent run on the stage the plan gives them;
- other latent-dependent nodes (``torch.cat`` of a skip connection, ``x[0]`` of a block's tuple
  output) run on the earliest stage that uses them; an indexing node runs with its producer, so
  only the selected tensor travels;
- nodes that depend only on call inputs (timestep embedding, conditioning projections) are
  *replicated*: each stage that needs them computes them from its own copy of the call inputs,
  with the current step's values (Note [replicated conditioning]).

Each latent value read by another stage is a :class:`Transfer`; a stage program takes the call's
tensor inputs and its received values, and returns the values it sends (and, on the output
stage, the denoiser's output leaves).

Note [replicated conditioning]: every rank runs the pipeline's loop and so holds every call
input at every step; only latent-derived values are stale. Replicated work is therefore
recomputed, never sent.

Example:
    >>> import torch
    >>> from asyncdiff.partition.trace import trace_denoiser
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> traced = trace_denoiser(net, (torch.randn(3, 4),), {})
    >>> split = split_graph(traced, Plan(stages=(("0",), ("1", "2"))))
    >>> [(t.value, t.src, t.dst, t.spec.shape) for t in split.transfers]
    [('denoiser_0', 0, 1, (3, 4))]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.trace import ROOT, TensorSpec, TracedDenoiser

__all__ = ["SplitDenoiser", "StageProgram", "Transfer", "split_graph"]


@dataclass(frozen=True)
class Transfer:
    """Value ``value`` (a node of the traced graph) travels from stage ``src`` to stage ``dst``."""

    value: str
    src: int
    dst: int
    spec: TensorSpec


@dataclass(frozen=True)
class StageProgram:
    """What one stage runs. ``graph`` takes ``(*call tensors, *recv values)`` and returns
    ``(send values, output leaves)``; ``output leaves`` is empty except on the output stage."""

    index: int
    blocks: tuple[str, ...]
    graph: torch.fx.Graph
    recv: tuple[Transfer, ...]
    send: tuple[Transfer, ...]

    def module(self, denoiser: torch.nn.Module) -> torch.fx.GraphModule:
        """The program bound to ``denoiser``: it references only this stage's modules."""
        holder = torch.nn.Module()
        setattr(holder, ROOT, denoiser)
        return torch.fx.GraphModule(holder, self.graph, f"Stage{self.index}")

    def peers(self, direction: str) -> tuple[int, ...]:
        """Stages this one receives from (``"recv"``) or sends to (``"send"``), ascending."""
        transfers = self.recv if direction == "recv" else self.send
        return tuple(sorted({t.src if direction == "recv" else t.dst for t in transfers}))


@dataclass(frozen=True)
class SplitDenoiser:
    plan: Plan
    stages: tuple[StageProgram, ...]
    transfers: tuple[Transfer, ...]
    output_stage: int

    def describe(self) -> str:
        """Every tensor that crosses a stage boundary, with its shape and bytes."""
        lines = []
        for stage in self.stages:
            lines.append(f"stage {stage.index}: {len(stage.blocks)} blocks "
                         f"({stage.blocks[0]} .. {stage.blocks[-1]})")
            for t in stage.recv:
                lines.append(f"  recv {t.value:<40} from stage {t.src}  {t.spec.shape} {t.spec.dtype} "
                             f"{t.spec.nbytes / 1e6:.3f} MB")
        lines.append(f"output on stage {self.output_stage}")
        return "\n".join(lines)


def _owners(traced: TracedDenoiser, plan: Plan) -> tuple[dict[str, int], int]:
    graph = traced.graph
    block_stage = {traced.block_node[b]: plan.stage_of(b) for b in traced.blocks}
    output_stage = block_stage[traced.block_node[traced.blocks[-1]]]
    owner: dict[str, int] = {}
    for node in reversed(graph.nodes):
        if node.name not in traced.latent_nodes or node.op == "placeholder":
            continue
        if node.name in block_stage:
            owner[node.name] = block_stage[node.name]
            continue
        users = [output_stage if u.op == "output" else owner[u.name] for u in node.users]
        owner[node.name] = min(users) if users else output_stage
    for node in graph.nodes:  # indexing runs with its producer, so only the selected piece travels
        if node.op == "call_function" and node.target is operator.getitem and node.name in owner:
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and source.name in owner:
                owner[node.name] = min(owner[node.name], owner[source.name])
    return owner, output_stage


def split_graph(traced: TracedDenoiser, plan: Plan) -> SplitDenoiser:
    plan.check_covers(traced.blocks)
    owner, output_stage = _owners(traced, plan)
    graph = traced.graph
    output_node = next(n for n in graph.nodes if n.op == "output")
    transfers: list[Transfer] = []
    for node in graph.nodes:
        if node.name not in owner:
            continue
        dsts = {output_stage if u.op == "output" else owner[u.name] for u in node.users} - {owner[node.name]}
        for dst in sorted(dsts):
            spec = traced.specs.get(node.name)
            if spec is None:
                raise ValueError(f"value {node.name} crosses from stage {owner[node.name]} to {dst} "
                                 "but is not a tensor; choose cuts at tensor boundaries (another block policy)")
            transfers.append(Transfer(node.name, owner[node.name], dst, spec))
    stages = tuple(
        _stage_program(traced, plan, k, owner, output_stage, output_node, transfers)
        for k in range(plan.n_stages)
    )
    return SplitDenoiser(plan, stages, tuple(transfers), output_stage)


def _stage_program(traced: TracedDenoiser, plan: Plan, k: int, owner: dict[str, int], output_stage: int,
                   output_node: torch.fx.Node, transfers: list[Transfer]) -> StageProgram:
    graph = traced.graph
    recv = tuple(t for t in transfers if t.dst == k)
    send = tuple(t for t in transfers if t.src == k)
    # Nodes this stage computes: its own, plus the replicated (input-only) nodes they need.
    needed: set[str] = set()
    for node in reversed(graph.nodes):
        if owner.get(node.name) == k:
            needed.add(node.name)
        elif node.name not in owner and node.op not in ("placeholder", "output") and \
                any(u.name in needed for u in node.users):
            needed.add(node.name)

    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = g.placeholder(node.name)
    for t in recv:
        env[t.value] = g.placeholder(f"recv_{t.value}")
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or node.name not in needed:
            continue
        env[node.name] = g.node_copy(node, lambda n: env[n.name])
        env[node.name].meta = dict(node.meta)
    leaves = output_node.args[0] if k == output_stage else ()
    sends = tuple(env[t.value] for t in send)
    g.output((sends, torch.fx.node.map_arg(leaves, lambda n: env[n.name])))
    g.lint()
    return StageProgram(k, plan.stages[k], g, recv, send)
