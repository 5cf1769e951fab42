"""Stage-only loading: each rank reads from the checkpoint only the weights its stage uses.

Note [stage-only loading]: attaching the engine to a loaded pipeline means every rank first holds
the whole denoiser, and releases other stages' weights only after the first call has planned the
split; the peak per rank is the full model. Here the plan comes first, from the model's structure
alone: the denoiser is built from its config with its parameters on ``meta`` (no memory), the
pipeline's own call is captured up to the denoiser's first call (Note in
:mod:`asyncdiff.adapters.capture`), and the blocks are planned on FLOP counts, which need no
weights and are the same on every rank (so every rank makes the same plan without talking to
the others), or on a given plan, or on a cached one (Note [plan cache]). Then each rank reads,
lazily with ``safetensors.safe_open``, only the tensors its stage programs reference plus those
every stage needs (replicated blocks such as the time embedding, top-level parameters), straight
onto its device in the checkpoint's dtype or ``torch_dtype``. The tensors of other stages' blocks
stay 0-size placeholders that the engine counts as released, so ``remove()`` brings them back
(Note [reload from the checkpoint]) and every rank has the whole denoiser again. The other
pipeline components (text encoders, VAE) load as usual.

Note [reload from the checkpoint]: on the CPU a convolution's last bits depend on where its weight
sits in memory, not only on its values. safetensors gives each tensor a buffer at an address that
is not 64-byte aligned (8 or 56 modulo 64 here), a fresh torch tensor is 64-byte aligned, and the
tiny SD 1.5 UNet with its weights cloned (the same values) gives latents 2.7e-5 apart (only its
Conv2d weights matter: cloning the Linear and norm weights changes nothing). Weights received from
their owners land in fresh tensors, so a pipeline made whole that way computes other bits than the
same pipeline loaded whole. ``remove()`` after a stage-only load therefore reads the released
weights from the checkpoint again, as a whole load reads them (:class:`Checkpoint`), and the
pipeline afterwards computes exactly what the whole pipeline loaded by ``from_pretrained`` does;
only what the checkpoint lacks (buffers ``__init__`` builds) comes from the owners.

A denoiser whose code depends on tensor values cannot be traced weight-free (Note [value trace]
in :mod:`asyncdiff.partition.trace`): ``AsyncDiff.from_pretrained`` then loads it whole on every
rank, with a warning, and the engine plans and releases at the first call, as for a loaded pipeline.

The check of Note [verify] needs every weight in one process, so for a stage-only load it runs
after the first warm-up step, with the other stages' weights streamed to the checking rank one
block at a time (Note [verify on stage-only loads] in :mod:`asyncdiff.engine.planning`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from asyncdiff.partition.plan import Plan

__all__ = ["Checkpoint", "StageLoad", "load_stage_only", "read_model_index", "stage_in_memory"]

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class Checkpoint:
    """A denoiser's safetensors files, read tensor by tensor onto ``device`` as the stage was
    (``files``: tensor name -> file; ``dtypes``: name -> dtype the model holds it in)."""

    def __init__(self, files: dict[str, Path], dtypes: dict[str, torch.dtype], device: torch.device) -> None:
        self.files, self.dtypes, self.device = files, dtypes, device
        self._opened: dict[Path, Any] = {}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``names`` the checkpoint holds (the others are left out)."""
        return {name: self.tensor(name) for name in names if name in self.files}

    def tensor(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._opened:
            self._opened[file] = _open(file, self.device)
        with _named_if_damaged(file, name):
            return self._opened[file].get_tensor(name).to(self.dtypes[name])


class StageLoad:
    """What :func:`load_stage_only` made: the pipeline (its denoiser holding this stage's weights),
    the plan, where the plan came from, the placeholders of weights other ranks hold, and the
    checkpoint it read (None for :func:`stage_in_memory`)."""

    def __init__(self, pipeline: Any, plan: Plan, source: str,
                 released: dict[str, tuple[torch.Size, torch.dtype, torch.device]],
                 checkpoint: Checkpoint | None = None) -> None:
        self.pipeline, self.plan, self.source, self.released = pipeline, plan, source, released
        self.checkpoint = checkpoint


def load_stage_only(path: str, *, denoiser_attr: str | None, latent: str | None, model_n: int, stage: int,
                    device: torch.device, torch_dtype: torch.dtype | None = None, variant: str | None = None,
                    plan: Plan | None = None, policy: Any = "fine", layouts: tuple[str, ...] = ("contiguous", "wrapped"),
                    max_slowdown: float = 0.05, bandwidth: float | None = None,
                    call_kwargs: dict[str, Any] | None = None,
                    components: dict[str, torch.nn.Module] | None = None, cost: str = "flops") -> StageLoad:
    """Load the diffusers pipeline at ``path`` (a folder, or a hub id in the local cache) with its
    denoiser holding only stage ``stage`` of ``model_n`` (Note [stage-only loading]);
    ``components``: pipeline components to use as given instead of loading them (weight-free
    text encoders, Note [encoders on one rank]); ``cost``: ``"flops"`` balances compute,
    ``"bytes"`` the weights each rank holds (for a model that does not fit one device)."""
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    start = time.perf_counter()
    folder, index = read_model_index(path)
    attr = denoiser_attr or next((a for a in ("transformer", "unet") if isinstance(index.get(a), list)
                                  and index[a][0] is not None), None)
    if attr is None or not isinstance(index.get(attr), list):
        raise ValueError(f"{folder} has no 'unet' or 'transformer' component in model_index.json; pass "
                         f"denoiser_attr= naming the denoiser's component (one of {sorted(index)})")
    library, class_name = index[attr]
    cls = getattr(__import__(library), class_name)
    config = cls.load_config(folder / attr)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers built by __init__ stay real
        skeleton = cls.from_config(config)
    skeleton.eval()
    files = _checkpoint_files(folder / attr, variant)
    dtypes = _dtypes(files, torch_dtype)
    keep = getattr(skeleton, "_keep_in_fp32_modules", None) or []
    for name, dtype in dtypes.items():  # as diffusers' from_pretrained: these modules stay float32 (Wan's norms)
        if torch_dtype is not None and dtype.is_floating_point and set(name.split(".")) & set(keep):
            dtypes[name] = torch.float32
    for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers()):
        if t.is_meta and name in dtypes:
            _set_tensor(skeleton, name, torch.empty_like(t, dtype=dtypes[name]))  # still meta, right dtype
    pipeline = DiffusionPipeline.from_pretrained(folder, **{attr: skeleton}, **(components or {}),
                                                 torch_dtype=torch_dtype, variant=variant)

    plan, source, foreign = _stage_plan(pipeline, attr, skeleton, latent=latent, model_n=model_n, stage=stage,
                                        plan=plan, policy=policy, layouts=layouts, max_slowdown=max_slowdown,
                                        bandwidth=bandwidth, call_kwargs=call_kwargs, cost=cost)
    released: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
    checkpoint = Checkpoint(files, dtypes, device)
    for name, t in [*skeleton.named_parameters(remove_duplicate=False), *skeleton.named_buffers(remove_duplicate=False)]:
        if name in foreign:
            released[name] = (t.shape, t.dtype, device)
            _set_tensor(skeleton, name, torch.empty(0, dtype=t.dtype, device=device))
        elif name in files:
            _set_tensor(skeleton, name, checkpoint.tensor(name))
        elif t.is_meta:
            raise ValueError(f"{class_name} weight {name!r} is not in the checkpoint at {folder / attr}; stage-only "
                             "loading needs every weight a stage uses in the safetensors files")
        else:
            _set_tensor(skeleton, name, t.to(device))  # a buffer made by __init__ (not saved)
    if device.type != "cpu":
        for name, component in pipeline.components.items():
            if name != attr and isinstance(component, torch.nn.Module):
                component.to(device)
    log.info("loaded stage %d of %d from %s in %.2f s (plan %s): %d weights here, %d left to the other stages",
             stage, model_n, folder, time.perf_counter() - start, source, len(files) - len(released), len(released))
    return StageLoad(pipeline, plan, source, released, checkpoint)


def stage_in_memory(pipeline: Any, attr: str, *, latent: str | None, model_n: int, stage: int,
                    device: torch.device, plan: Plan | None = None, policy: Any = "fine",
                    layouts: tuple[str, ...] = ("contiguous", "wrapped"), max_slowdown: float = 0.05,
                    bandwidth: float | None = None, call_kwargs: dict[str, Any] | None = None,
                    cost: str = "flops") -> StageLoad:
    """Note [stage-only loading] for a pipeline already in memory (``AsyncDiff(pipeline)`` with the
    pipeline on the CPU and a GPU to run on): the plan made as :func:`load_stage_only` makes it,
    from a weight-free copy of the denoiser ``attr`` and the pipeline's own call (the other
    components moved to ``device`` first, so the call is prepared there); then the weights of
    other stages' blocks are freed on the CPU and only what this stage uses moves to ``device``."""
    from asyncdiff.partition.specs import meta_copy

    denoiser = getattr(pipeline, attr)
    for name, component in pipeline.components.items():
        if name != attr and isinstance(component, torch.nn.Module):
            component.to(device)
    plan, source, foreign = _stage_plan(pipeline, attr, meta_copy(denoiser), latent=latent, model_n=model_n,
                                        stage=stage, plan=plan, policy=policy, layouts=layouts,
                                        max_slowdown=max_slowdown, bandwidth=bandwidth, call_kwargs=call_kwargs,
                                        cost=cost)
    released: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
    for name, t in [*denoiser.named_parameters(remove_duplicate=False), *denoiser.named_buffers(remove_duplicate=False)]:
        if name in foreign:
            released[name] = (t.shape, t.dtype, device)
            t.data = torch.empty(0, dtype=t.dtype)
    denoiser.to(device)
    return StageLoad(pipeline, plan, source, released)


def _stage_plan(pipeline: Any, attr: str, skeleton: torch.nn.Module, *, latent: str | None, model_n: int, stage: int,
                plan: Plan | None, policy: Any, layouts: tuple[str, ...], max_slowdown: float,
                bandwidth: float | None, call_kwargs: dict[str, Any] | None, cost: str) -> tuple[Plan, str, set[str]]:
    """(plan, where it came from, the tensors stage ``stage`` does not use) for ``pipeline``'s
    denoiser ``attr``, traced and counted on ``skeleton`` (its weight-free copy) with the
    pipeline's own first call (``call_kwargs``; default an empty prompt), or ``plan`` as given."""
    from asyncdiff.adapters.capture import capture_denoiser_call
    from asyncdiff.engine.runtime import foreign_tensors
    from asyncdiff.partition.cache import cached_plan
    from asyncdiff.partition.profile import profile_blocks
    from asyncdiff.partition.split import split_graph
    from asyncdiff.partition.trace import trace_denoiser

    args, kwargs = capture_denoiser_call(pipeline, attr, **({"prompt": ""} | (call_kwargs or {})))
    traced = trace_denoiser(skeleton, args, kwargs, policy=policy, latent=latent)
    source = "given"
    if plan is None:
        plan, source = cached_plan(traced, model_n, lambda: profile_blocks(traced, skeleton, args, kwargs,
                                                                            measure_time=False),
                                   cost=cost, bandwidth=bandwidth, layouts=layouts, max_slowdown=max_slowdown,
                                   device="meta")
    program = split_graph(traced, plan).stages[stage]
    modules = [seg.module(skeleton) for seg in program.segments]
    return plan, source, {name for name, _ in foreign_tensors(skeleton, plan, stage, modules)}


def read_model_index(path: str) -> tuple[Path, dict[str, Any]]:
    """The pipeline folder (a hub id resolves to its files in the local cache) and its model_index.json."""
    if os.path.isdir(path):
        folder = Path(path)
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path))  # downloaded where the hub is reachable and the cache lacks it
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{path!r} is not a diffusers pipeline folder (no model_index.json); pass the folder "
                         "that save_pretrained wrote, or a hub id")
    return folder, json.loads((folder / "model_index.json").read_text())


def _checkpoint_files(folder: Path, variant: str | None, stem: str = "diffusion_pytorch_model") -> dict[str, Path]:
    """Tensor name -> safetensors file of a diffusers (or, ``stem="model"``, transformers) model
    folder (one file, or shards with an index)."""
    stem = stem + (f".{variant}" if variant else "")
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                name = next(n for n, f in files.items() if f == file)
                raise ValueError(f"checkpoint shard {file} is missing ({index.name} names it for {name!r} and "
                                 f"others); download or save the model again")
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"{folder} has no {stem}.safetensors (or its index): stage-only loading reads safetensors; "
                     "save the model with save_pretrained(safe_serialization=True), or load the pipeline whole "
                     "and use AsyncDiff(pipeline, ...)")


def _dtypes(files: dict[str, Path], torch_dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The dtype each tensor will have: ``torch_dtype`` for floating ones where given, else as stored."""
    dtypes = {}
    for file in set(files.values()):
        with _open(file) as f:
            for name in f.keys():
                stored = _SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]
                dtypes[name] = torch_dtype if torch_dtype is not None and stored.is_floating_point else stored
    return dtypes


def encoder_skeletons(folder: Path, index: dict[str, Any], torch_dtype: torch.dtype | None,
                      variant: str | None) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders built from their configs with weight-free (meta) parameters
    in the dtype they will have (``torch_dtype``, else the checkpoint's): for the ranks that never
    run them (Note [encoders on one rank] in :mod:`asyncdiff.adapters.encoders`)."""
    from accelerate import init_empty_weights

    skeletons = {}
    for name, entry in index.items():
        if not (name.startswith("text_encoder") and isinstance(entry, list) and entry[0]):
            continue
        cls = getattr(__import__(entry[0]), entry[1])
        with init_empty_weights(include_buffers=False):
            model = cls(cls.config_class.from_pretrained(folder / name))
        stored = list(_dtypes(_checkpoint_files(folder / name, variant, stem="model"), torch_dtype).values())
        floating = [d for d in stored if d.is_floating_point]
        dtype = torch_dtype or (max(set(floating), key=floating.count) if floating else torch.float32)
        for key, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_meta and t.is_floating_point():
                _set_tensor(model, key, torch.empty_like(t, dtype=dtype))
        skeletons[name] = model.eval()
    return skeletons


def _open(file: Path, device: torch.device | None = None) -> Any:
    """``safe_open(file)`` on ``device``; a damaged file is an error that names it."""
    from safetensors import safe_open

    with _named_if_damaged(file):
        return safe_open(str(file), framework="pt", device=str(device or "cpu"))


@contextlib.contextmanager
def _named_if_damaged(file: Path, tensor: str | None = None) -> Iterator[None]:
    """Reading ``file`` (``tensor`` of it) inside: an error of a damaged or incomplete file names them."""
    try:
        yield
    except Exception as err:
        if not isinstance(err, (OSError, RuntimeError, ValueError)) and type(err).__name__ != "SafetensorError":
            raise
        what = f"tensor {tensor!r} from " if tensor else ""
        raise ValueError(f"cannot read {what}checkpoint file {file} ({type(err).__name__}: {err}): it is damaged "
                         f"or incomplete; download or save the model again") from err


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value
