"""The gateway's OpenAPI document: request and response bodies from the ``openai`` package's types.

The chat and completion routes are a pass-through: the engine validates requests,
and the gateway reads only ``model`` and ``stream``. So their bodies are *described*
here, for ``/docs`` and generated clients, and never validated. The schemas come
from the maintained source, the ``openai`` package's request TypedDicts and
response models, rather than from a copy of ours.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from openai.types.shared import ErrorObject
from pydantic import BaseModel, TypeAdapter

REF = "#/components/schemas/{model}"


class ErrorResponse(BaseModel):
    """Every error the gateway returns: OpenAI's error shape."""

    error: ErrorObject


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Malformed JSON, a missing `model`, or a field the engine refused (`param` names it)."),
        (401, "No API key, or an unknown or revoked one (when `server.auth` is on)."),
        (403, "The API key may not use this adapter."),
        (404, "No such model, adapter, alias or version, or an archived version."),
        (413, "The request body is larger than `server.max_body_bytes`."),
        (429, "The gateway is at `server.max_concurrency`; see `Retry-After`."),
        (500, "An unexpected error in the gateway (no detail is returned)."),
        (503, "No engine replica could serve the request; see `Retry-After`."),
    )
}


def request_body(schema_name: str, description: str) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is described by ``schema_name``."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=schema_name)}}},
        }
    }


def stream_response(model: type[BaseModel], chunk: type[BaseModel], description: str) -> dict[str, Any]:
    """A 200 that is ``model`` as JSON, or server-sent events of ``chunk`` when ``stream`` is true."""
    return {
        "model": model,
        "description": description,
        "content": {"text/event-stream": {"schema": {"$ref": REF.format(model=chunk.__name__)}}},
    }


def install(app: FastAPI, *, bodies: dict[str, Any], extra_models: list[type[BaseModel]]) -> None:
    """Generate the document once, adding the request bodies and models the routes refer to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
        generated: list[tuple[str, dict[str, Any]]] = [
            (name, TypeAdapter(body).json_schema(ref_template=REF)) for name, body in bodies.items()
        ]
        generated += [(m.__name__, m.model_json_schema(ref_template=REF)) for m in extra_models]
        for name, body_schema in generated:
            for def_name, definition in body_schema.pop("$defs", {}).items():
                components.setdefault(def_name, definition)
            components[name] = body_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
