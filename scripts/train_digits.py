"""Train the shipped digits models: the DDPM UNet, the classifier that judges its samples, and the DiT.

Writes, into ``src/asyncdiff/models/assets/`` (or ``--out``):

- ``digits_classifier.safetensors``: :class:`asyncdiff.fidelity.DigitClassifier`, trained on
  the 80% training split of :func:`asyncdiff.models.digits.digits_split` (small random shifts and
  pixel noise as augmentation); its accuracy on the 20% held out is printed.
- ``digits_unet.safetensors`` (fp16, the EMA weights) and ``digits_unet.json`` (the
  ``UNet2DModel`` config): an unconditional DDPM with epsilon prediction on all 1797 digits,
  under :data:`asyncdiff.models.digits.SCHEDULE`.
- with ``--model dit``, instead: ``digits_dit.safetensors`` (fp16, EMA) and ``digits_dit.json``,
  the class-conditional ``DiTTransformer2DModel`` of :mod:`asyncdiff.models.digits_dit`, trained
  the same way with the digit labels as classes (its own label dropout, 10 %, teaches it the
  unconditional class too); the classifier is not retrained.
- with ``--model flow``: ``digits_flow.safetensors`` and ``digits_flow.json``, the class-conditional
  flow-matching ``SD3Transformer2DModel`` of :mod:`asyncdiff.models.digits_flow` (rectified flow,
  velocity prediction, logit-normal noise levels, 10 % of the labels dropped).

Deterministic: fixed seeds, 2 threads, ``torch.use_deterministic_algorithms``. About 10 minutes
on 2 CPU cores for each model.

Example:
    python scripts/train_digits.py                       # writes the shipped assets
    python scripts/train_digits.py --steps 200 --out /tmp/digits   # a quick trial run
    python scripts/train_digits.py --model dit --steps 3000 --lr 1e-3   # the shipped DiT
    python scripts/train_digits.py --model flow --steps 3000 --lr 1e-3  # the shipped flow-matching MMDiT
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asyncdiff.fidelity import DigitClassifier
from asyncdiff.models.digits import (
    ASSETS,
    RESOLUTION,
    SCHEDULE,
    digits_split,
    load_digits16,
)

THREADS = 2
SEED = 0

UNET_CONFIG: dict[str, object] = {
    "sample_size": RESOLUTION,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 16,
}


def _setup() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _shifted(images: torch.Tensor, generator: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Each image moved by a random offset of up to ``pixels`` in each direction (zeros come in)."""
    padded = nn.functional.pad(images, (pixels,) * 4)
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + RESOLUTION, dx:dx + RESOLUTION] for i, (dy, dx) in enumerate(offsets)])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int = 64) -> DigitClassifier:
    train, test = digits_split(len(images))
    generator = torch.Generator().manual_seed(SEED)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    total_steps = epochs * math.ceil(len(train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=total_steps)
    for epoch in range(epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = _shifted(images[index], generator)
            batch = (batch + 0.05 * torch.randn(batch.shape, generator=generator)).clamp(0.0, 1.0)
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0:
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, "
                  f"test accuracy {_accuracy(model, images[test], labels[test]):.4f}", flush=True)
    return model.eval()


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(dim=1) == labels).float().mean().item()


def _unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def _dit() -> nn.Module:
    from asyncdiff.models.digits_dit import DIT_CONFIG, digits_dit

    return digits_dit(DIT_CONFIG)


def _flow() -> nn.Module:
    from asyncdiff.models.digits_flow import FLOW_CONFIG, digits_flow

    return digits_flow(FLOW_CONFIG)


# A training objective: (denoiser, clean images in [-1, 1], their labels or None, generator) -> loss.
Objective = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", torch.Generator], torch.Tensor]


@functools.cache
def _ddpm_schedule() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def _ddpm_loss(denoiser: nn.Module, clean: torch.Tensor, labels: torch.Tensor | None,
               generator: torch.Generator) -> torch.Tensor:
    """Epsilon prediction under :data:`SCHEDULE` (the UNet; the DiT with its digit as the class)."""
    noise_schedule = _ddpm_schedule()
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(clean),), generator=generator)
    noisy = noise_schedule.add_noise(clean, noise, timesteps)
    classes = {} if labels is None else {"class_labels": labels}
    return nn.functional.mse_loss(denoiser(noisy, timesteps, **classes).sample, noise)


def _flow_loss(denoiser: nn.Module, clean: torch.Tensor, labels: torch.Tensor | None,
               generator: torch.Generator) -> torch.Tensor:
    """Rectified flow as SD3 trains it: velocity ``noise - x_0`` at noise level ``s`` drawn
    logit-normal, timestep ``1000 s``; 10 % of the labels dropped to the null class."""
    from asyncdiff.models.digits_flow import NULL_CLASS, class_code

    assert labels is not None
    noise = torch.randn(clean.shape, generator=generator)
    level = torch.sigmoid(torch.randn(len(clean), generator=generator))
    noisy = (1.0 - level.view(-1, 1, 1, 1)) * clean + level.view(-1, 1, 1, 1) * noise
    dropped = torch.rand(len(clean), generator=generator) < 0.1
    code = class_code(torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels))
    velocity = denoiser(noisy, encoder_hidden_states=code, pooled_projections=code[:, 0], timestep=1000.0 * level)
    return nn.functional.mse_loss(velocity.sample, noise - clean)


# What each --model trains: its constructor, its asset name, whether it takes the digit as a class,
# and its objective.
MODELS: dict[str, tuple[Callable[[], nn.Module], str, bool, Objective]] = {
    "unet": (_unet, "digits_unet", False, _ddpm_loss),
    "dit": (_dit, "digits_dit", True, _ddpm_loss),
    "flow": (_flow, "digits_flow", True, _flow_loss),
}


def train_denoiser(model: str, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
                   lr: float) -> tuple[nn.Module, float]:
    """The EMA weights of denoiser ``model`` (a key of :data:`MODELS`) trained for ``steps``
    steps under its objective, and the last 100 steps' mean loss."""
    import copy

    make, name, conditional, objective = MODELS[model]
    torch.manual_seed(SEED)
    denoiser = make()
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    data = images * 2.0 - 1.0
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=0.0)
    warm_up = min(100, steps // 10)

    def rate(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warm_up:
            return (step + 1) / warm_up
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm_up) / max(1, steps - warm_up)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(data), (batch_size,), generator=generator)
        loss = objective(denoiser, data[index], labels[index] if conditional else None, generator)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), denoiser.parameters(), strict=True):
                kept.lerp_(live, 1.0 - decay)
        recent = (recent + [loss.item()])[-100:]
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(f"{name} step {step + 1}/{steps}: loss (mean of last 100) {sum(recent) / len(recent):.4f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return ema.eval(), sum(recent) / len(recent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the weights and config")
    parser.add_argument("--model", default="unet", choices=sorted(MODELS),
                        help="unet: the classifier and the UNet; dit, flow: that model only (the classifier is kept)")
    parser.add_argument("--steps", type=int, default=2400, help="denoiser training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.classifier_epochs < 1:
        raise ValueError(f"--steps={args.steps}, --batch-size={args.batch_size} and "
                         f"--classifier-epochs={args.classifier_epochs} must all be >= 1")
    from safetensors.torch import save_file

    _setup()
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits16()
    begin = time.perf_counter()

    summary: dict[str, object] = {}
    if args.model == "unet":
        classifier = train_classifier(images, labels, args.classifier_epochs)
        _, test = digits_split(len(images))
        accuracy = _accuracy(classifier, images[test], labels[test])
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()},
                  str(args.out / "digits_classifier.safetensors"))
        classifier_s = time.perf_counter() - begin
        print(f"classifier: held-out accuracy {accuracy:.4f} ({len(test)} digits), {classifier_s:.0f} s", flush=True)
        summary.update(classifier_accuracy=round(accuracy, 4), classifier_s=round(classifier_s, 1))

    denoiser, loss = train_denoiser(args.model, images, labels, args.steps, args.batch_size, args.lr)
    name = MODELS[args.model][1]
    weights = {k: v.half().contiguous() for k, v in denoiser.state_dict().items()}  # fp16: half the bytes
    save_file(weights, str(args.out / f"{name}.safetensors"))
    config = {k: v for k, v in denoiser.config.items() if not k.startswith("_")}
    (args.out / f"{name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    total_s = time.perf_counter() - begin
    print(json.dumps({**summary, f"{args.model}_final_loss": round(loss, 4), f"{args.model}_steps": args.steps,
                      "batch_size": args.batch_size, "lr": args.lr, "total_s": round(total_s, 1)}))


if __name__ == "__main__":
    main()
