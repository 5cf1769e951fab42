"""Split a traced denoiser into per-stage programs according to a :class:`Plan`.

A stage's blocks form one or more *segments*: maximal runs of consecutive blocks (in program
order) on that stage. A contiguous plan has one segment per stage; a wrapped plan gives stage 0 a
head and a tail segment. Segments execute in program order in a warm-up step.

Every node of the traced graph gets a home:

- *blocks* that depend on the latent run in their segment;
- other latent-dependent nodes (``torch.cat`` of a skip connection, ``x[0]`` of a block's tuple
  output) run in the earliest segment that uses them; an indexing node runs with its producer,
  so only the selected tensor travels;
- nodes that depend only on call inputs (timestep embedding, conditioning projections) are
  *replicated*: each stage computes them, once per step, in its first segment that needs them
  (Note [replicated conditioning]).

A value read by a segment of another stage is a :class:`Transfer`; a value read by a later
segment of the same stage stays local. A segment program takes the call's tensor inputs and its
input values, and returns its output values (and, for the output segment, the denoiser's output
leaves).

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
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.specs import TensorSpec
from asyncdiff.partition.trace import guard
from asyncdiff.partition.traced import TracedDenoiser, holder

__all__ = ["Segment", "SplitDenoiser", "StageProgram", "Transfer", "place_latent_nodes", "split_graph"]


@dataclass(frozen=True)
class Transfer:
    """Value ``value`` travels from segment ``src_segment`` (on stage ``src``) to segment
    ``dst_segment`` (on stage ``dst``). A tuple of tensors (e.g. rotary embeddings' cos and sin)
    travels as one transfer per element, ``part`` its index (-1: the value is a tensor)."""

    value: str
    src: int
    dst: int
    spec: TensorSpec
    src_segment: int
    dst_segment: int
    part: int = -1


@dataclass(frozen=True)
class Segment:
    """A run of consecutive blocks on one stage. ``graph`` takes ``(*call tensors, *inputs)`` and
    returns ``(outputs, output leaves)``; ``output leaves`` is empty except on the output segment."""

    index: int
    stage: int
    blocks: tuple[str, ...]
    graph: torch.fx.Graph
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)  # Note [tensor constants]

    def module(self, denoiser: torch.nn.Module) -> torch.fx.GraphModule:
        """The program bound to ``denoiser``: it references only this segment's modules."""
        return torch.fx.GraphModule(holder(denoiser, self.constants), self.graph, f"Segment{self.index}")


@dataclass(frozen=True)
class StageProgram:
    """What one stage runs: its segments in order, and the transfers it receives and sends."""

    index: int
    blocks: tuple[str, ...]
    segments: tuple[Segment, ...]
    recv: tuple[Transfer, ...]
    send: tuple[Transfer, ...]


@dataclass(frozen=True)
class SplitDenoiser:
    plan: Plan
    stages: tuple[StageProgram, ...]
    segments: tuple[Segment, ...]
    transfers: tuple[Transfer, ...]
    output_segment: int

    @property
    def output_stage(self) -> int:
        return self.segments[self.output_segment].stage

    def describe(self) -> str:
        """Every tensor that crosses a stage boundary, with its shape and bytes."""
        lines = []
        for seg in self.segments:
            lines.append(f"segment {seg.index} on stage {seg.stage}: {len(seg.blocks)} blocks "
                         f"({seg.blocks[0]} .. {seg.blocks[-1]})")
            for t in self.transfers:
                if t.dst_segment == seg.index:
                    lines.append(f"  recv {t.value:<40} from stage {t.src}  {t.spec.shape} {t.spec.dtype} "
                                 f"{t.spec.nbytes / 1e6:.3f} MB")
        lines.append(f"output on stage {self.output_stage}")
        return "\n".join(lines)


def _segments_of(traced: TracedDenoiser, plan: Plan) -> list[tuple[int, list[str]]]:
    runs: list[tuple[int, list[str]]] = []
    for block in traced.blocks:
        stage = plan.stage_of(block)
        if not runs or runs[-1][0] != stage:
            runs.append((stage, []))
        runs[-1][1].append(block)
    return runs


def place_latent_nodes(traced: TracedDenoiser, block_position: Mapping[str, int], output_position: int) -> dict[str, int]:
    """Note [placement]: where each latent node runs, as a position in execution order. A block
    node runs at ``block_position[node]``; another op at its earliest consumer's position (the
    output node's is ``output_position``); an indexing op with its producer, so only the selected
    piece of a tuple travels. Used for segments by the split and for block indices by the planner,
    so the planner models the transfers the split makes."""
    position: dict[str, int] = {}
    nodes = list(traced.graph.nodes)
    for node in reversed(nodes):
        if node.name not in traced.latent_nodes or node.op == "placeholder":
            continue
        if node.name in block_position:
            position[node.name] = block_position[node.name]
        else:
            users = [output_position if u.op == "output" else position[u.name] for u in node.users]
            position[node.name] = min(users, default=output_position)
    for node in nodes:
        if node.name in position and not node.users and node.name not in block_position:
            # an update nobody reads afterwards (Note [in-place updates]) runs right after its inputs
            inputs = [position[i.name] for i in node.all_input_nodes if i.name in position]
            position[node.name] = max(inputs, default=output_position)
        if node.op == "call_function" and node.target is operator.getitem and node.name in position:
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and source.name in position:
                position[node.name] = min(position[node.name], position[source.name])
    return position


def split_graph(traced: TracedDenoiser, plan: Plan) -> SplitDenoiser:
    plan.check_covers(traced.blocks)
    for first, last in traced.repeated_spans():  # Note [merged blocks]
        stages = {plan.stage_of(b) for b in traced.blocks[first:last + 1]}
        if len(stages) > 1:
            raise ValueError(f"blocks {traced.blocks[first]} .. {traced.blocks[last]} call one module several times "
                             f"and must run on one stage, but the plan puts them on stages {sorted(stages)}")
    runs = _segments_of(traced, plan)
    stage_of_segment = [stage for stage, _ in runs]
    graph = traced.graph
    nodes = list(graph.nodes)
    output_node = nodes[-1]
    segment_of_block = {traced.block_node[b]: i for i, (_, blocks) in enumerate(runs) for b in blocks}
    output_segment = segment_of_block[traced.block_node[traced.blocks[-1]]]

    home = place_latent_nodes(traced, segment_of_block, output_segment)

    # Replicated nodes: computed once per stage, in the stage's first segment that needs them.
    first_segments = sorted({stage: i for i, stage in reversed(list(enumerate(stage_of_segment)))}.values())
    needs: dict[str, set[int]] = {}
    for node in reversed(nodes):
        if node.name in home or node.op in ("placeholder", "output"):
            continue
        segs: set[int] = set()
        if not node.users and node.op == "call_function" and node.target is guard:
            segs = set(first_segments)  # a check on conditioning: every stage makes it (Note [value trace])
        for u in node.users:
            if u.op == "output":
                segs.add(output_segment)
            elif u.name in home:
                segs.add(home[u.name])
            else:
                segs |= needs.get(u.name, set())
        needs[node.name] = segs
    computed_in: dict[str, set[int]] = {}  # node -> segments computing it
    for name, segs in needs.items():
        first: dict[int, int] = {}
        for s in sorted(segs):
            first.setdefault(stage_of_segment[s], s)
        computed_in[name] = set(first.values())
    for name, s in home.items():
        computed_in[name] = {s}

    def source_segment(value: str, consumer: int) -> int:
        """The segment whose copy of ``value`` the consumer segment reads."""
        if value in home:
            return home[value]
        same_stage = [s for s in computed_in[value] if stage_of_segment[s] == stage_of_segment[consumer]]
        return same_stage[0]

    # Edges between segments.
    inputs: dict[int, list[str]] = {i: [] for i in range(len(runs))}
    outputs: dict[int, list[str]] = {i: [] for i in range(len(runs))}
    transfers: list[Transfer] = []
    for node in nodes:
        if node.op == "placeholder" or node.name not in computed_in:
            continue
        for s in sorted(computed_in[node.name]):
            for arg in node.all_input_nodes:
                if arg.op == "placeholder" or s in computed_in[arg.name]:
                    continue
                _link(arg.name, source_segment(arg.name, s), s, traced, stage_of_segment, inputs, outputs, transfers)
    for arg in output_node.all_input_nodes:
        if arg.op != "placeholder" and output_segment not in computed_in[arg.name]:
            _link(arg.name, source_segment(arg.name, output_segment), output_segment, traced, stage_of_segment,
                  inputs, outputs, transfers)

    graphs = [_segment_graph(nodes, i, computed_in, inputs[i], outputs[i], output_node if i == output_segment else None)
              for i in range(len(runs))]
    segments = tuple(
        Segment(i, stage, tuple(blocks), graphs[i], tuple(inputs[i]), tuple(outputs[i]),
                {n.target: traced.constants[n.target] for n in graphs[i].nodes
                 if n.op == "get_attr" and n.target in traced.constants})
        for i, (stage, blocks) in enumerate(runs)
    )
    stages = tuple(
        StageProgram(k, plan.stages[k], tuple(seg for seg in segments if seg.stage == k),
                     tuple(t for t in transfers if t.dst == k), tuple(t for t in transfers if t.src == k))
        for k in range(plan.model_n)
    )
    return SplitDenoiser(plan, stages, segments, tuple(transfers), output_segment)


def _link(value: str, src: int, dst: int, traced: TracedDenoiser, stage_of_segment: list[int],
          inputs: dict[int, list[str]], outputs: dict[int, list[str]], transfers: list[Transfer]) -> None:
    if value in inputs[dst]:
        return
    inputs[dst].append(value)
    if value not in outputs[src]:
        outputs[src].append(value)
    if stage_of_segment[src] != stage_of_segment[dst]:
        spec = traced.specs.get(value)
        parts = ((-1, spec),) if spec is not None else tuple(enumerate(traced.part_specs.get(value, ())))
        if not parts:
            raise ValueError(f"value {value} crosses from stage {stage_of_segment[src]} to {stage_of_segment[dst]} "
                             "but is neither a tensor nor a tuple of tensors; choose cuts at tensor boundaries "
                             "(another block policy)")
        transfers.extend(Transfer(value, stage_of_segment[src], stage_of_segment[dst], part_spec, src, dst, part)
                         for part, part_spec in parts)


def _segment_graph(nodes: list[torch.fx.Node], index: int, computed_in: dict[str, set[int]], inputs: list[str],
                   outputs: list[str], output_node: torch.fx.Node | None) -> torch.fx.Graph:
    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for node in nodes:
        if node.op == "placeholder":
            env[node.name] = g.placeholder(node.name)
    for value in inputs:
        env[value] = g.placeholder(f"in_{value}")
    for node in nodes:
        if node.op in ("placeholder", "output") or index not in computed_in.get(node.name, ()):
            continue
        env[node.name] = g.node_copy(node, lambda n: env[n.name])
        env[node.name].meta = dict(node.meta)
    leaves = output_node.args[0] if output_node is not None else ()
    g.output((tuple(env[v] for v in outputs), torch.fx.node.map_arg(leaves, lambda n: env[n.name])))
    g.lint()
    return g
