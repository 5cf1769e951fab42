"""The shipped flow-matching digits MMDiT (:mod:`asyncdiff.models.digits_flow`) draws the digits it
is asked for in few Euler steps, as the shipped classifier reads them, and runs split over
processes: on 2 processes with every step a warm-up step it gives the sequential digits, through
``asyncdiff generate``'s path (``tests/test_systems.py`` runs it with stale inputs too, and on 3
processes with stride 2)."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.fidelity import classify
from asyncdiff.generate import GenerateSpec, run
from asyncdiff.models.digits_flow import CLASSES, build_digits_flow

SAMPLES = 20  # the digits 0-9, twice


@pytest.fixture(scope="module")
def pipe():
    return build_digits_flow("trained")


@pytest.mark.parametrize("steps", [4, 8])
def test_draws_the_digits_it_is_asked_for_in_few_steps(pipe, steps) -> None:
    asked = torch.arange(SAMPLES) % CLASSES
    images = pipe(class_labels=asked, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert tuple(images.shape) == (SAMPLES, 1, 16, 16)
    assert 0.0 <= images.min() and images.max() <= 1.0
    predicted, confidence = classify(images)
    agreement = (predicted == asked).float().mean().item()
    print(f"\ndigits flow, {steps} steps: the classifier reads the digit asked for in {agreement:.2f} of "
          f"{SAMPLES}, mean confidence {confidence.mean():.3f}")
    assert agreement >= 0.6  # chance is 0.1
    assert confidence.mean() > 0.6


def test_guidance_runs_the_null_class_beside(pipe) -> None:
    """``guidance_scale > 1`` doubles the batch with the null class and still draws the digits asked for."""
    asked = torch.arange(SAMPLES) % CLASSES
    guided = pipe(class_labels=asked, num_inference_steps=8, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    plain = pipe(class_labels=asked, num_inference_steps=8, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(guided, plain)
    assert (classify(guided)[0] == asked).float().mean().item() >= 0.6


def test_class_labels_are_checked(pipe) -> None:
    with pytest.raises(ValueError, match="class_labels=\\[3, 10\\]"):
        pipe(class_labels=[3, 10], num_inference_steps=2)


def test_two_processes_at_full_warm_up_give_the_sequential_digits() -> None:
    steps = 4
    sequential = run(GenerateSpec(pipeline="digits-flow", devices=1, steps=steps))["latents"]
    exact = run(GenerateSpec(pipeline="digits-flow", devices=2, steps=steps, engine={"warm_up": steps}))["latents"]
    assert tuple(sequential.shape) == (16, 1, 16, 16)
    torch.testing.assert_close(exact, sequential, rtol=1e-5, atol=1e-5)
