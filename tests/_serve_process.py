"""`ldmkit serve` as a user runs it, for tests: a real process on a free localhost port,
or the app in uvicorn on a thread of the test process (when a test needs to reach in)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str, headers: dict | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@contextlib.contextmanager
def serve_process(model_dir: Path, log_path: Path, *flags: str, env: dict | None = None
                  ) -> Iterator[int]:
    """The port of `ldmkit serve --model model_dir *flags`, up and answering /health."""
    port = free_port()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ldmkit.cli", "serve", "--model",
                                 str(model_dir), "--port", str(port), "--device", "cpu",
                                 "--log-level", "warning", *flags],
                                stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            _wait_healthy(port, proc, log)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_healthy(port: int, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if get_json(port, "/health")["status"] == "ok":
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            proc.kill()
            raise RuntimeError(f"ldmkit serve did not come up:\n{log.read()[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[int]:
    """The port of `app` run by uvicorn on a thread of this process."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
