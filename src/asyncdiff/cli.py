"""``asyncdiff`` command line.

Example:
    asyncdiff generate --devices 2 --steps 20 --warm-up 2 --prompt "a cat" --out cat.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    from asyncdiff.adapters.registry import ADAPTERS
    from asyncdiff.models.sd import SIZES

    parser = argparse.ArgumentParser(prog="asyncdiff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate an image on N processes")
    gen.add_argument("--pipeline", default="sd15", choices=sorted(ADAPTERS))
    gen.add_argument("--size", default="tiny", choices=sorted(SIZES), help="built-in model size")
    gen.add_argument("--model", default=None, help="local folder or hub id to load real weights from")
    gen.add_argument("--devices", type=_positive, default=2, help="processes; 1 runs the plain pipeline")
    gen.add_argument("--stride", type=int, default=1, choices=(1, 2))
    gen.add_argument("--steps", type=_positive, default=20)
    gen.add_argument("--warm-up", type=_non_negative, default=1, help="sequential steps per call")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--prompt", default="a photo of a cat")
    gen.add_argument("--out", default="out.png", help="image file written by rank 0")
    gen.add_argument("--threads-per-device", type=_positive, default=1)
    gen.add_argument("--policy", default="fine", choices=("fine", "coarse"), help="block granularity")
    gen.add_argument("--cost", default="time", choices=("time", "flops"), help="what the planner balances")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from asyncdiff.generate import GenerateSpec, run, summary

    spec = GenerateSpec(
        pipeline=args.pipeline, size=args.size, model=args.model, devices=args.devices, stride=args.stride,
        steps=args.steps, warm_up=args.warm_up, seed=args.seed, prompt=args.prompt, out=args.out,
        threads_per_device=args.threads_per_device, policy=args.policy, cost=args.cost,
    )
    result = run(spec)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary(result)), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
    except ValueError as err:
        print(f"asyncdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
