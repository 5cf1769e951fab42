"""Which weights a rank holds: the parameters and buffers of other stages' blocks are released
after planning (or never loaded, Note [stage-only loading]) and brought back from their owners."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.trace import module_of

__all__ = ["Released", "block_tensors", "foreign_tensors", "release_foreign", "restore"]

Released = dict[str, tuple[torch.Size, torch.dtype, torch.device]]  # name: (true shape, dtype, device)


def release_foreign(denoiser: torch.nn.Module, plan: Plan, stage: int, modules: list[torch.nn.Module],
                    released: Released) -> None:
    """Free parameters and buffers of blocks other stages own (kept: anything ``modules`` use),
    recording each in ``released``."""
    for name, t in foreign_tensors(denoiser, plan, stage, modules):
        if name not in released:
            released[name] = (t.shape, t.dtype, t.device)
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def restore(denoiser: torch.nn.Module, plan: Plan, released: Released, ranks: list[int],
            group: dist.ProcessGroup | None) -> None:
    """Bring back released weights from the ranks that own them (``ranks[k]`` runs stage k;
    collective over ``group``: all its ranks call it)."""
    for k, stage in enumerate(plan.stages):
        for block in stage:
            for name, t in block_tensors(denoiser, block):
                if name in released:
                    shape, dtype, device = released.pop(name)
                    t.data = torch.empty(shape, dtype=dtype, device=device)
                dist.broadcast(t.data, src=ranks[k], group=group)


def foreign_tensors(denoiser: torch.nn.Module, plan: Plan, stage: int,
                    modules: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and buffers of other stages' blocks that none of ``modules`` (this stage's
    programs) uses: what a rank releases, or never loads (Note [stage-only loading])."""
    keep = {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}
    for k, blocks in enumerate(plan.stages):
        if k != stage:
            for block in blocks:
                for name, t in block_tensors(denoiser, block):
                    if id(t) not in keep:
                        yield name, t


def block_tensors(denoiser: torch.nn.Module, block: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(qualified name, tensor)`` of every parameter and buffer of ``block``'s module."""
    module = denoiser.get_submodule(module_of(block))
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        yield f"{module_of(block)}.{name}", t
