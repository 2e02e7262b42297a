"""The OpenAPI document, with the hand-parsed request bodies of every surface filled in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from shared import codec

_BODY_METHODS = ("post", "put", "patch")


def install_openapi(app: FastAPI, surfaces: Sequence[Any]) -> None:
    """Document every surface's ``BODIES`` (path -> model; parsed by hand, so FastAPI cannot see them) for
    JSON and msgpack. Paths are checked against the surfaces' own routers: recent FastAPI versions list an
    included router in ``app.routes`` as one lazy entry, not as its routes."""
    bodies: dict[str, type[BaseModel]] = {p: m for s in surfaces for p, m in s.BODIES.items()}
    paths = {getattr(r, "path", None) for s in surfaces for r in s.router.routes}
    missing = sorted(set(bodies) - paths)
    if missing:
        raise ValueError(f"request bodies documented for paths no route serves: {missing}")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            for method, operation in schema["paths"][path].items():
                if method in _BODY_METHODS:
                    operation["requestBody"] = {
                        "required": True,
                        "content": {codec.JSON: {"schema": ref}, codec.MSGPACK: {"schema": ref}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
