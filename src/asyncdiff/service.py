"""What each rank of a served pipeline runs: load once, then one pipeline call per batch of requests.

Note [serving loop]: ``asyncdiff serve`` keeps one :class:`~asyncdiff.engine.workers.WorkerGroup`
(Note [persistent workers]). Its driver, the HTTP process, submits :func:`load` once, then
:func:`generate` with a batch of frozen :class:`~asyncdiff.request.GenerationRequest` records
to every rank alike, so every rank makes the same pipeline call (the engine's collectives and
stage transfers need that). A rank never raises out of :func:`generate`: it replies with a
:class:`Reply`, rank 0's carrying the encoded pictures. A call that failed on every rank before
posting any stage transfer (the pipeline's own input checks, a denoiser call whose plan every rank
refused) is *clean*: nothing is in flight, so the group keeps serving; any other failure (on some
ranks only, or inside denoising, a rank that died, a call past the group's deadline) makes the
driver restart the group. :func:`load` ends with one call of the server's own settings
(``--steps``, ``--height``/``--width``), so the plan is made (and measured, Note [measured plan
choice]) and the first signature compiled before the server says it is ready.

Rank 0 emits ``("step", job, done, total, seconds)`` after every denoising step (diffusers'
``callback_on_step_end``), which the server turns into a video job's progress and the per-step
time histogram.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from asyncdiff.engine.comm import posted
from asyncdiff.engine.errors import Failure
from asyncdiff.engine.workers import emit
from asyncdiff.generate import GenerateSpec, build, pipeline_call
from asyncdiff.outputs import write_video
from asyncdiff.request import GenerationRequest

__all__ = ["Reply", "encode", "generate", "load"]

log = logging.getLogger(__name__)

_LOADED: dict[str, Any] = {}  # this rank's spec, pipeline and engine


@dataclass(frozen=True)
class Reply:
    """One rank's answer to a batch: rank 0's ``outputs`` (per request, its encoded files), or
    the failure (``error``: one line, ``clean``: Note [serving loop])."""

    outputs: list[list[bytes]] | None = None
    media_type: str = "image/png"
    error: str | None = None
    clean: bool = True


def load(spec: GenerateSpec) -> dict[str, Any]:
    """Build this rank's pipeline and engine (every rank); returns what the server lists."""
    import inspect

    started = time.perf_counter()
    pipe, async_diff = build(spec)
    pipe.set_progress_bar_config(disable=True)
    _LOADED.clear()
    _LOADED.update(spec=spec, pipe=pipe, async_diff=async_diff)
    params = inspect.signature(type(pipe).__call__).parameters
    log.info("loaded %s in %.1f s", type(pipe).__name__, time.perf_counter() - started)
    # Note [serving loop]: one call of the server's own settings before it is ready, so that the
    # plan is made (measured: Note [measured plan choice]) and cached, not in the first request
    started = time.perf_counter()
    reply = generate([spec.request])
    if reply.error is not None:
        raise RuntimeError(f"the warm-up call ({spec.steps} steps, {spec.height}x{spec.width}) failed: {reply.error}")
    log.info("warm-up call (plan made, compiled) in %.1f s", time.perf_counter() - started)
    return {"pipeline": type(pipe).__name__, "video": "num_frames" in params, "params": sorted(params)}


def generate(requests: Sequence[GenerationRequest], job: str | None = None) -> Reply:
    """One pipeline call for ``requests`` (alike by :func:`~asyncdiff.request.batch_key`) on this
    rank; never raises (Note [serving loop])."""
    spec, pipe, async_diff = (_LOADED[k] for k in ("spec", "pipe", "async_diff"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    before = posted()
    try:
        kwargs = pipeline_call(spec, pipe, {}, list(requests))
        if "batch_size" in kwargs:  # an unconditional pipeline: as many images as the requests ask for
            kwargs["batch_size"] = sum(r.images for r in requests)
        kwargs.pop("output_type", None)  # pictures, not the latents generate keeps (Note [output as latents])
        if rank == 0:
            _report_steps(kwargs, job, requests[0].steps)
        with torch.no_grad():
            output = pipe(**kwargs)
        for engine in (async_diff.engines.values() if async_diff is not None else ()):
            engine.drain()
        outputs, media = encode(output, requests) if rank == 0 else (None, "")
        return Reply(outputs=outputs, media_type=media)
    except Exception as err:  # noqa: BLE001 -- Note [serving loop]: a reply, never a dead loop
        failure = Failure.of(err, rank)
        log.debug("%s", failure.line(), exc_info=err)
        clean = posted() == before
        if async_diff is not None and clean:
            async_diff.reset_state()  # nothing in flight; else the driver restarts the group anyway
        return Reply(error=failure.cause(), clean=clean)


def _report_steps(kwargs: dict[str, Any], job: str | None, total: int) -> None:
    """Emit each step's end and seconds (rank 0) through the call's ``callback_on_step_end``."""
    inner = kwargs.get("callback_on_step_end")
    if inner is None:
        return
    last = [time.perf_counter()]

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        now = time.perf_counter()
        emit(("step", job, i + 1, total, now - last[0]))
        last[0] = now
        return inner(pipe, i, t, tensors)

    kwargs["callback_on_step_end"] = on_step_end


def encode(output: Any, requests: Sequence[GenerationRequest]) -> tuple[list[list[bytes]], str]:
    """Each request's files from one call's output, in request order: its pictures in its
    ``output_format``, or its videos as MP4."""
    frames = getattr(output, "frames", None)
    if frames is not None:
        videos = [_mp4(video, requests[0].fps or 7) for video in frames]
        return _split(videos, requests), "video/mp4"
    images = output.images
    if isinstance(images, torch.Tensor):  # in [0, 1], (N, C, H, W)
        from diffusers.image_processor import VaeImageProcessor

        images = VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
    files = []
    for image, request in zip(images, (r for r in requests for _ in range(r.images))):
        buffer = io.BytesIO()
        image.save(buffer, format=request.output_format.upper())
        files.append(buffer.getvalue())
    return _split(files, requests), f"image/{requests[0].output_format}"


def _split(files: list[bytes], requests: Sequence[GenerationRequest]) -> list[list[bytes]]:
    out, at = [], 0
    for request in requests:
        out.append(files[at:at + request.images])
        at += request.images
    return out


def _mp4(frames: Any, fps: int) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "video.mp4")
        write_video(frames, path, fps)
        with open(path, "rb") as f:
            return f.read()
