"""Which weights a rank holds: the parameters and buffers of other stages' blocks are released
after planning (or never loaded, Note [stage-only loading]) and brought back from their owners."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from asyncdiff.partition.plan import Plan
from asyncdiff.partition.specs import module_of

__all__ = ["Released", "block_tensors", "foreign_tensors", "reload", "release_foreign", "restore", "streamed"]

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
    collective over ``group``: all its ranks call it). Only tensors some rank released travel."""
    names: list[list[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, sorted(released), group=group)
    wanted = set().union(*names)
    for k, stage in enumerate(plan.stages):
        for block in stage:
            for name, t in block_tensors(denoiser, block):
                if name in wanted:
                    if name in released:
                        shape, dtype, device = released.pop(name)
                        t.data = torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(t.data, src=ranks[k], group=group)


def reload(denoiser: torch.nn.Module, released: Released,
           read: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
    """Bring back released weights from the checkpoint they were loaded from (``read(names)``,
    Note [reload from the checkpoint] in :mod:`asyncdiff.adapters.loading`); no communication."""
    tensors = {**dict(denoiser.named_parameters(remove_duplicate=False)),
               **dict(denoiser.named_buffers(remove_duplicate=False))}
    for name, value in read(sorted(released)).items():
        shape, dtype, device = released.pop(name)
        if value.shape != shape or value.dtype != dtype:
            raise ValueError(f"checkpoint tensor {name!r} is {tuple(value.shape)} {value.dtype}, but the model's is "
                             f"{tuple(shape)} {dtype}: the files changed since the load; load the pipeline again")
        tensors[name].data = value.to(device)


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


STREAM_TAG = 1 << 20  # above the channels' message tags (comm.py)


@contextlib.contextmanager
def streamed(denoiser: torch.nn.Module, plan: Plan, released: Released, ranks: list[int],
             group: dist.ProcessGroup | None, collective: dist.ProcessGroup | None,
             deadline: datetime.timedelta) -> Iterator[None]:
    """Note [verify on stage-only loads]: inside, rank ``ranks[0]`` may run the whole denoiser
    eagerly although it holds only its stage: each released block's weights arrive from their
    owner when the block is entered and are freed again when it exits, so the rank holds one
    foreign block at a time. The other ranks send (collective over ``collective``; all call it).
    A block entered a second time after its weights were freed raises ``LookupError``."""
    names = [sorted(released) if dist.get_rank() == ranks[0] else None]
    dist.broadcast_object_list(names, src=ranks[0], group=collective)
    wanted = set(names[0])
    tagged = [(k, block, name, t) for k, blocks in enumerate(plan.stages) for block in blocks if k > 0
              for name, t in block_tensors(denoiser, block) if name in wanted]
    me = dist.get_rank()
    if me != ranks[0]:  # an owner: post every send at once, so the receiver may take them in any order
        works = [dist.isend(t.data, ranks[0], group, STREAM_TAG + i)
                 for i, (k, _, _, t) in enumerate(tagged) if ranks[k] == me]
        try:
            yield
        finally:
            for work in works:
                work.wait(deadline)
        return
    by_block: dict[str, list[tuple[int, int, str, torch.Tensor]]] = {}
    for i, (k, block, name, t) in enumerate(tagged):
        by_block.setdefault(module_of(block), []).append((i, k, name, t))
    done: set[str] = set()

    def fetch(module_name: str) -> None:
        if module_name in done:
            raise LookupError(f"{module_name} runs twice in one call; its weights were streamed once")
        for i, k, name, t in by_block[module_name]:
            shape, dtype, device = released[name]
            t.data = torch.empty(shape, dtype=dtype, device=device)
            dist.irecv(t.data, ranks[k], group, STREAM_TAG + i).wait(deadline)

    def drop(module_name: str) -> None:
        done.add(module_name)
        for _, _, _, t in by_block[module_name]:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)

    handles = []
    for module_name in by_block:
        module = denoiser.get_submodule(module_name)
        handles.append(module.register_forward_pre_hook(lambda *_, m=module_name: fetch(m)))
        handles.append(module.register_forward_hook(lambda *_, m=module_name: drop(m)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module_name in set(by_block) - done:  # the eager run stopped early: receive the rest, then drop
            if not any(t.numel() for _, _, _, t in by_block[module_name]):
                fetch(module_name)
            drop(module_name)
