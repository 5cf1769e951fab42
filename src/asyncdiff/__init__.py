"""asyncdiff: model-parallel diffusion inference with asynchronous denoising (AsyncDiff).

Glossary, used everywhere in this package:

- *block*: the unit the tracer sees, a module called from the denoiser's top-level graph
  (a resnet, an attention block, ``conv_in``...); see :mod:`asyncdiff.partition.blocks`.
- *stage*: a set of blocks that runs on one rank; ``model_n`` (the seed API's name) is the number
  of stages in every layer of the code (the command line's ``--stages`` and the ``stages`` of
  JSON results print it).
- *step*: one denoising step (one call of the denoiser by the pipeline's loop).
- *stale*: an input a stage takes from another stage's computation at an earlier step.
- *warm-up*: the first steps of a pipeline call, run sequentially (stage after stage, exact).
- *stride*: how many denoising steps one parallel round advances.
- *segment*: a run of consecutive blocks on one stage; a wrapped plan gives stage 0 two.
- *layout*: the shape of a plan, *contiguous* (stage k runs the k-th run of blocks) or *wrapped*
  (stage 0 runs the first and the last blocks).
- *replicated*: work that depends only on the timestep and conditioning (time embedding), which
  every stage computes for itself instead of receiving it.
- *transfer*: a value that crosses from one stage to another each step; the *wire* dtype is the
  one it travels in.
- *branch*: one of several denoiser calls in one step (guidance as two calls), each with its own
  stale state.
- *round* / *reuse*: with stride 2, the step that computes two steps' worth, and the step that
  reuses its prediction.
- *refresh*: a step after warm-up run sequentially again, to reset stale values.
- *message*: the values one segment sends one segment of another stage in a step, packed into one
  buffer; written ``src>dst`` (segment numbers).
- *program*: what one rank executes at one step, a list of *actions* (receive, run a segment,
  send, share the output) that the schedule gives and prints and the engine executes (Note
  [schedule as program]).
- *main-path depth*: how many steps the output lags the latent after warm-up, the number of stage
  crossings on the main path (Note [staleness]).
- *plan cache*: the plans kept on disk per traced call and options (Note [plan cache]).
- *slice*: the processes of one (guidance, batch) coordinate of the device mesh, running the
  stage engine on their share of each denoiser call's batch (Note [hybrid mesh]).
- *guidance* / *batch* (degrees): how many slices split the guidance halves / the prompts;
  ``model_n`` stays the number of stages per slice.
- *loop*: one denoising loop of a pipeline call; a call may run a second one at another
  resolution, which starts at step 0 with its own warm-up (Note [a second loop]).

Example (under ``torchrun --nproc_per_node=2``)::

    from asyncdiff import AsyncDiff
    async_diff = AsyncDiff(pipeline, model_n=2, stride=1, warm_up=1, time_shift=False)
    async_diff.reset_state(warm_up=1)
    image = pipeline(prompt).images[0]
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__all__ = ["AsyncDiff", "EngineConfig", "GenerationRequest", "Plan"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from asyncdiff.adapters.api import AsyncDiff
    from asyncdiff.engine.runtime import EngineConfig
    from asyncdiff.partition.plan import Plan
    from asyncdiff.request import GenerationRequest


if os.environ.get("ASYNCDIFF_LOG"):  # Note [log lines] in asyncdiff/logs.py
    from asyncdiff.logs import configure

    configure()


def __getattr__(name: str) -> Any:  # lazy: `import asyncdiff` stays cheap for the CLI
    if name == "AsyncDiff":
        from asyncdiff.adapters.api import AsyncDiff

        return AsyncDiff
    if name == "EngineConfig":
        from asyncdiff.engine.runtime import EngineConfig

        return EngineConfig
    if name == "Plan":
        from asyncdiff.partition.plan import Plan

        return Plan
    if name == "GenerationRequest":
        from asyncdiff.request import GenerationRequest

        return GenerationRequest
    raise AttributeError(f"module 'asyncdiff' has no attribute {name!r}")
