"""Text encoders on one rank: the others receive the prompt embeddings instead of computing them.

Note [encoders on one rank]: a pipeline's text encoders run once per call (a few milliseconds of
a run of many denoising steps) but hold gigabytes (T5-XXL alone is ~9.5 GB in float16), and
every rank keeps a copy. With ``text_encoders="rank0"`` only rank 0 keeps them: on every other
rank their weights are released (0-size tensors of the same dtype and device, so ``.dtype`` and
``.device`` still answer) and a hook replaces their ``forward``. Every rank runs the same pipeline
code, so every rank calls each encoder at the same points with the same tokens; rank 0 computes
and broadcasts the output (its structure once as an object, the tensors packed in one buffer on
the device), the others return what they receive. Exact: every rank gets rank 0's values bit for
bit. ``remove()`` broadcasts the weights back from rank 0.

Example (not run here: needs a process group)::

    shared = share_text_encoders(pipeline, owner=0)   # on every rank
    ...
    shared.restore()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from diffusers.hooks import HookRegistry, ModelHook

from asyncdiff.engine.errors import decided
from asyncdiff.adapters.loading import _set_tensor
from asyncdiff.kernels.pack import PackLayout, pack, unpack

__all__ = ["ENCODER_HOOK", "SharedEncoders", "share_text_encoders", "text_encoders"]

ENCODER_HOOK = "asyncdiff_shared_encoder"


def text_encoders(pipeline: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoder components by attribute name (``text_encoder``, ``text_encoder_2``...)."""
    components = getattr(pipeline, "components", {}) or {}
    return {name: module for name, module in components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)}


class _Broadcast(ModelHook):
    """Rank ``owner`` runs the encoder and broadcasts its output; the others receive it."""

    def __init__(self, owner: int, group: dist.ProcessGroup | None, device: torch.device) -> None:
        super().__init__()
        self.owner, self.group, self.device = owner, group, device

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        me = dist.get_rank()
        mine = me == self.owner
        ran: dict[str, Any] = {}

        def encode() -> tuple[Any, list[Any]]:
            ran["output"] = self.fn_ref.original_forward(*args, **kwargs)
            ran["leaves"], spec = pytree.tree_flatten(ran["output"])
            return spec, [(t.shape, t.dtype) if isinstance(t, torch.Tensor) else ("value", t) for t in ran["leaves"]]

        # Note [failures reach every rank]: the encoder's error, not a wait, on the other ranks
        spec, described = decided(encode, src=self.owner, group=self.group, rank=me)
        output, leaves = ran.get("output"), ran.get("leaves")
        where = [i for i, d in enumerate(described) if d[0] != "value"]
        layout = PackLayout.of([described[i] for i in where])
        if mine:
            buffer = pack([leaves[i] for i in where], layout)
        else:
            buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, src=self.owner, group=self.group)
        if mine:
            return output
        values = [d[1] if d[0] == "value" else None for d in described]
        for i, view in zip(where, unpack(buffer, layout)):
            values[i] = view.clone()  # the buffer is this call's; the pipeline may keep the embeddings
        return pytree.tree_unflatten(values, spec)


class SharedEncoders:
    """The text encoders of one pipeline, kept on rank ``owner`` only (Note [encoders on one rank])."""

    def __init__(self, pipeline: Any, owner: int = 0, device: torch.device | None = None) -> None:
        """``device``: where this rank receives embeddings and, on ``restore()``, weights (default:
        the encoders' own; needed where they were built weight-free on ``meta``)."""
        self.owner = owner
        self.encoders = text_encoders(pipeline)
        self.group = dist.new_group(list(range(dist.get_world_size())))
        self.released: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        mine = dist.get_rank() == owner
        for name, encoder in self.encoders.items():
            here = device or next((t.device for t in encoder.parameters()), torch.device("cpu"))
            HookRegistry.check_if_exists_or_initialize(encoder).register_hook(
                _Broadcast(owner, self.group, here), ENCODER_HOOK)
            if not mine:
                for key, t in [*encoder.named_parameters(), *encoder.named_buffers()]:
                    self.released[f"{name}.{key}"] = (t.shape, t.dtype, here)
                    _set_tensor(encoder, key, torch.empty(0, dtype=t.dtype, device=here))

    @property
    def held_bytes(self) -> int:
        """Bytes of text-encoder weights this rank holds."""
        return sum(t.numel() * t.element_size() for e in self.encoders.values()
                   for t in (*e.parameters(), *e.buffers()))

    def restore(self) -> None:
        """Every rank holds the encoders again, from rank ``owner`` (collective); the hooks go."""
        for name, encoder in self.encoders.items():
            for key, t in [*encoder.named_parameters(), *encoder.named_buffers()]:
                if f"{name}.{key}" in self.released:
                    shape, dtype, device = self.released.pop(f"{name}.{key}")
                    t = torch.empty(shape, dtype=dtype, device=device)
                    _set_tensor(encoder, key, t)
                dist.broadcast(t.data, src=self.owner, group=self.group)
            HookRegistry.check_if_exists_or_initialize(encoder).remove_hook(ENCODER_HOOK, recurse=False)


def share_text_encoders(pipeline: Any, owner: int = 0, device: torch.device | None = None) -> SharedEncoders:
    """Keep ``pipeline``'s text encoders on rank ``owner`` only (collective: every rank calls it)."""
    return SharedEncoders(pipeline, owner, device)

