"""Per-block costs: measured time, FLOPs, parameter bytes and output bytes.

Time is the median of ``repeats`` runs after ``warmup`` runs, on the device the model is on.
FLOPs come from ``torch.utils.flop_counter`` and, like bytes, need no real weights: with
``measure_time=False`` the profile runs on the weight-free ``meta`` skeleton.

Example:
    >>> import torch
    >>> from asyncdiff.partition.trace import trace_denoiser
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    >>> x = torch.randn(2, 8)
    >>> costs = profile_blocks(trace_denoiser(net, (x,), {}), net, (x,), {}, repeats=1)
    >>> costs["0"].flops
    256
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from asyncdiff.partition.specs import ROOT, module_of

from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["BlockCost", "profile_blocks"]


@dataclass(frozen=True)
class BlockCost:
    name: str
    seconds: float
    flops: int
    param_bytes: int
    out_bytes: int


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, timed: bool, names: dict[str, str]) -> None:
        super().__init__(module)
        self.timed, self.names = timed, names  # names: call node -> block name
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.out_bytes: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        self.node_name = n.name
        return super().run_node(n)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        name = self.names[self.node_name]
        counter = FlopCounterMode(display=False)
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = leaves[0].device if leaves else torch.device("cpu")
        if self.timed:
            _sync(device)
            start = time.perf_counter()
            out = super().call_module(target, args, kwargs)
            _sync(device)
            self.seconds[name] = time.perf_counter() - start
        else:
            with counter:
                out = super().call_module(target, args, kwargs)
            self.flops[name] = counter.get_total_flops()
        self.out_bytes[name] = _nbytes(out)
        return out


def profile_blocks(traced: TracedDenoiser, denoiser: torch.nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any], *, repeats: int = 3, warmup: int = 1,
                   measure_time: bool = True) -> dict[str, BlockCost]:
    """Cost of every block of ``traced`` (latent blocks and replicated ones), keyed by name. FLOPs
    are counted on meta tensors, or on the call's values where the blocks need them (a trace made
    with real values, Note [value trace], whose weights are then here)."""
    if measure_time or traced.by_values:
        module, tensors = traced.graph_module(denoiser), traced.flatten_call(args, kwargs)
    else:
        module = traced.graph_module(getattr(traced.root, ROOT))
        tensors = [torch.empty_like(t, device="meta") for t in traced.flatten_call(args, kwargs)]
    with torch.no_grad():
        flops_run = _Recorder(module, timed=False, names=traced.node_block)
        flops_run.run(*[t.clone() for t in tensors])
        times: dict[str, list[float]] = {}
        if measure_time:
            for i in range(warmup + repeats):
                run = _Recorder(module, timed=True, names=traced.node_block)
                run.run(*[t.clone() for t in tensors])  # a graph may update an input in place
                if i >= warmup:
                    for name, s in run.seconds.items():
                        times.setdefault(name, []).append(s)
    skeleton = getattr(traced.root, ROOT)
    costs = {}
    for name, flops in flops_run.flops.items():
        block = skeleton.get_submodule(module_of(name))
        params = sum(p.numel() * p.element_size() for p in block.parameters())
        costs[name] = BlockCost(name, statistics.median(times[name]) if name in times else 0.0, flops,
                                params, flops_run.out_bytes[name])
    return costs
