"""Requests per second: relaunching ``asyncdiff generate`` per request against one ``asyncdiff serve``.

    python benchmarks/serve.py [--requests 32] [--devices 2] [--steps 4] [--clients 8] [--json FILE]

(a) ``asyncdiff generate`` run ``--requests`` times (a fresh launch, load, trace and plan each);
(b) the same requests one by one against a running ``asyncdiff serve``;
(c) ``--clients`` concurrent clients against a server with dynamic batching (``--max-batch``).
Each request is the tiny SD 1.5 system, 64x64, its own seed. Reports requests/s, p50/p95
latency and the ratios against (a); the server's start (load and first plan) is reported apart.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from commands import Server  # noqa: E402 -- the tests' server process (a session of its own, checked on stop)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _row(name: str, latencies: list[float], wall: float) -> dict:
    return {"mode": name, "requests": len(latencies), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(_percentile(latencies, 0.95), 3)}


def relaunch(args: argparse.Namespace) -> dict:
    latencies = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.requests):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "asyncdiff.cli", "generate", "--devices", str(args.devices),
                            "--steps", str(args.steps), "--seed", str(i), "--prompt", f"request {i}",
                            "--out", os.path.join(folder, f"{i}.png")], check=True, capture_output=True)
            latencies.append(time.perf_counter() - t)
    return _row("(a) generate per request", latencies, time.perf_counter() - started)


def served(args: argparse.Namespace, clients: int) -> tuple[dict, float]:
    started = time.perf_counter()
    with Server("--devices", str(args.devices), "--steps", str(args.steps), "--max-batch", str(args.max_batch),
                "--batch-wait-ms", str(args.batch_wait_ms)) as server:
        ready_s = time.perf_counter() - started
        server.client.generate("warm", seed=0)  # the first call traces and plans
        latencies: list[float] = []

        def one(i: int) -> None:
            t = time.perf_counter()
            server.client.generate(f"request {i}", seed=i)
            latencies.append(time.perf_counter() - t)

        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t
    name = "(b) serve, one by one" if clients == 1 else f"(c) serve, {clients} clients, batching"
    return _row(name, latencies, wall), ready_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [relaunch(args)]
    one, ready_one = served(args, 1)
    many, ready_many = served(args, args.clients)
    rows += [one, many]
    for row in rows:
        row["vs_a"] = round(row["requests_per_s"] / rows[0]["requests_per_s"], 2)
    print(f"{'mode':36} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'vs (a)':>7}")
    for row in rows:
        print(f"{row['mode']:36} {row['requests_per_s']:7.2f} {row['p50_s']:7.3f} {row['p95_s']:7.3f} "
              f"{row['vs_a']:7.2f}")
    print(f"server start (spawn, load; before the first request): {ready_one:.1f} s and {ready_many:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows, "ready_s": [ready_one, ready_many]}, f, indent=1)


if __name__ == "__main__":
    main()
