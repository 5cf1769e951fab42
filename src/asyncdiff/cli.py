"""``asyncdiff`` command line.

Example:
    asyncdiff generate --devices 2 --steps 20 --warm-up 2 --prompt "a cat" --out cat.png
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

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
    from asyncdiff.models.builders import SYSTEMS
    from asyncdiff.models.common import SIZE_NAMES
    from asyncdiff.generate import DTYPES
    from asyncdiff.logs import LEVELS
    from asyncdiff.partition.report import LINKS

    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="asyncdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"asyncdiff {version('asyncdiff')}")
    logs = argparse.ArgumentParser(add_help=False)  # every command takes --log-level (Note [log lines])
    logs.add_argument("--log-level", default=None, choices=LEVELS,
                      help="how much the library logs on stderr (default: ASYNCDIFF_LOG, else warning)")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default
    demo = commands.add_parser("demo", parents=[logs],
                               help="the trained digits model on one process and on N, side by side",
                               formatter_class=defaults)
    demo.add_argument("--devices", type=_positive, default=2, help="processes of the parallel run")
    demo.add_argument("--steps", type=_positive, default=25, help="DDIM steps")
    demo.add_argument("--warm-up", type=_non_negative, default=2, help="sequential steps before stale inputs")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    demo.add_argument("--out", default="digits.png", help="the picture: sequential grid left, parallel grid right")
    loaded = argparse.ArgumentParser(add_help=False)  # what generate and serve load and on how many processes
    systems = "built-in system: " + "; ".join(f"{name}: {s.about}" for name, s in SYSTEMS.items())
    loaded.add_argument("--pipeline", default="sd15", choices=list(SYSTEMS), help=systems)
    loaded.add_argument("--size", default="tiny", choices=SIZE_NAMES, help="built-in model size")
    loaded.add_argument("--model", default=None, help="local folder or hub id to load real weights from")
    loaded.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="with --model: the dtype to load the weights in (default: as saved)")
    loaded.add_argument("--devices", type=_positive, default=2, help="processes; 1 runs the plain pipeline")
    loaded.add_argument("--threads-per-device", type=_positive, default=1, help="torch threads per process")
    loaded.add_argument("--plan", default=None, help="plan JSON (from asyncdiff inspect --json) to use instead of "
                        "planning")
    loaded.add_argument("--text-encoders", default="every", choices=("every", "rank0"),
                        help="rank0: only rank 0 keeps the text encoders and broadcasts the prompt embeddings")
    loaded.add_argument("--scheduler", default=None, help="a diffusers scheduler class (e.g. EulerDiscreteScheduler), "
                        "configured from the pipeline's own scheduler")
    gen = commands.add_parser("generate", parents=[logs, loaded], help="generate an image on N processes",
                              formatter_class=defaults)
    gen.add_argument("--steps", type=_positive, default=20, help="denoising steps")
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    gen.add_argument("--prompt", default="a photo of a cat", help="text prompt (pipelines that take one)")
    gen.add_argument("--out", default=None, help="image (.png) or video (.gif, .mp4) written by rank 0; "
                     "default out.png, or out.gif for video pipelines")
    gen.add_argument("--image", default=None, help="input picture: first frame, control picture, picture to "
                     "inpaint or upscale (default: a built-in picture)")
    gen.add_argument("--mask", default=None, help="inpainting mask picture (default: a built-in mask)")
    gen.add_argument("--prompts-file", default=None, help="one request per line, a prompt or a JSON object of "
                     "request fields ({\"prompt\": \"a dog\", \"seed\": 4}); writes --out numbered (out-0000.png, ...) "
                     "and out.manifest.json, loading and planning once")
    _add_call_options(gen)
    gen.add_argument("--record", default=None, help="write JSON lines of every step every rank ran: kind and why, "
                     "program, bytes, seconds, checksums of the boundary values (Note [run records])")
    _add_engine_options(gen, title="engine settings (the fields of EngineConfig; with --model, --cost time plans "
                        "on FLOPs and bytes makes each rank load about 1/N of the denoiser)")

    ins = commands.add_parser("inspect", parents=[logs],
                              help="plan a split and show it, without running anything in parallel",
                              formatter_class=defaults)
    source = ins.add_mutually_exclusive_group()
    source.add_argument("--pipeline", default="sd15", choices=list(SYSTEMS), help="built-in system")
    source.add_argument("--model", default=None, help="local folder or hub id of a diffusers pipeline")
    ins.add_argument("--size", default="tiny", choices=SIZE_NAMES, help="built-in model size")
    what = ins.add_mutually_exclusive_group(required=True)
    what.add_argument("--stages", type=_positive, help="plan this many stages and report the split")
    what.add_argument("--devices", type=_positive, help="list every guidance x batch x stages way to use this many "
                      "devices, with its modelled step and staleness, and the one --parallel auto takes")
    what.add_argument("--replay", default=None, metavar="RECORD", help="run a generate --record file again in this "
                      "process and report the first step, rank and boundary value that differs (Note [replay])")
    ins.add_argument("--cost", default="flops", choices=("time", "flops"),
                     help="flops: on meta tensors, no weights needed; time: measured on this machine")
    ins.add_argument("--bandwidth", default="nvlink", choices=sorted(LINKS), help="link preset for the step model")
    ins.add_argument("--plan", default=None, help="report this plan JSON instead of planning")
    _add_engine_options(ins, only=("policy", "plan_rule", "max_slowdown", "replan", "warm_up"))
    ins.add_argument("--drift", type=int, default=0, metavar="STEPS",
                     help="run STEPS real steps and predict each plan's drift from stale inputs (loads real weights)")
    ins.add_argument("--prompt", default="a photo of a cat")
    ins.add_argument("--json", dest="json_path", default=None, help="write the report as JSON")
    ins.add_argument("--html", dest="html_path", default=None, help="write the plan as an HTML picture")

    bench = commands.add_parser("bench", parents=[logs],
                                help="sequential reference against parallel settings: speed and deviation",
                                formatter_class=defaults)
    bench.add_argument("--pipeline", default="sd15", choices=list(SYSTEMS), help="built-in system")
    bench.add_argument("--size", default="bench", choices=SIZE_NAMES)
    bench.add_argument("--devices", default="1,2", help="comma-separated process counts, e.g. 1,2,3")
    bench.add_argument("--stride", default="1", help="comma-separated strides, e.g. 1,2")
    bench.add_argument("--steps", type=_positive, default=50)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--prompt", default="a photo of a cat")
    bench.add_argument("--threads-per-device", type=_positive, default=1)
    bench.add_argument("--slices", default="1x1", help="comma-separated guidance x batch settings to run at each "
                       "device count, of 1x1 (stages only), 2x1, 1x2, 2x2 and auto, e.g. 1x1,2x1,auto")
    _add_call_options(bench)
    _add_engine_options(bench, exclude=("stride", "guidance", "batch", "parallel"),
                        title="engine settings (the fields of EngineConfig)", warm_up=2)
    bench.add_argument("--json", dest="json_path", default=None, help="write the rows as JSON")
    bench.add_argument("--plot", default=None, help="write a PNG of speed-up against devices")
    bench.add_argument("--scheduler", default=None, help="a diffusers scheduler class, configured from the "
                       "pipeline's own scheduler")

    srv = commands.add_parser("serve", parents=[logs, loaded], formatter_class=defaults,
                              help="persistent workers behind an OpenAI-style HTTP API (pip install '.[serve]')",
                              description="Load, trace and plan once on N processes, then answer POST "
                              "/v1/images/generations, POST /v1/videos, GET /v1/models, /health and /metrics "
                              "until SIGINT/SIGTERM (SIGTERM drains). Example: curl -s 127.0.0.1:8000/v1/images/"
                              "generations -H 'Content-Type: application/json' -d '{\"prompt\": \"a cat\", "
                              "\"size\": \"64x64\", \"seed\": 3}'")
    srv.add_argument("--steps", type=_positive, default=20, help="denoising steps of a request that names none")
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (another than 127.0.0.1 "
                     "exposes the server to the network)")
    srv.add_argument("--port", type=_positive, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: "
                     "ASYNCDIFF_API_KEY, else none)")
    srv.add_argument("--served-model-name", default=None, help="the model id of /v1/models (default: the "
                     "pipeline's name)")
    srv.add_argument("--max-batch", type=_positive, default=4, help="images in one pipeline call, at most")
    srv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long the first request of a batch "
                     "waits for alike ones")
    srv.add_argument("--max-queue", type=_positive, default=64, help="waiting requests before 429")
    srv.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request answers 504")
    srv.add_argument("--worker-timeout", type=float, default=300.0, help="seconds a pipeline call may take "
                     "before the workers restart")
    srv.add_argument("--max-restarts", type=_non_negative, default=3, help="worker restarts in a row before "
                     "the server gives up (503)")
    srv.add_argument("--max-body-bytes", type=_positive, default=16 * 2**20)
    srv.add_argument("--max-steps", type=_positive, default=200, help="a request's num_inference_steps, at most")
    srv.add_argument("--max-images", type=_positive, default=8, help="a request's prompts x n, at most")
    srv.add_argument("--max-pixels", type=_positive, default=2048 * 2048, help="a request's width x height, "
                     "at most")
    srv.add_argument("--record", default=None, help="append JSON lines of every step every rank runs, request "
                     "after request (Note [run records]; needs --devices >= 2)")
    _add_engine_options(srv, title="engine settings (the fields of EngineConfig)")
    return parser


def _warm_up(text: str) -> int | float | str:
    """--warm-up: a count (2), a fraction of the loop's steps (0.1) or auto (Note [relative warm-up])."""
    from asyncdiff.engine.config import check_warm_up

    try:
        value: int | float | str = text if text == "auto" else int(text) if text.lstrip("-").isdigit() else float(text)
        return check_warm_up(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_TYPES: dict[str, Callable[[str], Any]] = {"positive": _positive, "non_negative": _non_negative, "warm_up": _warm_up}


def _add_engine_options(parser: argparse.ArgumentParser, only: Sequence[str] = (), exclude: Sequence[str] = (),
                        title: str | None = None, **defaults: Any) -> None:
    """Note [one config] in engine/config.py: a flag per :class:`EngineConfig` field (or those in
    ``only``), with the field's help, type, choices and default (``defaults`` overrides one), in
    a group named ``title``; :func:`_engine_settings` reads them back."""
    from asyncdiff.engine.config import EngineConfig

    names = []
    group = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(EngineConfig):
        meta = dict(f.metadata)
        if "help" not in meta or f.name in exclude or (only and f.name not in only):
            continue
        flag = "--" + meta.pop("name", f.name.replace("_", "-"))
        default = defaults.get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": meta.pop("help")}
        if "const" in meta:
            kwargs.update(action="store_const", const=meta.pop("const"))
        elif isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "layouts":
            kwargs.update(type=_layouts, default=",".join(default))
        else:
            kind = meta.pop("type", None)
            kwargs["type"] = _TYPES.get(kind, kind) if kind else type(default) if default is not None else str
            kwargs.update(meta)
        group.add_argument(flag, **kwargs)
        names.append(f.name)
    parser.set_defaults(engine_fields=tuple(names))


def _layouts(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings the command line gave (Note [one config]): the flags of EngineConfig's fields
    (argparse parses a string default with the flag's type, so ``layouts`` is a tuple here too)."""
    return {name: getattr(args, name) for name in args.engine_fields}


def _add_call_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="the pipeline's guidance_scale (default: the pipeline's; <= 1 turns guidance off)")
    parser.add_argument("--num-images", "--images-per-prompt", dest="images_per_prompt", type=_positive, default=1,
                        help="images per prompt, image i drawn with seed + i")
    parser.add_argument("--negative-prompt", default=None, help="the pipeline's negative_prompt")
    parser.add_argument("--height", type=_positive, default=None, help="picture height in pixels (default: the "
                        "pipeline's)")
    parser.add_argument("--width", type=_positive, default=None, help="picture width in pixels (default: the "
                        "pipeline's)")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}={text!r} must be comma-separated integers, e.g. 1,2") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option}={text!r} must list integers >= 1")
    return values


def _bench(args: argparse.Namespace) -> int:
    from asyncdiff.bench import SLICES, bench, format_rows, plot_rows, to_json
    from asyncdiff.generate import GenerateSpec

    devices, strides = _int_list(args.devices, "--devices"), _int_list(args.stride, "--stride")
    if set(strides) - {1, 2}:
        raise ValueError(f"--stride={args.stride!r}: strides are 1 or 2")
    if args.refresh_every and 2 in strides:
        raise ValueError("--refresh-every works with stride 1 only; use --stride 1")
    slices = [v.strip() for v in args.slices.split(",") if v.strip()]
    if not slices or set(slices) - set(SLICES):
        raise ValueError(f"--slices={args.slices!r} must list settings of {', '.join(SLICES)}")
    spec = GenerateSpec(pipeline=args.pipeline, size=args.size, steps=args.steps, seed=args.seed, prompt=args.prompt,
                        threads_per_device=args.threads_per_device, devices=1, out=None,
                        images_per_prompt=args.images_per_prompt, guidance_scale=args.guidance_scale,
                        negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                        scheduler=args.scheduler, engine=_engine_settings(args))
    rows = bench(spec, devices, strides, slices)
    print(format_rows(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(to_json(rows, spec))
    if args.plot:
        plot_rows(rows, args.plot, f"{args.pipeline} ({args.size}), {args.steps} steps, warm-up {args.warm_up}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from asyncdiff.inspection import load_for_inspection, pipeline_report
    from asyncdiff.models.builders import example_inputs

    if args.replay:
        from asyncdiff.replay import replay

        if not os.path.isfile(args.replay):
            raise ValueError(f"--replay={args.replay!r} is not a file; pass a record from asyncdiff generate --record")
        result = replay(args.replay)
        print(result)
        return 0 if result.difference is None else 1

    pipe = load_for_inspection(args.pipeline, args.size, args.model, on_meta=args.cost == "flops" and not args.drift)
    call = {} if args.model else example_inputs(args.pipeline, args.size)
    if "prompt" in inspect.signature(type(pipe).__call__).parameters:  # not for unconditional pipelines
        call["prompt"] = args.prompt
    if args.devices:
        from asyncdiff.inspection import parallel_report

        _, _, table = parallel_report(pipe, devices=args.devices, cost=args.cost, link=args.bandwidth,
                                      policy=args.policy, max_slowdown=args.max_slowdown, plan_rule=args.plan_rule,
                                      **call)
        print(table)
        return 0
    plan = None
    if args.plan:
        from asyncdiff.partition.plan import Plan

        with open(args.plan) as f:
            plan = Plan.from_json(f.read())
    _, report = pipeline_report(pipe, model_n=args.stages, cost=args.cost, link=args.bandwidth, policy=args.policy,
                                plan=plan, max_slowdown=args.max_slowdown, replan=args.replan, drift_steps=args.drift,
                                plan_rule=args.plan_rule, warm_up=args.warm_up,
                                name=f"{args.model or args.pipeline} ({args.size if not args.model else 'loaded'})",
                                **call)
    print(report.table())
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(report.to_json())
    if args.html_path:
        with open(args.html_path, "w") as f:
            f.write(report.html())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from asyncdiff.generate import VIDEO_PIPELINES, GenerateSpec, run, summary

    if args.out is None:
        args.out = "out.gif" if args.pipeline in VIDEO_PIPELINES and not args.model else "out.png"
    spec = GenerateSpec(
        pipeline=args.pipeline, size=args.size, model=args.model, devices=args.devices, steps=args.steps,
        seed=args.seed, prompt=args.prompt, out=args.out, threads_per_device=args.threads_per_device, plan=args.plan,
        image=args.image, mask=args.mask, images_per_prompt=args.images_per_prompt,
        guidance_scale=args.guidance_scale, text_encoders=args.text_encoders, engine=_engine_settings(args),
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, dtype=args.dtype,
        scheduler=args.scheduler, prompts_file=args.prompts_file, record=args.record,
    )
    result = run(spec)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary(result)), flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from asyncdiff.generate import GenerateSpec
    from asyncdiff.request import Limits

    try:
        from asyncdiff.server import ServeOptions, serve
        import fastapi, prometheus_client, uvicorn  # noqa: E401, F401 -- the serve extra
    except ImportError as err:
        raise ValueError(f"serve needs the serve extra ({err.name} is missing): pip install 'asyncdiff[serve]'") \
            from None
    for name in ("batch_wait_ms", "request_timeout", "worker_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a number > 0")
    spec = GenerateSpec(pipeline=args.pipeline, size=args.size, model=args.model, devices=args.devices,
                        steps=args.steps, threads_per_device=args.threads_per_device, plan=args.plan,
                        text_encoders=args.text_encoders, dtype=args.dtype, scheduler=args.scheduler,
                        record=args.record, engine=_engine_settings(args))
    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key, model_name=args.served_model_name,
                           max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                           request_timeout=args.request_timeout, worker_timeout=args.worker_timeout,
                           max_restarts=args.max_restarts, max_body_bytes=args.max_body_bytes,
                           limits=Limits(max_steps=args.max_steps, max_images=args.max_images,
                                         max_pixels=args.max_pixels))
    serve(spec, options)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from asyncdiff.demo import demo

    result = demo(devices=args.devices, steps=args.steps, warm_up=args.warm_up, seed=args.seed, out=args.out)
    print(f"{args.out}: {result['samples']} digits from the trained model, sequential (left) and on "
          f"{args.devices} processes with stale inputs after {args.warm_up} warm-up steps (right); "
          f"{result['speedup']}x faster, {result['psnr_db']} dB apart, the classifier reads "
          f"{result['same_digit']:.0%} as the same digit", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from asyncdiff.logs import configure

    try:
        configure(args.log_level)
    except ValueError as err:
        print(f"asyncdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "serve":
            return _serve(args)
    except ValueError as err:
        print(f"asyncdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError, KeyboardInterrupt) as err:  # Note [one line per failure] in engine/launch.py
        logging.getLogger("asyncdiff.cli").debug("failed", exc_info=err)
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not text.startswith("["):
            text = f"{type(err).__name__}: {text}"
        print(f"asyncdiff {args.command}: error: {text} (the full traceback: --log-level debug)", file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
