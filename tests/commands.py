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


class Server:
    """``asyncdiff serve ARGS`` in a fresh process of its own session (its workers too), on a free
    port of 127.0.0.1; :meth:`stop` sends SIGTERM and waits, then checks that no process of the
    session is left. Use as a context manager."""

    def __init__(self, *args: str, api_key: str | None = None, ready_s: float = 240.0) -> None:
        import os
        import socket

        from asyncdiff.client import Client

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "ASYNCDIFF_LOG": "info"}
        env.pop("ASYNCDIFF_API_KEY", None)
        command = [sys.executable, "-m", "asyncdiff.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   *(["--api-key", api_key] if api_key else []), *args]
        self.log = open(os.devnull if not os.environ.get("ASYNCDIFF_TEST_SERVE_LOG") else
                        os.environ["ASYNCDIFF_TEST_SERVE_LOG"], "a")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self.client = Client(self.url, api_key=api_key, timeout=120)
        try:
            self.ready = self.client.wait_ready(ready_s)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, the exit status, and every process of the server's session gone."""
        import os
        import signal
        import time

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            rc = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            raise AssertionError(f"the server did not exit within {timeout_s} s of SIGTERM")
        finally:
            self.log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and session_processes(self.process.pid):
            time.sleep(0.1)
        left = session_processes(self.process.pid)
        if left:
            os.killpg(self.process.pid, signal.SIGKILL)
        assert not left, f"processes left behind by the server: {left}"
        return rc

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None or not self.log.closed:
            self.stop()


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of session ``session``, from /proc."""
    import os

    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            found.append(int(name))
    return found
