"""The server's rooms: API surfaces registered in one table, backends in one table, typed backend errors.

Over real HTTP (uvicorn in a thread, the real transformers backend on the tiny teacher): a surface added to
``SURFACES`` is served, documented and goes through the same service path (same scores, same metrics); a
backend's ``UnsupportedRequest`` becomes exactly the 422 body the request layer gives.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from devkit.teacher_process import free_port, serve_in_thread
from shared import codec
from shared.protocol import ScoreOptions, ScoreRequest
from teacher_server import api, service
from teacher_server.api.http import AUTH, observed, parse, respond, server_state
from teacher_server.api.openapi import install_openapi
from teacher_server.app import create_app
from teacher_server.backends import BACKENDS, create_backend
from teacher_server.backends.base import Backend
from teacher_server.backends.hf import HFBackend
from teacher_server.cli import build_parser
from teacher_server.config import ConfigError, ServerConfig
from teacher_server.errors import APIError, UnsupportedRequest, as_api_error
from teacher_server.jobs import ScoreJob
from teacher_server.state import require_ready

REFUSE_TOP_K = 13  # the test backend refuses requests with this top_k
REFUSAL = UnsupportedRequest(
    "top_k: this backend does not like 13", field="top_k", value=list(range(20)), limit="anything but 13"
)


class _RefusingBackend(HFBackend):
    """The real transformers backend that refuses one request shape, as a backend without a capability does."""

    async def score(self, jobs):
        if jobs[0].top_k == REFUSE_TOP_K:
            raise REFUSAL
        return await super().score(jobs)


# A surface as the next issue will add one: its own request shape, the shared plumbing, the one service path.
class _LogprobsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_ids: list[int]
    completion_ids: list[int]


_router = APIRouter()


@_router.post("/test/logprobs", dependencies=[AUTH])
async def logprobs(request: Request) -> Response:
    state = server_state(request)
    async with observed(state, "test"):
        require_ready(state)
        req, fmt = await parse(request, _LogprobsRequest, state)
        seq = {"prompt_ids": req.prompt_ids, "completion_ids": req.completion_ids}
        results = await service.score_request(state, ScoreRequest(sequences=[seq], top_k=0))
        return await respond({"logprobs": results[0].logprobs}, fmt, len(req.completion_ids))


class _ExtraSurface:
    router = _router
    BODIES = {"/test/logprobs": _LogprobsRequest}


@pytest.fixture(scope="module")
def server(tiny_pair):
    """An app with one extra surface registered and a refusing backend, served over real HTTP."""
    config = ServerConfig(model=str(tiny_pair[0]), port=free_port(), device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("teacher_server.app.SURFACES", (*api.SURFACES, _ExtraSurface))
        app = create_app(config, backend=_RefusingBackend(config))
    with serve_in_thread(app, config.port) as url:
        for _ in range(600):
            if httpx.get(url + "/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/ready").status_code == 200
        yield app, url


def _metric(url: str, line_start: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = [ln for ln in text.splitlines() if ln.startswith(line_start + " ")]
    return float(found[0].split()[-1]) if found else 0.0


# ------------------------------------------------------------------------------------------------ surfaces
def test_every_surface_route_is_served_and_every_body_documented(server):
    app, url = server
    surfaces = (*api.SURFACES, _ExtraSurface)
    for surface in surfaces:
        routes = {(r.path, m) for r in surface.router.routes for m in r.methods}
        assert routes, surface
        for path, method in routes:  # really served: an empty request reaches the handler (not 404/405)
            assert httpx.request(method, url + path, timeout=30).status_code not in (404, 405), (path, method)
    spec = httpx.get(url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    bodies = {path: model for s in surfaces for path, model in s.BODIES.items()}
    assert {"/v1/score", "/v1/generate", "/test/logprobs"} <= set(bodies)
    for path, model in bodies.items():
        assert model.__name__ in schemas, path
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        assert content == {codec.JSON: {"schema": ref}, codec.MSGPACK: {"schema": ref}}, path
    for path in ("/v1/score", "/v1/generate", "/v1/model"):
        op = next(iter(spec["paths"][path].values()))
        for code in ("400", "401", "413", "415", "422", "503"):
            assert op["responses"][code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"
            }, (path, code)


def test_a_new_surface_takes_the_one_service_path(server):
    _, url = server
    seq = {"prompt_ids": [1, 5, 9], "completion_ids": [10, 11, 12, 13]}
    native = httpx.post(url + "/v1/score", json={"sequences": [seq], "top_k": 0}).json()
    before = _metric(url, "teacher_scored_tokens_total")
    r = httpx.post(
        url + "/test/logprobs",
        content=codec.encode(seq, codec.MSGPACK),
        headers={"Content-Type": codec.MSGPACK},
    )
    assert r.status_code == 200, r.text
    got = codec.decode(r.content, codec.MSGPACK)["logprobs"]
    np.testing.assert_allclose(got, native["results"][0]["logprobs"], rtol=0, atol=0)
    assert _metric(url, "teacher_scored_tokens_total") - before == 4  # counted by the service, once
    assert _metric(url, 'teacher_requests_total{endpoint="test",status="200"}') == 1
    # the shared plumbing applies to the new door too: validation (422 naming the field) and limits
    bad = httpx.post(url + "/test/logprobs", json={**seq, "completion_ids": [10, 99999]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "sequences[0].completion_ids[1]"
    typo = httpx.post(url + "/test/logprobs", json={**seq, "prompt": "x"})
    assert typo.status_code == 422 and typo.json()["error"]["field"] == "prompt"


def test_bodies_for_a_path_no_route_serves_are_refused():
    class Documented:  # a surface that documents a body for a path its router does not serve
        router = APIRouter()
        BODIES = {"/v1/nowhere": ScoreRequest}

    with pytest.raises(ValueError, match="/v1/nowhere"):
        install_openapi(FastAPI(), (*api.SURFACES, Documented))


# ------------------------------------------------------------------------------------------------- errors
def test_backend_refusal_is_the_same_422_as_a_request_error(server):
    _, url = server
    before = _metric(url, 'teacher_requests_total{endpoint="score",status="422"}')
    doc = {"sequences": [{"prompt_ids": [1, 2], "completion_ids": [3]}], "top_k": REFUSE_TOP_K}
    r = httpx.post(url + "/v1/score", json=doc)
    assert r.status_code == 422
    expected = APIError(
        422, REFUSAL.message, field=REFUSAL.field, value=REFUSAL.value, limit=REFUSAL.limit
    ).body()
    assert r.json() == expected
    assert r.json()["error"] == {
        "type": "invalid_request",
        "message": "top_k: this backend does not like 13",
        "field": "top_k",
        "value": "[20 items]",  # echoed values are summarised as for every client error
        "limit": "anything but 13",
    }
    assert _metric(url, 'teacher_requests_total{endpoint="score",status="422"}') - before == 1
    assert httpx.post(url + "/v1/score", json={**doc, "top_k": 2}).status_code == 200


def test_vllm_guards_raise_the_backend_error_not_an_http_one():
    from teacher_server.backends.vllm import _refuse_unsupported  # no vllm import needed for the guards

    ids = np.arange(3, dtype=np.int64)
    job = ScoreJob(ids[:1], ids[1:], ScoreOptions(top_k=1, return_entropy=True))
    with pytest.raises(UnsupportedRequest) as info:
        _refuse_unsupported(job, 0, candidates=False)
    err = as_api_error(info.value)
    assert err.status == 422 and err.body()["error"]["field"] == "return_entropy"
    job = ScoreJob(ids[:1], ids[1:], ScoreOptions(top_k=1), candidate_ids=np.zeros((2, 1), np.int64))
    with pytest.raises(UnsupportedRequest, match="arbitrary ids"):
        _refuse_unsupported(job, 4, candidates=False)


def test_no_backend_module_uses_http_errors():
    """Backends raise UnsupportedRequest; only the API layer knows HTTP statuses."""
    root = Path(__file__).resolve().parents[1] / "teacher_server" / "backends"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "APIError" not in names and not any(m and ".api" in m for m in modules), path.name


# ----------------------------------------------------------------------------------------------- backends
def test_backend_table_is_what_config_cli_and_factory_read(tiny_pair):
    assert list(BACKENDS) == ["hf", "vllm"]
    choices = next(a.choices for a in build_parser()._actions if "--backend" in a.option_strings)
    assert list(choices) == list(BACKENDS)
    with pytest.raises(ConfigError) as info:
        ServerConfig(model="x", backend="sglang")
    assert all(name in str(info.value) for name in BACKENDS)
    for name in BACKENDS:
        backend = create_backend(ServerConfig(model=str(tiny_pair[0]), backend=name))
        assert isinstance(backend, Backend) and backend.name == name
