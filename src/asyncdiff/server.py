"""``asyncdiff serve``: persistent workers behind an OpenAI-style HTTP API (``pip install -e '.[serve]'``).

Endpoints: ``POST /v1/images/generations`` (OpenAI's fields, plus ``seed``,
``num_inference_steps``, ``negative_prompt``, ``guidance_scale``), ``POST /v1/videos`` (a job:
``GET /v1/videos/{id}`` for its status and progress, ``GET /v1/videos/{id}/content`` for the
file), ``GET /v1/images/{id}`` (a ``response_format="url"`` picture), ``GET /v1/models``,
``GET /health`` (200 only when every rank is ready), ``GET /metrics`` (Prometheus text).

Note [serving]: a request becomes one frozen :class:`~asyncdiff.request.GenerationRequest`
(Note [one request record]) and waits in :class:`~asyncdiff.serving.Workers`' queue (Note
[dynamic batching]). Errors are OpenAI-shaped, ``{"error": {"message", "type", "param"}}``:
400 for a malformed body or a field out of range (naming the field and the fix or the limit),
401 without the ``--api-key``, 404 for an unknown model or job, 413 for a body over
``--max-body-bytes``, 429 (``Retry-After``) when ``--max-queue`` requests wait, 500 when the
pipeline call failed (the workers serve on), 503 while the workers start, restart or drain,
504 past ``--request-timeout`` (the workers finish the call and drop its result). SIGTERM
drains: new requests get 503 (a closed socket once uvicorn stops listening), the accepted ones
finish, then every rank stops.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import math
import os
import re
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from asyncdiff.generate import GenerateSpec
from asyncdiff.request import FORMATS, GenerationRequest, Limits, as_data_url, check_arguments
from asyncdiff.serving import Busy, Failed, Metrics, Unavailable, Workers

__all__ = ["ServeOptions", "app", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """How the server listens, batches and limits (the ``asyncdiff serve`` flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: ASYNCDIFF_API_KEY, else no key
    model_name: str | None = None  # the id /v1/models lists (default: the pipeline's name)
    max_batch: int = 4
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout: float = 300.0
    worker_timeout: float = 300.0
    max_restarts: int = 3
    max_body_bytes: int = 16 * 2**20
    limits: Limits = field(default_factory=Limits)
    kept_files: int = 256  # url pictures and finished videos kept for download


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


_KIND = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
         504: "timeout"}


def _image_body() -> type:
    from pydantic import BaseModel, ConfigDict

    class Body(BaseModel):  # the fields both endpoints take; an unknown field is a 400 naming it
        model_config = ConfigDict(extra="forbid", strict=True)
        model: str | None = None
        size: str | None = None
        user: str | None = None
        seed: int = 0
        num_inference_steps: int | None = None
        negative_prompt: str | None = None
        guidance_scale: float | int | None = None
        image: str | None = None  # base64 or a data: URL: img2img, inpainting, ControlNet's picture, a first frame

    class ImageBody(Body):  # OpenAI's fields (quality, style, ... accepted and ignored) and ours
        prompt: str | list[str]
        n: int = 1
        response_format: Literal["b64_json", "url"] = "b64_json"
        output_format: Literal[FORMATS] = "png"  # type: ignore[valid-type]
        quality: str | None = None
        style: str | None = None
        background: str | None = None
        moderation: str | None = None
        output_compression: int | None = None
        mask: str | None = None

    class VideoBody(Body):
        prompt: str | None = None
        seconds: float | int | str | None = None
        num_frames: int | None = None
        fps: int | None = None
        input_reference: str | None = None  # OpenAI's name for the first frame

    return ImageBody, VideoBody


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text in (None, "auto"):
        return None, None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise HTTPError(400, f"size={text!r} must be 'WIDTHxHEIGHT', e.g. '512x512', or 'auto'", "size") from None
    return height, width


def _parse(raw: bytes, model: type) -> Any:
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise HTTPError(400, f"the body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"][:1])
        shown = "" if first["type"] == "missing" else f"={data.get(param)!r}"
        raise HTTPError(400, f"{param}{shown}: {first['msg']}", param) from None


def _request(body: Any, steps: int, **fields: Any) -> GenerationRequest:
    """The request record of an HTTP body (Note [one request record]); ``fields``: more of its fields."""
    height, width = _size(body.size)
    pictures = {"image": fields.pop("image", None) or getattr(body, "image", None), "mask": getattr(body, "mask", None)}
    steps = steps if body.num_inference_steps is None else body.num_inference_steps
    try:
        for name, text in pictures.items():
            if text is not None:  # base64 only: a server reads no file its client names
                fields[name] = as_data_url(text, name)
        return GenerationRequest(prompt=getattr(body, "prompt", None), negative_prompt=body.negative_prompt,
                                 height=height, width=width, steps=steps, guidance_scale=body.guidance_scale,
                                 seed=body.seed, **fields)
    except ValueError as err:
        raise _bad_field(err) from None


_FIELDS = {"steps": "num_inference_steps", "frames": "num_frames", "height": "size", "width": "size"}


def _bad_field(err: ValueError) -> HTTPError:
    """A request record's error (Note [one request record]) in the body's field names."""
    message = str(err)
    named = re.match(r"(\w+)[=:]", message)
    field = named.group(1) if named else None
    if field in ("steps", "frames"):
        message = message.replace(f"{field}=", f"{_FIELDS[field]}=")
    return HTTPError(400, message, _FIELDS.get(field, field))


class _Server:
    """The app's state: the workers, the options, files kept for download, video jobs."""

    def __init__(self, spec: GenerateSpec, options: ServeOptions) -> None:
        self.spec, self.options = spec, options
        self.metrics = Metrics()
        self.workers = Workers(spec, max_batch=options.max_batch, batch_wait_ms=options.batch_wait_ms,
                               max_queue=options.max_queue, worker_timeout=options.worker_timeout,
                               max_restarts=options.max_restarts, metrics=self.metrics)
        self.model = options.model_name or (os.path.basename(spec.model.rstrip("/")) if spec.model
                                            else f"{spec.pipeline}-{spec.size}")
        self.api_key = options.api_key or os.environ.get("ASYNCDIFF_API_KEY") or None
        self.files: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()
        self.draining = False

    @property
    def video(self) -> bool:
        from asyncdiff.generate import VIDEO_PIPELINES

        return self.workers.info.get("video", self.spec.model is None and self.spec.pipeline in VIDEO_PIPELINES)

    def keep(self, data: bytes, media: str) -> str:
        key = uuid.uuid4().hex
        self.files[key] = (data, media)
        while len(self.files) > self.options.kept_files:
            self.files.popitem(last=False)
        return key

    def check_model(self, model: str | None) -> None:
        if model not in (None, self.model):
            raise HTTPError(404, f"model={model!r} is not served here; this server serves {self.model!r} "
                                 f"(GET /v1/models)", "model")

    def submit(self, request: GenerationRequest, job: str | None = None) -> Any:
        """Check ``request`` against the limits and queue it: its :class:`~asyncdiff.serving.Ticket`."""
        try:
            self.options.limits.check(request)
            if "params" in self.workers.info:  # what the loaded pipeline takes (known once the workers are up)
                check_arguments(request, self.workers.info["params"], self.workers.info["pipeline"])
        except ValueError as err:
            raise _bad_field(err) from None
        try:
            return self.workers.submit(request, job)
        except Busy as err:
            raise HTTPError(429, str(err), headers={"Retry-After": "1"}) from None
        except Unavailable as err:
            raise HTTPError(503, str(err)) from None

    async def generate(self, request: GenerationRequest) -> tuple[list[bytes], str]:
        """The files of ``request`` (per image) and their media type, or the HTTP error."""
        ticket = self.submit(request)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(ticket.future), self.options.request_timeout)
        except asyncio.TimeoutError:
            self.workers.abandon(ticket)
            raise HTTPError(504, f"the request took longer than --request-timeout={self.options.request_timeout:g} "
                                 f"s; the workers finish the call and drop its result") from None
        except Unavailable as err:
            raise HTTPError(503, str(err)) from None
        except Failed as err:
            raise HTTPError(500, f"the pipeline call failed: {err}") from None


def app(spec: GenerateSpec, options: ServeOptions | None = None) -> Any:
    """The ASGI app serving ``spec`` (its workers start with the app's lifespan)."""
    import contextlib

    options = options or ServeOptions()
    state = _Server(spec, options)
    ImageBody, VideoBody = _image_body()

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        state.workers.start()
        yield
        await asyncio.to_thread(state.workers.close)

    api = FastAPI(title="asyncdiff", lifespan=lifespan)
    api.state.server = state

    def error(err: HTTPError) -> JSONResponse:
        return JSONResponse({"error": {"message": err.message, "type": _KIND.get(err.status, "error"),
                                       "param": err.param, "code": None}}, err.status, headers=err.headers)

    @api.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        started, path = time.monotonic(), request.url.path
        try:
            if state.draining and path != "/health":
                raise HTTPError(503, "the server is draining (SIGTERM): it takes no new requests")
            if path.startswith("/v1/") and state.api_key is not None:
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                    raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                         "(--api-key or ASYNCDIFF_API_KEY)", headers={"WWW-Authenticate": "Bearer"})
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > options.max_body_bytes:
                raise HTTPError(413, f"the body is {length} bytes, over --max-body-bytes={options.max_body_bytes}")
            response = await call_next(request)
        except HTTPError as err:
            response = error(err)
        if request.method == "POST" and path.startswith("/v1/"):
            state.metrics.requests.labels(str(response.status_code)).inc()
            state.metrics.latency.observe(time.monotonic() - started)
        return response

    @api.exception_handler(HTTPError)
    async def http_error(_: Request, err: HTTPError) -> JSONResponse:
        return error(err)

    async def body_of(request: Request) -> bytes:
        raw = await request.body()
        if len(raw) > options.max_body_bytes:
            raise HTTPError(413, f"the body is {len(raw)} bytes, over --max-body-bytes={options.max_body_bytes}")
        return raw

    @api.post("/v1/images/generations")
    async def images(request: Request) -> Any:
        body = _parse(await body_of(request), ImageBody)
        state.check_model(body.model)
        if state.video:
            raise HTTPError(400, f"{state.model} makes videos; POST /v1/videos")
        request_ = _request(body, spec.steps)
        request_ = request_.replace(n=body.n, output_format=body.output_format) if body.n != 1 or \
            body.output_format != "png" else request_
        files, media = await state.generate(request_)
        key = "b64_json" if body.response_format == "b64_json" else "url"
        data = [{"b64_json": base64.b64encode(f).decode()} if key == "b64_json" else
                {"url": f"{request.base_url}v1/images/{state.keep(f, media)}"} for f in files]
        return {"created": int(time.time()), "data": data, "output_format": body.output_format}

    @api.get("/v1/images/{key}")
    async def image_file(key: str) -> Response:
        if key not in state.files:
            raise HTTPError(404, f"no picture {key!r} (the server keeps the last {options.kept_files})")
        data, media = state.files[key]
        return Response(data, media_type=media)

    @api.post("/v1/videos")
    async def videos(request: Request) -> Any:
        body = _parse(await body_of(request), VideoBody)
        state.check_model(body.model)
        if not state.video:
            raise HTTPError(400, f"{state.model} makes pictures; POST /v1/images/generations")
        frames = body.num_frames
        if frames is None and body.seconds is not None:
            frames = max(1, math.ceil(float(body.seconds) * (body.fps or 7)))
        request_ = _request(body, spec.steps, frames=frames, fps=body.fps, image=body.image or body.input_reference)
        job = f"video_{uuid.uuid4().hex}"
        state.workers.jobs[job] = record = {"id": job, "object": "video", "model": state.model, "status": "queued",
                                            "created_at": int(time.time()), "done": 0, "total": request_.steps}
        while len(state.workers.jobs) > options.kept_files:
            state.workers.jobs.pop(next(iter(state.workers.jobs)))
        ticket = state.submit(request_, job)

        def finished(future: Any) -> None:
            err = future.exception()
            if err is None:
                files, media = future.result()
                record.update(status="completed", file=state.keep(files[0], media), done=record["total"])
            else:
                record.update(status="failed", error={"message": str(err), "type": type(err).__name__})
            record["completed_at"] = int(time.time())

        ticket.future.add_done_callback(finished)
        return _job_view(record)

    @api.get("/v1/videos/{job}")
    async def video(job: str) -> Any:
        if job not in state.workers.jobs:
            raise HTTPError(404, f"no video job {job!r}")
        return _job_view(state.workers.jobs[job])

    @api.get("/v1/videos/{job}/content")
    async def video_content(job: str) -> Response:
        record = state.workers.jobs.get(job)
        if record is None:
            raise HTTPError(404, f"no video job {job!r}")
        if record["status"] != "completed" or record.get("file") not in state.files:
            raise HTTPError(409 if record["status"] != "completed" else 404,
                            f"video job {job!r} is {record['status']}; GET /v1/videos/{job} until it is completed")
        data, media = state.files[record["file"]]
        return Response(data, media_type=media)

    @api.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": state.model, "object": "model", "created": 0,
                                            "owned_by": "asyncdiff"}]}

    @api.get("/health")
    async def health() -> Any:
        workers = state.workers
        status = "draining" if state.draining else workers.state
        body = {"status": status, "devices": spec.devices, "restarts": workers.restarts, "queued": workers.queued,
                "pids": workers.pids, "reason": workers.reason or None, "pipeline": workers.info.get("pipeline")}
        return JSONResponse(body, 200 if status == "ready" else 503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4")

    return api


def _job_view(record: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in record.items() if k not in ("file", "done", "total")}
    view["progress"] = round(100 * record["done"] / max(1, record["total"]))
    view["steps"] = {"done": record["done"], "total": record["total"]}
    return view


def serve(spec: GenerateSpec, options: ServeOptions) -> None:
    """Run the server until SIGINT/SIGTERM (Note [serving])."""
    import uvicorn

    api = app(spec, options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM drains (Note [serving])
            api.state.server.draining = True
            api.state.server.workers.drain()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:  # a finished drain exits 0, not re-raising SIGTERM
                captured.remove(sig)

    config = uvicorn.Config(api, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=50, lifespan="on")
    log.info("serving %s on http://%s:%d (%d devices)", api.state.server.model, options.host, options.port,
             spec.devices)
    Server(config).run()
