"""Text encoders kept on one rank, the prompt embeddings broadcast (Note [encoders on one rank])."""

from __future__ import annotations

import pytest
import torch

from pool import launch
from toys import encoder_scenarios


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_text_encoders_on_rank_0_give_every_rank_the_same_embeddings(name):
    """Note [encoders on one rank]: the other ranks hold no encoder weights and get the prompt
    embeddings (SDXL: two encoders, hidden states included) bit for bit; remove() brings them back."""
    results = launch(encoder_scenarios, 2, name, 3)
    for rank, r in results.items():
        torch.testing.assert_close(r["rank0"], r["every"], rtol=0, atol=0)
        assert r["held"] == (r["whole"] if rank == 0 else 0) and r["whole"] > 0
        assert r["restored"] == r["whole"] and r["checksum"] == results[0]["checksum"]


def test_a_wrong_placement_names_the_choices():
    from asyncdiff import AsyncDiff
    from asyncdiff.models.sd import build_sd15

    with pytest.raises(ValueError, match=r"text_encoders='gpu1' must be 'every' \(each rank keeps its own\) or 'rank0'"):
        AsyncDiff(build_sd15("tiny"), model_n=1, text_encoders="gpu1")
