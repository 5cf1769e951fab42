"""Session-wide settings for the tests.

- The CPU tests run gloo processes even on a machine with CUDA (tests marked ``gpu`` switch
  ``ASYNCDIFF_DEVICE`` to ``cuda`` for themselves).
- Without CUDA, Triton kernels run in Triton's CPU interpreter. Triton reads ``TRITON_INTERPRET``
  when a kernel is defined, and its own library functions (``tl.max``, ...) are defined when
  ``triton`` is first imported (other libraries may import it early), so it is set here, before
  any test module is collected.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("ASYNCDIFF_DEVICE", "cpu")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
