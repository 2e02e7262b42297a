"""Server lifecycle over real HTTP: API key, readiness, bounded queue (503), load failure, CLI help."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import pytest

from devkit.teacher_process import TeacherProcess, free_port, serve_in_thread
from shared import codec
from teacher_server.app import create_app
from teacher_server.backends.hf import HFBackend
from teacher_server.config import ServerConfig

SEQ = {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5, 6, 7]}


def test_api_key(tiny_pair):
    with TeacherProcess(tiny_pair[0], env={"TEACHER_API_KEY": "s3cret"}) as t:
        assert httpx.get(t.url + "/health").status_code == 200  # liveness stays open
        assert httpx.get(t.url + "/ready").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(t.url + "/v1/score", json={"sequences": [SEQ]}, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["field"] == "Authorization"
            assert httpx.get(t.url + "/v1/model", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.post(t.url + "/v1/score", json={"sequences": [SEQ]}, headers=ok).status_code == 200
        assert httpx.get(t.url + "/v1/model", headers=ok).status_code == 200


class _GatedBackend(HFBackend):
    """The real transformers backend whose load waits for a gate, so the test can look at the server while
    the model is 'loading' (a real slow load cannot be produced on demand with tiny models)."""

    gate = threading.Event()

    async def load(self) -> None:
        await asyncio.to_thread(self.gate.wait, 60)
        await super().load()


def test_ready_only_after_load(tiny_pair):
    config = ServerConfig(model=str(tiny_pair[0]), port=free_port())
    app = create_app(config, backend=_GatedBackend(config))
    with serve_in_thread(app, config.port) as url:
        assert httpx.get(url + "/health").json() == {"status": "ok", "ready": False}
        assert httpx.get(url + "/ready").status_code == 503
        r = httpx.post(url + "/v1/score", json={"sequences": [SEQ]})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "loading" in r.json()["error"]["message"]
        _GatedBackend.gate.set()
        for _ in range(200):
            if httpx.get(url + "/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.post(url + "/v1/score", json={"sequences": [SEQ]}).status_code == 200


def test_queue_full_gives_503_with_retry_after(tiny_pair):
    args = ["--max-queue-tokens", "20", "--batch-window-ms", "300"]
    with TeacherProcess(tiny_pair[0], *args) as t:
        body = codec.encode({"sequences": [{"prompt_ids": [1] * 8, "completion_ids": [2] * 8}]}, codec.JSON)

        async def flood():
            async with httpx.AsyncClient(timeout=30) as c:
                return await asyncio.gather(
                    *(
                        c.post(t.url + "/v1/score", content=body, headers={"Content-Type": codec.JSON})
                        for _ in range(6)
                    )
                )

        codes = [r for r in asyncio.run(flood())]
        statuses = sorted(r.status_code for r in codes)
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
        busy = next(r for r in codes if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "overloaded"
        assert "teacher_rejected_total 0.0" not in httpx.get(t.url + "/metrics").text


def test_load_failure_exits_with_clear_message(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, "-m", "teacher_server", "--model", str(missing), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "could not load" in proc.stderr and str(missing) in proc.stderr


@pytest.mark.parametrize(
    "args, text",
    [
        (["--help"], "--max-batch-tokens"),
        (["--model", "x", "--max-top-k", "-1"], "--max-top-k -1 must be"),
        (["--model", "x", "--max-model-len", "9000", "--max-batch-tokens", "100"], "below --max-model-len"),
    ],
)
def test_cli_help_and_config_errors(args, text):
    proc = subprocess.run(
        [sys.executable, "-m", "teacher_server", *args], capture_output=True, text=True, timeout=60
    )
    assert text in proc.stdout + proc.stderr
    assert (proc.returncode == 0) == (args == ["--help"])
