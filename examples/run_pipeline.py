"""AsyncDiff's two lines on any built-in system (or your own weights), under torchrun.

    torchrun --nproc_per_node=2 examples/run_pipeline.py --pipeline sdxl
    torchrun --nproc_per_node=3 examples/run_pipeline.py --pipeline svd --stride 2 --out svd.gif
    torchrun --nproc_per_node=2 examples/run_pipeline.py --pipeline sd21 --model stabilityai/stable-diffusion-2-1

Systems: every entry of ``asyncdiff.models.builders.SYSTEMS`` (``asyncdiff generate --help`` lists
them). Image inputs (mask, control picture, low-resolution picture, first frame) are built-in
pictures unless you pass --image.
"""

import argparse

import torch
import torch.distributed as dist
from asyncdiff.engine.runtime import stages_for
from PIL import Image

from asyncdiff import AsyncDiff
from asyncdiff.outputs import save_output
from asyncdiff.models.builders import SYSTEMS, system

parser = argparse.ArgumentParser()
parser.add_argument("--pipeline", default="sd15", choices=list(SYSTEMS))
parser.add_argument("--size", default="tiny", choices=("tiny", "bench", "full"))
parser.add_argument("--model", default=None, help="local folder or hub id with real weights")
parser.add_argument("--image", default=None, help="input picture for pipelines that take one")
parser.add_argument("--stride", type=int, default=1)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warm-up", type=int, default=1)
parser.add_argument("--time-shift", action="store_true")
parser.add_argument("--prompt", default="a photo of a cat")
parser.add_argument("--out", default=None)
args = parser.parse_args()

if args.model:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(args.model)
else:
    pipeline = system(args.pipeline).build(args.size, 0)
call = system(args.pipeline).inputs(args.size, 0)
if args.image:
    call["image"] = Image.open(args.image).convert("RGB")
if system(args.pipeline).prompt:
    call["prompt"] = args.prompt

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
model_n = stages_for(dist.get_world_size(), args.stride)
async_diff = AsyncDiff(pipeline, model_n=model_n, stride=args.stride, warm_up=args.warm_up, time_shift=args.time_shift)
async_diff.reset_state(warm_up=args.warm_up)
with torch.no_grad():
    output = pipeline(num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), **call)
if dist.get_rank() == 0:
    out = args.out or ("out.gif" if hasattr(output, "frames") else "out.png")
    save_output(output, out)
    print(f"saved {out}; {model_n} stages: {[len(s) for s in async_diff.plan.stages]} blocks each")
