"""The gateway's OpenAPI document describes its bodies, and describing them validates nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fake_vllm import BASE_ID, Setup, gateway, ready

pytestmark = pytest.mark.unit


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return dict(node)


def test_request_and_response_bodies_are_documented(gateway_setup: Setup) -> None:
    with gateway(gateway_setup) as client:
        doc = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    unresolved = [ref for ref in set(_refs(doc)) if not ref.startswith("#/components/schemas/")]
    assert not unresolved
    for ref in set(_refs(doc)):
        _resolve(doc, ref)  # every reference points at a schema in the document

    for path, request, response in (
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion"),
        ("/v1/completions", "CompletionRequest", "Completion"),
    ):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith(f"/{request}")
        body = _resolve(doc, ref)
        assert body["title"] == "CompletionCreateParamsBase"
        assert {"model"} <= set(body["required"]) and "temperature" in body["properties"]
        ok = op["responses"]["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith(f"/{response}")
        assert "text/event-stream" in ok
        for status in ("400", "401", "403", "404", "429", "500", "503"):
            error = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert set(_resolve(doc, error)["properties"]) == {"error"}
    chat = _resolve(doc, "#/components/schemas/ChatCompletionRequest")
    assert set(chat["required"]) == {"messages", "model"}
    chunk = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert _resolve(doc, chunk["schema"]["$ref"])["title"] == "ChatCompletionChunk"
    models = doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    card = _resolve(doc, "#/components/schemas/ModelCard")
    assert models["$ref"].endswith("/ModelList") and {"aliases", "versions", "parent"} <= set(
        card["properties"]
    )


def test_the_pass_through_stays_a_pass_through(gateway_setup: Setup) -> None:
    """The documented schema is not enforced: vLLM's extras reach the engine, and so does what the
    engine alone decides to refuse."""
    with gateway(gateway_setup) as client:
        ready(client)
        body = {
            "model": BASE_ID,
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": "hot",  # not a number: the engine, not the gateway, answers that
            "ignore_eos": True,  # a vLLM extra OpenAI's schema does not know
            "top_k": 5,
        }
        client.post("/v1/chat/completions", json=body)
    (forwarded,) = gateway_setup.engines[0].requests
    assert forwarded["temperature"] == "hot" and forwarded["ignore_eos"] is True and forwarded["top_k"] == 5
