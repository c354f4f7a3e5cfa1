"""The OpenAPI document at ``/openapi.json`` (browsable at ``/docs``): every route the server answers.

FastAPI describes the routes it dispatches but not the JSON bodies the POST handlers read and
validate themselves (``app.parse``), nor plain Starlette routes (the image route). ``describe``
adds both: each POST route's request schema (from the pydantic model the handler validates with),
an OpenAI-style error response, and the bearer scheme on the routes that need the API key.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

ERROR_RESPONSE = {
    "description": 'An OpenAI-style error: {"error": {"message", "type", "param", "code"}}',
}


def describe(
    api: FastAPI,
    bodies: dict[str, tuple[type[BaseModel], str]],
    open_paths: frozenset[str],
    api_key: bool,
) -> None:
    """Makes ``api.openapi()`` return the full document.

    ``bodies``: POST path -> (the request model, a one-line summary); ``open_paths`` need no key
    even when the server has one (``api_key``).
    """

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _document(api, bodies, open_paths, api_key)
        return api.openapi_schema

    api.openapi = openapi


def _document(
    api: FastAPI, bodies: dict[str, tuple[type[BaseModel], str]], open_paths: frozenset[str], api_key: bool
) -> dict[str, Any]:
    doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    paths = doc.setdefault("paths", {})
    components = doc.setdefault("components", {})
    refs, defs = models_json_schema(
        [(model, "validation") for model, _ in bodies.values()], ref_template="#/components/schemas/{model}"
    )
    components.setdefault("schemas", {}).update(defs.get("$defs", {}))
    for path, (model, summary) in bodies.items():
        operation = paths.setdefault(path, {}).setdefault(
            "post", {"responses": {"200": {"description": "Successful Response"}}}
        )
        operation["summary"] = summary
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(model, "validation")]}},
        }
    for path, operations in paths.items():
        for operation in operations.values():
            operation["responses"].setdefault("4XX", ERROR_RESPONSE)
            if api_key and path not in open_paths:
                operation["security"] = [{"bearer": []}]
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
