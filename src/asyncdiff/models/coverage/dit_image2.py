"""Coverage cases: more image diffusion transformers (Qwen-Image, CogView, HunyuanDiT, ...)."""

CASES = ()
