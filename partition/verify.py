"""Check that a split program computes what the denoiser computes, before the engine relies on it.

Note [verify]: the engine replaces the denoiser by a traced graph cut into stages. A trace can
differ from the module it came from without any error: ``x += y`` on a value that another block
also reads (eager code mutates the one tensor both hold; a trace that records an out-of-place
add gives the second reader the old value), a branch that the meta tensors of the trace took
differently, a stateful block. So on the first call, while every weight is still present, the
engine runs the stage programs one after another in one process on the real inputs and compares
the result with the denoiser's own output. They must agree to float noise: the same kernels run
in the same order, so on one device they agree bit for bit; the tolerance (1e-4 of the output's
largest magnitude in float32, 1e-2 in 16-bit dtypes) only absorbs kernels that are not
deterministic. If they differ, the check finds the first block (in program order) whose output
differs from the eager run's and names it in the error, with what to try. It costs one eager and
one split forward pass on the planning rank (about twice a denoiser call); ``verify=False`` skips it.

Example:
    >>> import torch
    >>> from asyncdiff.partition.plan import Plan
    >>> from asyncdiff.partition.split import split_graph
    >>> from asyncdiff.partition.trace import trace_denoiser
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    >>> x = torch.randn(2, 4)
    >>> traced = trace_denoiser(net, (x,), {})
    >>> verify_split(traced, split_graph(traced, Plan(stages=(("0", "1"), ("2",)))), net, (x,), {}) is None
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from asyncdiff.partition.split import SplitDenoiser
from asyncdiff.partition.specs import module_of
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["ADVICE", "compare_outputs", "difference", "eager", "fresh", "mismatch_text", "run_split", "tensor_leaves", "verify_split"]

_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative to the largest |value|; 16-bit: 1e-2


def run_split(split: SplitDenoiser, denoiser: torch.nn.Module, tensors: list[torch.Tensor]) -> list[Any]:
    """The split's output leaves, running its segments in program order in this process."""
    values: dict[str, Any] = {}
    leaves: tuple[Any, ...] = ()
    for seg in split.segments:
        outputs, seg_leaves = seg.module(denoiser)(*tensors, *[values[v] for v in seg.inputs])
        values.update(zip(seg.outputs, outputs))
        if seg.index == split.output_segment:
            leaves = seg_leaves
    return list(leaves)


def verify_split(traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """None where the split reproduces ``denoiser(*args, **kwargs)`` (Note [verify]); else the error."""
    tensors = traced.flatten_call(args, kwargs)  # before the eager call, which may consume lists it is given
    with torch.no_grad():
        want = tensor_leaves(eager(denoiser)(*fresh(args), **fresh(kwargs)))
        got = tensor_leaves(traced.unflatten_output(run_split(split, denoiser, [t.clone() for t in tensors])))
    mismatch = compare_outputs(got, want)
    if mismatch is None:
        return None
    if mismatch[0] < 0:
        return (f"the split program of {type(denoiser).__name__} returns {len(got)} tensors where the denoiser "
                f"returns {len(want)}; this denoiser cannot be split as traced (try policy='coarse')")
    where = _first_differing_block(traced, denoiser, args, kwargs)
    return f"{mismatch_text(denoiser, mismatch)} ({where}). {ADVICE}"


ADVICE = ("The trace disagrees with eager execution there: typically an in-place update (x += y, x[...] = y) of a "
          "value that another block also reads, or a branch on tensor values. Try policy='coarse' (the code then "
          "runs inside one block), a plan that keeps those blocks on one stage, or verify=False to run anyway, "
          "knowing the result is not the model's")


def compare_outputs(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[int, str] | None:
    """None where the tensor leaves ``got`` equal ``want`` to float noise (Note [verify]); else the
    first differing output's index and how it differs (index -1: a different number of tensors)."""
    if len(got) != len(want):
        return -1, f"{len(got)} tensors against {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        error = difference(g, w)
        if error is not None:
            return i, error
    return None


def mismatch_text(denoiser: torch.nn.Module, mismatch: tuple[int, str]) -> str:
    return f"the split program does not reproduce {type(denoiser).__name__}: output {mismatch[0]} differs by {mismatch[1]}"


def eager(denoiser: torch.nn.Module) -> Any:
    """The denoiser's own ``forward``, past any hook on the instance (the engine itself is one)."""
    return type(denoiser).forward.__get__(denoiser)


def fresh(tree: Any) -> Any:
    """A copy whose containers and tensors are new: the eager call may mutate what it is given."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def difference(got: torch.Tensor, want: torch.Tensor, looser: float = 1.0) -> str | None:
    """None when ``got`` equals ``want`` to float noise (``looser`` times the tolerance); else how they differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} against {tuple(want.shape)} {want.dtype}"
    if torch.equal(got, want) or got.numel() == 0:
        return None
    if not got.is_floating_point():
        return "in integer values"
    g, w = got.float(), want.float()
    same_nan = torch.isnan(g) == torch.isnan(w)
    if not bool(same_nan.all()):
        return "in where the NaNs are"
    finite = ~torch.isnan(w)
    err = float((g - w)[finite].abs().max()) if bool(finite.any()) else 0.0
    scale = float(w[finite].abs().max()) if bool(finite.any()) else 0.0
    allowed = _TOLERANCE.get(got.dtype, 1e-2) * looser * max(scale, 1e-30)
    if err <= allowed:
        return None
    return f"{err:.3g} (max abs; {allowed:.3g} allowed, the output's largest magnitude is {scale:.3g})"


def _first_differing_block(traced: TracedDenoiser, denoiser: torch.nn.Module, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> str:
    """Which block's output first differs between the traced graph and eager execution."""
    by_module: dict[str, list[Any]] = {}
    handles = []
    for name in dict.fromkeys(module_of(n) for n in traced.node_block.values()):
        def record(_module: torch.nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
            # copies: later code may update an output in place (exactly what this hunts for)
            by_module.setdefault(name, []).append([t.clone() for t in tensor_leaves(output)])
        handles.append(denoiser.get_submodule(name).register_forward_hook(record))
    try:
        with torch.no_grad():
            eager(denoiser)(*fresh(args), **fresh(kwargs))
    finally:
        for h in handles:
            h.remove()
    traced_outputs: list[tuple[str, list[torch.Tensor]]] = []

    class _Record(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "call_module":
                traced_outputs.append((traced.node_block[n.name], [t.clone() for t in tensor_leaves(out)]))
            return out

    with torch.no_grad():
        _Record(traced.graph_module(denoiser)).run(*traced.flatten_call(fresh(args), fresh(kwargs)))
    calls: dict[str, int] = {}
    for block, outs in traced_outputs:
        name = module_of(block)
        k = calls.get(name, 0)
        calls[name] = k + 1
        recorded = by_module.get(name, [])
        ref = recorded[k] if k < len(recorded) else []
        if len(ref) != len(outs) or any(difference(a, b) is not None for a, b in zip(outs, ref)):
            return f"the first block whose output differs from eager execution is {block!r}"
    return "every block's output agrees with eager execution; the difference is in top-level code between blocks"
