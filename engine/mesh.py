"""Several kinds of parallelism over one set of processes: guidance x batch x stage.

Note [hybrid mesh]: N stale stages are one way to use N devices. Splitting the batch of every
denoiser call is another, and it is exact (no stale input anywhere): a pipeline with
classifier-free guidance calls its denoiser on a batch of 2B (the unconditional half, then the
conditional half), and B prompts or images per prompt make a batch too. The processes form a
device mesh (``init_device_mesh``) with three named dimensions, ``guidance`` x ``batch`` x
``stage``, whose product is the world size (``stage`` counts the processes of one stage engine:
``model_n`` plus one for stride 2). Each (guidance, batch) coordinate is a *slice*: the stage
engine runs inside it unchanged, and its point-to-point traffic and collectives stay inside it.
Per call, every slice takes its share of the batch (chunk ``g * batch + b`` of ``guidance *
batch`` equal chunks), runs it through its stages, and one all-gather over the *data group* (the
ranks at one stage coordinate of every slice) gives every rank the whole output, so that the
pipeline's own loop (guidance, scheduler, decoding) runs unchanged on every rank.

What is split: every tensor argument whose first dimension equals the latent's batch size; the
rest (a 0-d timestep, position ids) goes whole to every slice. Guidance and batch are one
mechanism on the denoiser's batch; the names say which part of the batch a dimension splits,
which the automatic choice needs (a guidance dimension exists only where the pipeline batches
its guidance) and the user reads. A pipeline that makes its guidance two calls (Note [branches]
in runtime.py) has a batch of B per call: batch parallelism applies, guidance parallelism does
not, and asking for it is an error at the first call.

Note [batch split]: a split batch is exact in arithmetic but not in the last bits: a matrix
multiply of B rows may take another blocking, and so another summation order, than one of 2B
rows, and a deep random-weight network amplifies that. Measured on the tiny built-in systems
(float32, one call): 5e-7 to 8e-6 of the output's largest magnitude, up to 2.5e-4 at some
timesteps of SD 1.5. So the first call of each call signature checks on rank 0, while every
weight is still there, that the denoiser's output on the whole batch equals its outputs on the
chunks, concatenated, to ``SPLIT_LOOSER`` times Note [verify]'s tolerance: 2e-3 of the largest
magnitude in float32, 0.2 in 16-bit dtypes. A denoiser that mixes samples (a norm over the
batch, a batch folded into tokens) differs by the size of the values themselves and stops every
rank with an error, as does one that cannot run on a chunk; ``verify=False`` skips the check.

Example (not run here: needs 4 processes)::

    mesh = ProcessMesh(guidance=2, batch=1, stage_world=2, device_type="cpu")
    mesh.stage_ranks    # [0, 1] on ranks 0 and 1, [2, 3] on ranks 2 and 3
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import init_device_mesh

from asyncdiff.kernels.pack import PackLayout, pack, unpack
from asyncdiff.partition.auto import auto_plan, block_cost
from asyncdiff.partition.hybrid import ParallelOption
from asyncdiff.partition.planner import LAYOUTS, MAX_SLOWDOWN
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.trace import trace_denoiser

__all__ = ["DIMS", "ProcessMesh", "TwoCalls", "batch_size", "concat_chunks", "exchange_outputs", "gather_batch", "model_option", "split_batch",
           "verify_batch_split"]

DIMS = ("guidance", "batch", "stage")
SPLIT_LOOSER = 20.0  # Note [batch split]: the float noise of a split batch, against Note [verify]'s tolerance


class ProcessMesh:
    """This process's place in the guidance x batch x stage mesh and the groups it talks on
    (Note [hybrid mesh]); every process of the world constructs it at the same time."""

    def __init__(self, guidance: int, batch: int, stage_world: int, device_type: str,
                 timeout_s: float = 300.0) -> None:
        world = dist.get_world_size()
        if guidance * batch * stage_world != world:
            raise ValueError(f"guidance={guidance} x batch={batch} x {stage_world} stage processes = "
                             f"{guidance * batch * stage_world} processes, but the world size is {world}")
        self.mesh = init_device_mesh(device_type, (guidance, batch, stage_world), mesh_dim_names=DIMS)
        g, b, s = self.mesh.get_coordinate()
        grid = self.mesh.mesh
        self.guidance, self.batch = guidance, batch
        self.stage_ranks: list[int] = grid[g, b].tolist()
        self.stage_group = self.mesh.get_group("stage")
        self.data_index = g * batch + b
        timeout = datetime.timedelta(seconds=timeout_s)
        # Every process takes part in creating every subgroup; each keeps its own.
        self.stage_collective, _ = dist.new_subgroups_by_enumeration(
            [grid[i, j].tolist() for i in range(guidance) for j in range(batch)], timeout=timeout)
        self.data_group, _ = dist.new_subgroups_by_enumeration(
            [grid[:, :, k].flatten().tolist() for k in range(stage_world)], timeout=timeout)

    @property
    def data_size(self) -> int:
        return self.guidance * self.batch


def batch_size(denoiser: torch.nn.Module, latent: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The batch of the call ``denoiser(*args, **kwargs)``: the first dimension of the argument
    named ``latent`` (or of the first tensor argument)."""
    import inspect

    bound = inspect.signature(type(denoiser).forward).bind(None, *args, **kwargs).arguments
    value = bound.get(latent) if latent else None
    if not isinstance(value, torch.Tensor):
        value = next((x for x in pytree.tree_leaves(list(bound.values())) if isinstance(x, torch.Tensor)), None)
    if value is None or value.dim() == 0:
        raise ValueError(f"{type(denoiser).__name__} was called without a batched tensor; guidance/batch "
                         f"parallelism needs one: use guidance=1, batch=1")
    return value.shape[0]


def _leading(x: Any, n: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == n


def split_batch(tree: Any, n: int, parts: int, index: int) -> Any:
    """Chunk ``index`` of ``parts`` of every tensor in ``tree`` whose first dimension is ``n``
    (Note [hybrid mesh]); other leaves as they are. ``n`` must divide evenly."""
    return pytree.tree_map(lambda x: x.tensor_split(parts)[index] if _leading(x, n) else x, tree)


def gather_batch(output: Any, chunk: int, group: dist.ProcessGroup | None, parts: int) -> Any:
    """The whole batch from every data rank's ``output`` (tensors whose first dimension is
    ``chunk``), concatenated in data-rank order; one all-gather of one packed buffer."""
    leaves, spec = pytree.tree_flatten(output)
    split = [i for i, x in enumerate(leaves) if _leading(x, chunk)]
    layout = PackLayout.of([(leaves[i].shape, leaves[i].dtype) for i in split])
    mine = pack([leaves[i] for i in split], layout)
    every = [torch.empty_like(mine) for _ in range(parts)]
    dist.all_gather(every, mine, group=group)
    pieces = [unpack(buffer, layout) for buffer in every]
    for j, i in enumerate(split):
        leaves[i] = torch.cat([piece[j] for piece in pieces])
    return pytree.tree_unflatten(leaves, spec)


def concat_chunks(outputs: Sequence[Any], chunk: int) -> Any:
    """One process's equivalent of :func:`gather_batch`: chunk outputs concatenated."""
    leaves = [pytree.tree_flatten(o)[0] for o in outputs]
    spec = pytree.tree_flatten(outputs[0])[1]
    merged = [torch.cat([ls[i] for ls in leaves]) if _leading(x, chunk) else x for i, x in enumerate(leaves[0])]
    return pytree.tree_unflatten(merged, spec)


def verify_batch_split(denoiser: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], n: int,
                       parts: int) -> str | None:
    """Note [batch split]: None where ``denoiser`` on the whole batch equals its outputs on
    ``parts`` chunks, concatenated; else the error. Two denoiser calls' work, on one process."""
    from asyncdiff.partition.verify import eager, fresh, tensor_leaves

    whole = eager(denoiser)(*fresh(args), **fresh(kwargs))
    try:
        chunks = [eager(denoiser)(*fresh(split_batch(args, n, parts, i)), **fresh(split_batch(kwargs, n, parts, i)))
                  for i in range(parts)]
    except Exception as err:  # an argument with the batch folded into another dimension, say
        return (f"{type(denoiser).__name__} cannot run on a chunk of {n // parts} of its batch of {n} "
                f"({type(err).__name__}: {err}), so guidance/batch parallelism cannot split it: use guidance=1, "
                f"batch=1 (stages only)")
    return split_difference(denoiser, tensor_leaves(concat_chunks(chunks, n // parts)), tensor_leaves(whole),
                            f"between one call on the batch of {n} and {parts} calls on chunks of {n // parts}")


def split_difference(denoiser: torch.nn.Module, got: list[torch.Tensor], want: list[torch.Tensor],
                     between: str) -> str | None:
    """Note [batch split]: None where the chunks' outputs ``got`` equal the whole batch's ``want``
    to a split batch's float noise; else the error, saying what was compared (``between``)."""
    from asyncdiff.partition.verify import difference

    for i, (g, w) in enumerate(zip(got, want)):
        error = difference(g, w, looser=SPLIT_LOOSER)
        if error is not None:
            return (f"{type(denoiser).__name__} gives other values on a split batch: output {i} differs by {error} "
                    f"{between}; it mixes samples of the batch, so guidance/batch parallelism cannot be exact for "
                    f"it: use guidance=1, batch=1 (stages only)")
    return None


def model_option(denoiser: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 degrees: tuple[int, int, int], n: int, *, policy: Any = "fine", latent: str | None = None,
                 skeleton: torch.nn.Module | None = None, cost: str = "time", bandwidth: float | None = None,
                 layouts: Sequence[str] = LAYOUTS, max_slowdown: float = MAX_SLOWDOWN,
                 repeats: int = 3, profiles: dict[int, Any] | None = None, two_calls: bool = False) -> ParallelOption:
    """Note [choosing the mesh]: trace and profile one slice's share of the call
    ``denoiser(*args, **kwargs)`` (batch ``n``); model a step of ``degrees = (guidance, batch,
    stages)`` on it: the planner's step for the stages, plus the output's broadcast in the slice
    and its all-gather over the slices, at ``bandwidth`` (bytes per cost unit; None: free).
    ``profiles``: traces and profiles by number of slices, kept for the next option.
    ``two_calls``: the pipeline makes its guidance two calls per step (Note [two-call guidance]):
    guidance slices then run one call each instead of splitting the batch, and a step is two
    calls for a slice that runs both."""
    guidance, batch, stages = degrees
    parts = batch if two_calls else guidance * batch
    calls = 2 // guidance if two_calls else 1
    profiles = {} if profiles is None else profiles
    if parts not in profiles:
        args, kwargs = split_batch(args, n, parts, 0), split_batch(kwargs, n, parts, 0)
        traced = trace_denoiser(denoiser, args, kwargs, policy=policy, latent=latent, skeleton=skeleton)
        profiles[parts] = traced, profile_blocks(traced, denoiser, args, kwargs, repeats=repeats,
                                                 measure_time=cost == "time")
    traced, costs = profiles[parts]
    output = next(node for node in traced.graph.nodes if node.op == "output")
    out_bytes = sum(traced.specs[node.name].nbytes for node in output.args[0] if isinstance(node, torch.fx.Node))
    moved = out_bytes * (guidance * batch - 1) + (out_bytes * calls if stages > 1 else 0)
    comm = moved / bandwidth if bandwidth else 0.0
    if stages == 1:
        total = sum(block_cost(c, cost) for c in costs.values())
        return ParallelOption(guidance, batch, stages, total * calls + comm, 0, None)
    plan = auto_plan(traced, costs, stages, cost=cost, bandwidth=bandwidth, layouts=layouts, max_slowdown=max_slowdown)
    return ParallelOption(guidance, batch, stages, float(plan.notes["modeled_step"]) * calls + comm,
                          int(plan.notes["main_path_depth"]), plan.to_json())


def exchange_outputs(output: Any, group: dist.ProcessGroup | None, parts: int) -> list[Any]:
    """Every data rank's ``output`` (all of one structure and shapes), in data-rank order."""
    leaves, spec = pytree.tree_flatten(output)
    where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    layout = PackLayout.of([(leaves[i].shape, leaves[i].dtype) for i in where])
    mine = pack([leaves[i] for i in where], layout)
    every = [torch.empty_like(mine) for _ in range(parts)]
    dist.all_gather(every, mine, group=group)
    outputs = []
    for buffer in every:
        theirs = list(leaves)
        for i, view in zip(where, unpack(buffer, layout)):
            theirs[i] = view
        outputs.append(pytree.tree_unflatten(theirs, spec))
    return outputs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
            a is b or (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))))
    try:
        return bool(a == b)
    except Exception:  # values that do not compare
        return a is b


class TwoCalls:
    """Note [two-call guidance]: a pipeline that makes classifier-free guidance two denoiser calls
    per step (Wan, HunyuanVideo, Flux with true CFG) has a batch that does not split; instead,
    with ``guidance=2``, each of the two slices runs one of the two calls. But every rank runs the
    pipeline's loop, which makes the second call only after the first has returned: to run both
    at once, the second slice must know the second call's arguments at the first call. They are
    predictable: in such pipelines the two calls of a step differ only in their conditioning
    (prompt embeddings, and whatever else differs), which does not change from step to step. So
    the first step runs both calls on both slices (sequential speed) and learns which arguments
    differ between them; from then on, at the first call of a step, the second slice runs the
    first call's arguments with those replaced by the second call's of the last step, and one
    all-gather gives every rank both outputs. The second call returns the second slice's output
    only if its real arguments equal the predicted ones, compared exactly; if not, the call runs
    again on both slices (one stage: no state), so the result is always the sequential one. With
    stages in each slice a failed prediction is an error (the stale state has moved on).
    """

    def __init__(self) -> None:
        self.first: list[Any] = []  # this step's first call, flattened
        self.shapes: list[Any] = []  # the shapes of the last step's first call
        self.second: list[Any] | None = None  # the last step's second call
        self.differs: list[bool] = []  # which leaves differ between the two calls
        self.predicted: list[Any] | None = None
        self.pending: Any = None  # the second slice's output for this step's second call

    @property
    def learned(self) -> bool:
        return self.second is not None

    def predict(self, first: list[Any], spec: pytree.TreeSpec) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The second call's ``(args, kwargs)`` predicted from this step's ``first``, or None."""
        self.predicted = None
        shapes = [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in first]
        same_loop, self.shapes = shapes == self.shapes, shapes  # else another loop began (Note [a second loop])
        if self.second is None or len(self.second) != len(first) or not same_loop:
            return None
        self.predicted = [b if d else a for a, b, d in zip(first, self.second, self.differs)]
        return pytree.tree_unflatten(self.predicted, spec)

    def held(self, second: list[Any]) -> bool:
        """Whether the real second call is the predicted one."""
        return self.predicted is not None and len(second) == len(self.predicted) and \
            all(_same(a, b) for a, b in zip(second, self.predicted))

    def learn(self, second: list[Any], spec: pytree.TreeSpec) -> None:
        same_shape = len(second) == len(self.first)
        self.differs = [not _same(a, b) for a, b in zip(second, self.first)] if same_shape else []
        self.second = second if same_shape else None
        self.pending = None
