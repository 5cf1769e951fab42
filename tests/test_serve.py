"""``asyncdiff serve`` as its users use it: a real server process on 127.0.0.1, real HTTP clients
(urllib, the ``openai`` client, ``asyncdiff.client``), bounded in requests and time.

Equality: a served picture equals ``asyncdiff generate``'s with the same settings (max pixel
difference 0 on the CPU), the plan included: both plan by FLOPs here, since a plan measured in
seconds (the default, cached outside the tests) may cut one block elsewhere run to run. A batched picture equals the same request's alone within
``BATCH_NOISE`` pixel levels: the denoiser's matrix products sum a batch of several samples in
another order than a batch of one (the CPU's GEMM blocks by the batch's rows), which moves a
pixel by one level at most here; the seeds and prompts are each request's own (Note [one
request record]).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from commands import Server, cli_here

pytest.importorskip("fastapi", reason="the serve extra: pip install -e '.[serve]'")

def _png(size: tuple[int, int] = (8, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


PICTURE = _png()
BATCH_NOISE = 2  # pixel levels (of 255) a batched picture may differ from the same request alone
KEY = "test-key"


def _post(url: str, body: bytes | dict, key: str | None = KEY, timeout: float = 120) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/v1/images/generations", data, headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.load(reply), dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def _pixels(reply: dict, index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["data"][index]["b64_json"])))).astype(int)


def _live(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    record = tmp_path_factory.mktemp("serve") / "record.jsonl"
    with Server("--devices", "2", "--steps", "4", "--cost", "flops", "--max-batch", "4", "--batch-wait-ms", "400",
                "--max-steps", "50", "--max-pixels", str(256 * 256), "--max-body-bytes", "100000",
                "--record", str(record), api_key=KEY) as running:
        running.record = record
        yield running


@pytest.mark.slow
def test_a_served_picture_is_generate_s_and_batches_keep_each_request_s_picture(server, tmp_path, capsys):
    cli_here(capsys, "generate", "--devices", "2", "--steps", "4", "--cost", "flops", "--seed", "3", "--prompt", "a cat",
             "--out", str(tmp_path / "generated.png"))
    status, reply, _ = _post(server.url, {"prompt": "a cat", "seed": 3})
    assert status == 200, reply
    with Image.open(tmp_path / "generated.png") as generated:
        assert np.abs(_pixels(reply) - np.asarray(generated).astype(int)).max() == 0

    bodies = [{"prompt": f"a photo of thing {i}", "seed": 10 + i, "n": 1 + i % 2} for i in range(3)]
    alone = [_post(server.url, body)[1] for body in bodies]
    together: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, _post(server.url, bodies[i])[1]))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, body in enumerate(bodies):
        assert len(together[i]["data"]) == body["n"]
        for k in range(body["n"]):
            assert np.abs(_pixels(together[i], k) - _pixels(alone[i], k)).max() <= BATCH_NOISE
    # the three requests (5 images, at most 4 per call) ran as fewer calls than requests
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    sizes = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("asyncdiff_batch_images_bucket")}
    assert sizes['asyncdiff_batch_images_bucket{le="+Inf"}'] - sizes['asyncdiff_batch_images_bucket{le="2.0"}'] >= 1
    # --record: every rank's steps of every call, the batched call's input checksums among them
    from asyncdiff.engine.record import read_record

    records = read_record(server.record)
    assert {r["rank"] for r in records} == {0, 1} and {r["step"] for r in records} == {0, 1, 2, 3}
    assert len({r["call"] for r in records}) >= 5 and all(r["output"] for r in records)
    # a second image of a request is the same picture as seed + 1 alone (Note [one request record])
    _, second, _ = _post(server.url, {"prompt": "a photo of thing 1", "seed": 12})
    assert np.abs(_pixels(second) - _pixels(alone[1], 1)).max() <= BATCH_NOISE


@pytest.mark.slow
def test_the_openai_client_and_ours(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["sd15-tiny"]
    reply = client.images.generate(model="sd15-tiny", prompt="a cat", size="64x64", response_format="b64_json",
                                   quality="high", extra_body={"seed": 3})
    ours = server.client.generate("a cat", seed=3, size="64x64")
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply.data[0].b64_json)))).astype(int)
    assert np.abs(picture - np.asarray(ours).astype(int)).max() == 0
    by_url = client.images.generate(prompt="a cat", size="64x64", response_format="url", extra_body={"seed": 3})
    with urllib.request.urlopen(urllib.request.Request(by_url.data[0].url,
                                                       headers={"Authorization": f"Bearer {KEY}"})) as f:
        assert np.abs(np.asarray(Image.open(io.BytesIO(f.read()))).astype(int) - picture).max() == 0
    with pytest.raises(openai.BadRequestError, match="num_inference_steps=0 must be an integer >= 1"):
        client.images.generate(prompt="a cat", extra_body={"num_inference_steps": 0})


@pytest.mark.slow
@pytest.mark.parametrize("body, key, status, message", [
    (b"{not json", KEY, 400, "the body is not JSON"),
    (b"[1, 2]", KEY, 400, "the body must be a JSON object, not list"),
    ({"prompt": 3}, KEY, 400, "prompt=3: Input should be a valid string"),
    ({"prompt": "x", "num_inference_steps": "ten"}, KEY, 400, "num_inference_steps='ten': Input should be a valid"),
    ({"prompt": "x", "num_inference_steps": -1}, KEY, 400, "num_inference_steps=-1 must be an integer >= 1"),
    ({"prompt": "x", "num_inference_steps": 51}, KEY, 400, "steps=51 is over this server's limit of 50"),
    ({"prompt": "x", "size": "4096x4096"}, KEY, 400, "size=4096x4096 is 16777216 pixels, over this server's limit"),
    ({"prompt": "x", "size": "60x64"}, KEY, 400, "width=60 must be a multiple of 8"),
    ({"prompt": "x", "size": "big"}, KEY, 400, "size='big' must be 'WIDTHxHEIGHT'"),
    ({"prompt": "x", "colour": "red"}, KEY, 400, "colour='red': Extra inputs are not permitted"),
    ({"prompt": "x", "n": 9}, KEY, 400, "n=9 x 1 prompt(s) = 9 images is over this server's limit of 8"),
    ({"prompt": "x", "model": "dall-e-3"}, KEY, 404, "model='dall-e-3' is not served here"),
    ({"prompt": "x", "image": "no picture"}, KEY, 400, "image='no picture' is not a base64 picture; send base64"),
    ({"prompt": "x", "image": PICTURE}, KEY, 400, "StableDiffusionPipeline takes no image; leave image out"),
    ({"prompt": "x" * 2001}, KEY, 400, "prompt: 2001 characters is over this server's limit of 2000"),
    ({"prompt": "x" * 200_000}, KEY, 413, "over --max-body-bytes=100000"),
    ({"prompt": "x"}, None, 401, "missing or wrong API key"),
    ({"prompt": "x"}, "wrong", 401, "missing or wrong API key"),
])
def test_bad_requests_are_4xx_naming_the_field_and_the_next_works(server, body, key, status, message):
    got, reply, headers = _post(server.url, body, key)
    assert got == status and message in reply["error"]["message"], reply
    if status == 401:
        assert headers.get("www-authenticate") == "Bearer"
    assert _post(server.url, {"prompt": "x", "size": "32x32", "num_inference_steps": 2})[0] == 200


@pytest.mark.slow
def test_a_failing_call_answers_500_and_the_workers_serve_on(server):
    """8x8 pixels pass the checks (a multiple of 8) but not the UNet (GroupNorm of one value)."""
    status, reply, _ = _post(server.url, {"prompt": "x", "size": "8x8", "num_inference_steps": 2})
    assert status == 500 and "Expected more than 1 value per channel" in reply["error"]["message"]
    assert _post(server.url, {"prompt": "x", "size": "32x32", "num_inference_steps": 2})[0] == 200
    assert server.client.health()["status"] == "ready"


LONG = {"prompt": "x", "size": "256x256", "num_inference_steps": 20}  # about 3 s here on 2 processes, idle


@pytest.mark.slow
def test_past_the_request_timeout_504_and_the_workers_finish_that_call_and_serve_on():
    """A timeout far below any call's time (one second against ~9 s idle), so a loaded machine cannot make
    the 504 a 200; the next request waits for the workers to finish the dropped call (it may itself pass
    the timeout while it waits, answering 504 again), then answers 200."""
    with Server("--devices", "2", "--steps", "2", "--max-batch", "1", "--request-timeout", "1") as server:
        status, reply, _ = _post(server.url, {**LONG, "num_inference_steps": 60}, None)
        assert status == 504 and "--request-timeout=1" in reply["error"]["message"]
        deadline, answers = time.monotonic() + 90, []
        while time.monotonic() < deadline and 200 not in answers:
            answers.append(_post(server.url, {"prompt": "x", "size": "32x32"}, None)[0])
        assert answers[-1] == 200 and set(answers) <= {200, 504}, answers
        assert server.client.health()["status"] == "ready"


@pytest.mark.slow
def test_queue_full_sigkill_restart_and_sigterm_drain():
    """A timeout (60 s) well past any call here, so only --max-queue answers anything but 200."""
    long = LONG
    short = {**long, "num_inference_steps": 8}
    with Server("--devices", "2", "--steps", "2", "--max-batch", "1", "--max-queue", "1",
                "--request-timeout", "60") as server:
        # a full queue: one running, one waiting, the third is told to come back
        replies: dict[str, tuple] = {}
        running = threading.Thread(target=lambda: replies.__setitem__("a", _post(server.url, short, None)))
        running.start()
        time.sleep(0.5)
        waiting = threading.Thread(target=lambda: replies.__setitem__("b", _post(server.url, short, None)))
        waiting.start()
        time.sleep(0.3)
        status, reply, headers = _post(server.url, short, None)
        assert status == 429 and "--max-queue" in reply["error"]["message"] and headers.get("retry-after") == "1"
        running.join(60), waiting.join(60)
        assert replies["a"][0] == replies["b"][0] == 200

        # SIGKILL of one rank mid-call: 503 at once, the group restarts, the next request runs
        old = server.client.health()["pids"]
        killed = threading.Thread(target=lambda: replies.__setitem__("c", _post(server.url, long, None)))
        started = time.monotonic()
        killed.start()
        time.sleep(1.0)
        os.kill(old[1], signal.SIGKILL)
        killed.join(60)
        assert replies["c"][0] == 503 and "rank 1" in replies["c"][1]["error"]["message"]
        assert time.monotonic() - started < 60
        health = server.client.wait_ready(120)
        assert health["restarts"] == 1 and set(health["pids"]).isdisjoint(old)
        assert _post(server.url, {"prompt": "x", "size": "32x32"}, None)[0] == 200
        assert not any(_live(pid) for pid in old)

        # SIGTERM drains: the request in flight finishes, then every process is gone
        last = threading.Thread(target=lambda: replies.__setitem__("d", _post(server.url, long, None)))
        last.start()
        time.sleep(1.0)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        last.join(60)
        assert replies["d"][0] == 200
        assert server.stop() == 0 and time.monotonic() - started < 60


@pytest.mark.slow
def test_a_video_job_reports_progress_and_gives_generate_s_video(tmp_path, capsys):
    import imageio.v3 as iio

    settings = ("--devices", "2", "--pipeline", "animatediff", "--cost", "flops")
    cli_here(capsys, "generate", *settings, "--steps", "3", "--seed", "2", "--prompt", "a dog",
             "--out", str(tmp_path / "generated.mp4"))
    with Server(*settings, "--steps", "3") as server:
        job = server.client.video("a dog", seed=2, wait=False)
        assert job["status"] == "queued" and job["steps"] == {"done": 0, "total": 3}
        seen = []
        while job["status"] not in ("completed", "failed"):
            time.sleep(0.05)
            job = server.client.job(job["id"])
            seen.append(job["steps"]["done"])
        assert job["status"] == "completed" and job["progress"] == 100 and seen == sorted(seen)
        video = server.client.content(job["id"])
        assert video[4:8] == b"ftyp"
        served = iio.imread(video, extension=".mp4")
        generated = iio.imread(tmp_path / "generated.mp4")
        assert served.shape == generated.shape and np.array_equal(served, generated)
        with pytest.raises(Exception, match="HTTP 400: animatediff-tiny makes videos; POST /v1/videos"):
            server.client.generate("a dog")
