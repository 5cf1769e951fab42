"""Block policies: which modules of a denoiser the tracer keeps as opaque *blocks*.

A block is the unit the planner moves between stages. ``coarse`` keeps the denoiser's direct
children (in a UNet: ``conv_in``, each down/up block, the mid block, ...). ``fine`` goes one level
deeper (each resnet, attention/transformer block, down/upsampler), which SD-shaped UNets need to
balance: their full-resolution blocks dominate the cost. ``finer`` splits once more (each
transformer layer inside an attention block), for models whose large blocks still limit the
balance (many-layer SDXL attention blocks). Containers (``ModuleList``,
``ModuleDict``, ``Sequential``) are transparent and do not count as a level.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> sorted(BlockPolicy.fine().blocks(net))
    ['0', '1']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["BlockPolicy", "CONTAINERS"]

CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


@dataclass(frozen=True)
class BlockPolicy:
    """``depth``: how many non-container module levels below the root a block sits at most.

    ``predicate(name, module)``, when given, decides instead: a module for which it returns
    True is a block (its children are not looked at); modules without children are always blocks.
    """

    depth: int = 2
    predicate: Callable[[str, torch.nn.Module], bool] | None = None

    def __post_init__(self) -> None:
        if self.predicate is None and self.depth < 1:
            raise ValueError(f"BlockPolicy.depth={self.depth} must be >= 1 (1 = coarse, 2 = fine)")

    @classmethod
    def coarse(cls) -> BlockPolicy:
        return cls(depth=1)

    @classmethod
    def fine(cls) -> BlockPolicy:
        return cls(depth=2)

    @classmethod
    def finer(cls) -> BlockPolicy:
        return cls(depth=3)

    @classmethod
    def parse(cls, policy: str | BlockPolicy | Callable[[str, torch.nn.Module], bool]) -> BlockPolicy:
        if isinstance(policy, BlockPolicy):
            return policy
        if callable(policy):
            return cls(predicate=policy)
        if policy == "coarse":
            return cls.coarse()
        if policy == "fine":
            return cls.fine()
        if policy == "finer":
            return cls.finer()
        raise ValueError(
            f"block policy {policy!r} is unknown; use 'coarse', 'fine', 'finer', a BlockPolicy, "
            "or a predicate (name, module) -> bool"
        )

    def blocks(self, root: torch.nn.Module) -> set[str]:
        """Qualified names of the modules of ``root`` that are blocks under this policy."""
        found: set[str] = set()

        def visit(module: torch.nn.Module, prefix: str, level: int) -> None:
            for name, child in module.named_children():
                qualname = f"{prefix}{name}"
                if isinstance(child, CONTAINERS):
                    visit(child, qualname + ".", level)
                    continue
                leaf = next(child.children(), None) is None
                if self.predicate is not None:
                    chosen = leaf or self.predicate(qualname, child)
                else:
                    chosen = leaf or level + 1 >= self.depth
                if chosen:
                    found.add(qualname)
                else:
                    visit(child, qualname + ".", level + 1)

        visit(root, "", 0)
        return found
