"""Memory per rank: the weights each rank holds and its process's peak."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["memory_per_rank", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` of ``/proc/self/status`` (of this program
    only; ``ru_maxrss`` keeps the high-water mark of the process a launcher forked from), else
    ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_per_rank(denoiser: torch.nn.Module, encoders: list[torch.nn.Module] = ()) -> dict[str, Any]:
    """Per rank (a list in rank order; every rank must call this): the denoiser's weights the rank
    holds (released stages hold none), the text encoders' (Note [encoders on one rank]), and the
    process's peak memory: CUDA's most allocated on a GPU, else the peak resident set size (the
    whole process: libraries and other components too)."""
    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    held, text = nbytes(denoiser), sum(nbytes(e) for e in encoders)
    device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    else:
        peak, kind = peak_rss_bytes(), "peak RSS"
    mine = (held, text, peak)
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return {"denoiser_mb": [round(h / 1e6, 2) for h, _, _ in every],
            "text_encoder_mb": [round(t / 1e6, 2) for _, t, _ in every],
            "peak_mb": [round(p / 1e6, 1) for _, _, p in every], "peak_memory": kind}
