"""Coverage cases: video diffusion transformers."""

CASES = ()
