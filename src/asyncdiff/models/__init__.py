"""Built-in offline pipelines (seeded random weights, or the digits model trained here).

Importing this package quiets one transformers notice that is not the user's business: that an
image processor the pipelines construct (and never use on these inputs) falls back from its
torchvision backend to PIL. Every other transformers message is kept.
"""

from __future__ import annotations

import logging


class _NoTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _quiet_backend_notices() -> None:
    import transformers  # noqa: F401  (sets up its logger's handler)

    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _NoTorchvisionFallback) for f in handler.filters):
            handler.addFilter(_NoTorchvisionFallback())


_quiet_backend_notices()
