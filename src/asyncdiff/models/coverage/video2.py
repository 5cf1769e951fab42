"""Coverage cases: more video diffusion transformers (Wan 2.2, VACE, SkyReels-V2, ...)."""

CASES = ()
