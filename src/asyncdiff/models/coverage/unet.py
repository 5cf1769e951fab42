"""Coverage cases: UNet pipelines beyond the built-in systems."""

CASES = ()
