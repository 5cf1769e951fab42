"""Running ``asyncdiff`` as a command: in a fresh interpreter, or in this one."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from asyncdiff.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncdiff.cli", *args], capture_output=True, text=True,
                          timeout=300)


def cli_here(capsys, *args: str) -> dict:
    """``asyncdiff ARGS`` in this process (its ranks still start fresh): the JSON line it prints.
    Tests of the executable itself (its exit status, streams, a fresh interpreter) use ``run_cli``."""
    threads = torch.get_num_threads()  # one device runs here, on the command's thread count
    try:
        rc = main(list(args))
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return json.loads(captured.out.strip().splitlines()[-1])
