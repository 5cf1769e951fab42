"""The same command, run again in fresh processes: same plan, same image? (Note [plan cache])

    python -m benchmarks.plan_determinism [--runs 5] [--size bench] [--steps 10]

Runs ``asyncdiff generate --size SIZE --devices 2`` ``--runs`` times with the plan cache in a
fresh folder, then as many times with the cache off (every run measures its own plan, as before
the cache existed), and prints per run where the plan came from, the plan (blocks per stage),
its main-path depth and a hash of the written image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(size: str, steps: int, cache: str, out: Path) -> dict:
    env = {**os.environ, "ASYNCDIFF_PLAN_CACHE": cache}
    done = subprocess.run([sys.executable, "-m", "asyncdiff.cli", "generate", "--size", size, "--devices", "2",
                           "--steps", str(steps), "--warm-up", "1", "--seed", "0", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["image_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| cache | run | plan source | plan (blocks per stage) | main-path depth | image sha256 |")
        print("|---|---:|---|---|---:|---|")
        for label, cache in (("on", str(Path(tmp) / "plans")), ("off", "off")):
            records = [run(args.size, args.steps, cache, Path(tmp) / f"{label}{i}.png") for i in range(args.runs)]
            for i, r in enumerate(records):
                source = r["plan_source"].replace(tmp, "$TMP")
                print(f"| {label} | {i + 1} | {source} | {r['plan']} | {r.get('main_path_depth')} | "
                      f"{r['image_sha256']} |", flush=True)
            plans = {json.dumps(r["plan"]) for r in records}
            images = {r["image_sha256"] for r in records}
            print(f"| {label} | | {len(plans)} distinct plan(s), {len(images)} distinct image(s) | | | |", flush=True)


if __name__ == "__main__":
    main()
