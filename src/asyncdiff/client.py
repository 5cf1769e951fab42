"""A Python client of ``asyncdiff serve`` (the standard library only; the ``openai`` client works too).

Example (needs a running server, so not run as a doctest)::

    client = Client("http://127.0.0.1:8000")
    image = client.generate("a photo of a cat", size="64x64", seed=3, num_inference_steps=4)
    video = client.video("a dog running", num_frames=8, seed=1)    # MP4 bytes, after the job ends
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["Client", "ServerError"]


class ServerError(RuntimeError):
    """The server answered with an error: ``status`` and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class Client:
    """Requests to the server at ``url``; ``api_key``: its ``--api-key``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def generate(self, prompt: str | list[str], **fields: Any) -> Any:
        """One picture (a PIL image), or a list where the request makes several (``n``, a list of
        prompts). ``fields``: the body's (``size="64x64"``, ``seed``, ``num_inference_steps``,
        ``negative_prompt``, ``guidance_scale``, ``n``, ``output_format``)."""
        from PIL import Image

        reply = self._call("POST", "/v1/images/generations", {"prompt": prompt, **fields,
                                                              "response_format": "b64_json"})
        images = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in reply["data"]]
        return images[0] if len(images) == 1 else images

    def video(self, prompt: str | None = None, *, wait: bool = True, poll_s: float = 0.5, **fields: Any) -> Any:
        """Start a video job; with ``wait``, poll until it ends and return the MP4 bytes, else the
        job record (``client.job(id)`` later, ``client.content(id)`` when it is completed)."""
        job = self._call("POST", "/v1/videos", {"prompt": prompt, **fields})
        if not wait:
            return job
        deadline = time.monotonic() + self.timeout
        while job["status"] not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"video job {job['id']} is still {job['status']} after {self.timeout:g} s")
            time.sleep(poll_s)
            job = self.job(job["id"])
        if job["status"] == "failed":
            raise ServerError(500, job.get("error", {}).get("message", "the video job failed"))
        return self.content(job["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/videos/{job_id}")

    def content(self, job_id: str) -> bytes:
        return self._call("GET", f"/v1/videos/{job_id}/content", raw=True)

    def health(self) -> dict[str, Any]:
        """``/health``'s record, whatever its status (503 while the workers start or restart)."""
        try:
            return self._call("GET", "/health")
        except ServerError as err:
            return json.loads(err.message) if err.message.startswith("{") else {"status": err.message}

    def models(self) -> list[str]:
        return [m["id"] for m in self._call("GET", "/v1/models")["data"]]

    def wait_ready(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """Poll ``/health`` until every rank is ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                record = self.health()
                if record.get("status") == "ready":
                    return record
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} was not ready within {timeout_s:g} s")
            time.sleep(0.2)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, raw: bool = False) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                content = reply.read()
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text
            raise ServerError(err.code, message) from None
        return content if raw else json.loads(content)
