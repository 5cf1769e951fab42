"""Session-wide settings for the tests.

- The CPU tests run gloo processes even on a machine with CUDA (tests marked ``gpu`` switch
  ``ASYNCDIFF_DEVICE`` to ``cuda`` for themselves).
- Plans are not cached between tests (Note [plan cache]): each test plans for itself, and no test
  writes to the user's cache. Tests of the cache point ``ASYNCDIFF_PLAN_CACHE`` at a folder.
- Without CUDA, Triton kernels run in Triton's CPU interpreter. Triton reads ``TRITON_INTERPRET``
  when a kernel is defined, and its own library functions (``tl.max``, ...) are defined when
  ``triton`` is first imported (other libraries may import it early), so it is set here, before
  any test module is collected.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("ASYNCDIFF_DEVICE", "cpu")
os.environ["ASYNCDIFF_PLAN_CACHE"] = "off"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
