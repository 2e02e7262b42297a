"""``push_output`` (``train.push_to_hub``, ``sft --push-to-hub``) through the real huggingface_hub client
against a local stand-in of the Hub on loopback: only the endpoints the client calls, every request recorded,
no network."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from devkit.teacher_process import free_port, serve_in_thread
from student_trainer.hub import HubPushError, files_to_push, push_output

TOKEN = "hf_standin_token"
ROOT = Path(__file__).resolve().parents[1]


class StandInHub:
    """Repos in memory: ``repos[repo_id] = {"private": bool, "files": {path: bytes}, "commits": [...]}``.
    Serves create repo, preupload (every file "regular") and the ndjson commit with base64 content; any other
    call is recorded in ``unknown`` and answered 404, so the test sees it."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.auth: set[str] = set()
        self.app = FastAPI()
        self.app.middleware("http")(self._record)
        self.app.post("/api/repos/create")(self.create)
        self.app.post("/api/models/{ns}/{name}/preupload/{revision}")(self.preupload)
        self.app.post("/api/models/{ns}/{name}/commit/{revision}")(self.commit)
        self.app.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])(self.other)
        self.url = ""

    async def _record(self, request: Request, call_next):
        self.calls.append((request.method, request.url.path))
        auth = request.headers.get("authorization", "")
        self.auth.add(auth)
        if request.url.path != "/health" and auth != f"Bearer {TOKEN}":
            return JSONResponse({"error": "Invalid credentials in Authorization header"}, status_code=401)
        return await call_next(request)

    async def create(self, request: Request):
        body = await request.json()
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            # as the Hub answers: 409 with the URL (create_repo(exist_ok=True) reads it)
            doc = {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            return JSONResponse(doc, status_code=409)
        self.repos[repo_id] = {"private": body.get("visibility") == "private", "files": {}, "commits": []}
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    async def preupload(self, ns: str, name: str, revision: str, request: Request):
        body = await request.json()
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
        return {"files": files, "commitOid": "0" * 40}

    async def commit(self, ns: str, name: str, revision: str, request: Request):
        repo = self.repos[f"{ns}/{name}"]
        header, written = None, []
        for line in (await request.body()).splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                value = item["value"]
                assert value["encoding"] == "base64", value["encoding"]
                repo["files"][value["path"]] = base64.b64decode(value["content"])
                written.append(value["path"])
            else:
                raise AssertionError(f"the stand-in does not implement commit operation {item['key']!r}")
        oid = f"{len(repo['commits']) + 1:040d}"
        repo["commits"].append({"summary": header["summary"], "files": written})
        return {"commitUrl": f"{self.url}/{ns}/{name}/commit/{oid}", "commitOid": oid, "success": True}

    async def other(self, rest: str, request: Request):
        if rest == "health":
            return {"ok": True}
        self.unknown.append((request.method, "/" + rest))
        return JSONResponse({"error": f"not implemented by the stand-in: /{rest}"}, status_code=404)


@pytest.fixture()
def hub():
    stand_in = StandInHub()
    port = free_port()
    with serve_in_thread(stand_in.app, port) as url:
        stand_in.url = url
        yield stand_in


@pytest.fixture()
def online(hub, monkeypatch):
    """This process's huggingface_hub pointed at the stand-in (conftest sets HF_HUB_OFFLINE=1 elsewhere)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    return hub


def fake_run(out: Path) -> Path:
    """An output directory as train/sft leave it: model files, run records, a checkpoint and a tracker log."""
    (out / "checkpoints" / "checkpoint-0000002").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-0000002" / "optimizer.bin").write_bytes(os.urandom(4096))
    (out / "checkpoints" / "checkpoint-0000002" / "trainer_state.json").write_text('{"step": 2}')
    (out / "opd" / "events.out.tfevents.1.host").parent.mkdir(parents=True)
    (out / "opd" / "events.out.tfevents.1.host").write_bytes(b"tb")
    (out / "config.json").write_text('{"model_type": "qwen3"}')
    (out / "model.safetensors").write_bytes(os.urandom(300_000) + bytes(range(256)))
    (out / "tokenizer.json").write_text('{"version": "1.0", "unicode": "é ☃"}')
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    return out


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_push_uploads_the_model_byte_identical_without_checkpoints(online, tmp_path, capsys):
    out = fake_run(tmp_path / "run")
    url = push_output(out, "me/tiny-opd", True, commit_message="OPD, 2 steps", token=TOKEN)
    assert url == f"{online.url}/me/tiny-opd"
    assert online.unknown == []  # every call the client made is one the stand-in implements
    repo = online.repos["me/tiny-opd"]
    assert repo["private"] is True
    expected = {
        k: v for k, v in local_files(out).items() if not k.startswith("checkpoints/") and "tfevents" not in k
    }
    assert set(expected) == {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"}
    assert repo["files"] == expected  # byte-identical, and nothing else (no checkpoint, no tracker log)
    assert [c["summary"] for c in repo["commits"]][0] == "OPD, 2 steps"
    printed = capsys.readouterr().out
    assert "uploading 4 files" in printed and "model.safetensors" in printed and "checkpoints" not in printed
    assert sorted(p.as_posix() for p in files_to_push(out)) == sorted(expected)


def test_an_existing_repo_is_updated_and_public_is_honoured(online, tmp_path):
    out = fake_run(tmp_path / "run")
    push_output(out, "me/again", False, commit_message="first", token=TOKEN)
    (out / "model.safetensors").write_bytes(b"new weights")
    push_output(out, "me/again", False, commit_message="second", token=TOKEN)  # create answers 409: kept
    repo = online.repos["me/again"]
    assert repo["private"] is False and repo["files"]["model.safetensors"] == b"new weights"
    assert [c["summary"] for c in repo["commits"]][-1] == "second"


def test_refusals_name_the_repo_and_the_fix(online, tmp_path, monkeypatch):
    from huggingface_hub import constants

    out = fake_run(tmp_path / "run")
    with pytest.raises(HubPushError, match=r"push to me/x failed: HTTP 401.*hf auth login"):
        push_output(out, "me/x", True, commit_message="m", token="hf_wrong")
    assert "me/x" not in online.repos
    with pytest.raises(HubPushError, match="holds no saved model"):
        push_output(tmp_path / "empty", "me/x", True, commit_message="m", token=TOKEN)
    with pytest.raises(HubPushError, match="holds no saved model"):  # a model further down is not the run
        push_output(tmp_path, "me/x", True, commit_message="m", token=TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    with pytest.raises(
        HubPushError, match=r"cannot reach http://127\.0\.0\.1:\d+ .*upload it later with: hf upload"
    ):
        push_output(out, "me/x", True, commit_message="m", token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set"):
        push_output(out, "me/x", True, commit_message="m", token=TOKEN)


def test_sft_command_pushes_its_output(hub, tiny_pair, tmp_path):
    """The whole door: `student-trainer sft --push-to-hub` in a fresh process, the Hub found through
    HF_ENDPOINT and the token through HF_TOKEN, as a user would run it."""
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}."} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft_out"
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    cmd = [sys.executable, "-m", "student_trainer", "sft", "--model", str(tiny_pair[1]), "--data", str(data)]
    cmd += ["--output-dir", str(out), "--steps", "2", "--batch-size", "4", "--micro-batch", "4"]
    cmd += ["--save-every", "1", "--no-plot", "--push-to-hub", "--hub-model-id", "me/tiny-sft"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"hub: pushed to {hub.url}/me/tiny-sft" in proc.stdout
    assert (out / "checkpoints").is_dir()  # there was a checkpoint to leave out
    repo = hub.repos["me/tiny-sft"]
    expected = {k: v for k, v in local_files(out).items() if not k.startswith("checkpoints/")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "sft_config.json"} <= set(expected)
    assert repo["files"] == expected and repo["private"] is True
    assert hub.unknown == [] and hub.auth <= {f"Bearer {TOKEN}", ""}
