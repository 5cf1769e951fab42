"""AsyncDiff's two lines on a Stable Diffusion pipeline.

    torchrun --nproc_per_node=2 examples/run_sd.py [--model PATH_OR_ID] [--steps 20] [--out out.png]

Without --model, the built-in offline SD 1.5-shaped pipeline (tiny, random weights) is used.
"""

import argparse

import torch
import torch.distributed as dist

from asyncdiff import AsyncDiff
from asyncdiff.models.sd import build_sd15

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warm-up", type=int, default=1)
parser.add_argument("--prompt", default="a photo of a cat")
parser.add_argument("--out", default="out.png")
args = parser.parse_args()

if args.model:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(args.model)
else:
    pipeline = build_sd15("tiny", seed=0)

async_diff = AsyncDiff(pipeline, model_n=2, stride=1, warm_up=args.warm_up, time_shift=False)
async_diff.reset_state(warm_up=args.warm_up)
with torch.no_grad():
    image = pipeline(args.prompt, num_inference_steps=args.steps,
                     generator=torch.Generator().manual_seed(0)).images[0]
if dist.get_rank() == 0:
    image.save(args.out)
    print(f"saved {args.out}; plan: {[len(s) for s in async_diff.plan.stages]} blocks per stage")
