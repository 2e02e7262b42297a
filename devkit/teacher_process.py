"""Start a ``teacher-server`` subprocess and wait until it is ready (demo, lab, tests).

The trainer never imports the server: it runs it as a separate process, exactly as a user would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherProcess:
    """``with TeacherProcess(model_dir) as t: t.url``. Logs go to ``t.log_path``.

    ``start`` blocks until ``/ready`` answers 200 (or raises with the log's tail); ``stop`` terminates it.
    The same port is reused across restarts, so a trainer pointed at ``t.url`` can reconnect.
    """

    def __init__(
        self,
        model: str | Path,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 180.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.model = str(model)
        self.args = list(args)
        self.port = port or free_port()
        self.env = env
        self.ready_timeout = ready_timeout
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="teacher-", suffix=".log")[1])
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "teacher_server",
            "--model",
            self.model,
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self, wait: bool = True) -> TeacherProcess:
        """Launch the server; with ``wait`` (default) block until it is ready (else call wait_ready later)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"teacher-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"teacher-server not ready after {self.ready_timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> TeacherProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int, answer_timeout: float = 30.0) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn on a thread of this process; yields its URL once ``/health``
    answers (readiness is the caller's to wait for), and stops the server on exit. For tests that need the
    app object in hand (a custom backend, an extra surface) where :class:`TeacherProcess` would not do."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + answer_timeout
        while True:
            try:
                httpx.get(url + "/health", timeout=2.0)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError(
                        f"the server on {url} did not answer within {answer_timeout:.0f}s"
                    ) from None
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
