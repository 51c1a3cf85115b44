"""Bad requests to /v1/completions and /v1/feedback, with auth on: each gets OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with a 400 or a 401 naming what to change;
never a 500, never a traceback in the log. Bodies that are not JSON objects, fields of the wrong
type or missing, and malformed ``Authorization`` headers."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from loraflow.registry.keys import create_key
from loraflow.registry.redact import Redactor
from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings, Settings, TrafficSettings
from loraflow.registry.traffic import TrafficStore
from loraflow.server.app import create_app
from loraflow.server.engine.vllm_http import VLLMHttpEngine
from loraflow.server.traffic.recorder import Exchange
from loraflow.server.traffic.writer import ThreadWriter
from tests.factories import FORCED, make_adapter, make_base, no_loraflow_env
from tests.fake_vllm import BASE_ID, FakeVLLM, wait

pytestmark = pytest.mark.unit

OK_COMPLETION = {"model": "support", "prompt": "hello"}


@dataclass
class ValidatingVLLM(FakeVLLM):
    """Answers a completion without a prompt as vLLM does: a 400 naming the field."""

    def _complete(self, request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if request.url.path == "/v1/completions" and "prompt" not in body:
            error = {
                "message": "Field required",
                "type": "BadRequestError",
                "param": "body.prompt",
                "code": 400,
            }
            return httpx.Response(400, json={"error": error})
        return super()._complete(request, body)


class _Kept(logging.Handler):
    """Every log record the gateway emits, to look for errors and tracebacks after each test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Gateway:
    client: TestClient
    key: str
    engine: ValidatingVLLM
    logs: _Kept

    def post(self, path: str, body: bytes, authorization: bytes | None = None) -> Any:
        headers = [(b"content-type", b"application/json")]
        auth = f"Bearer {self.key}".encode() if authorization is None else authorization
        if auth:
            headers.append((b"authorization", auth))
        return self.client.post(path, content=body, headers=headers)

    def a_request_id(self) -> str:
        r = self.post("/v1/completions", json.dumps(OK_COMPLETION).encode())
        assert r.status_code == 200, r.text
        return str(r.headers["x-request-id"])


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for the module (auth on, every request recorded): the tests only read from it,
    and each one makes the request ids it rates."""
    root = tmp_path_factory.mktemp("bad-requests")
    with no_loraflow_env():  # the autouse isolated_env is per test; this is per module
        base = make_base(root / "base")
        settings = Settings(
            home=root / "home",
            server=ServerSettings(poll_interval_s=0.05, auth=True),
            traffic=TrafficSettings(sample_rate=1.0, writer="thread"),
        )
    registry = Registry.open(settings)
    registry.register("support", make_adapter(root / "a1", seed=1), base_model=str(base))
    registry.promote("support", 1, force=True, reason=FORCED)
    key, _ = create_key(registry, "tenant", ["support"])
    engine = ValidatingVLLM("http://replica-0", str(base))
    app = create_app(
        settings,
        registry=registry,
        engines=[VLLMHttpEngine(engine.url, transport=engine.transport())],
        base_model=str(base),
        base_model_id=BASE_ID,
    )
    logs = _Kept()
    logging.getLogger().addHandler(logs)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            wait(lambda: client.get("/ready").status_code == 200, "/ready")
            yield Gateway(client, key, engine, logs)
    finally:
        logging.getLogger().removeHandler(logs)
        registry.close()


@pytest.fixture
def gw(shared: Gateway) -> Iterator[Gateway]:
    """The shared gateway; after the test, no 500 was counted and nothing logged an error."""
    seen, failed = len(shared.logs.records), _counted_500s(shared.client)
    yield shared
    assert _counted_500s(shared.client) == failed
    errors = [r.getMessage() for r in shared.logs.records[seen:] if r.exc_info or r.levelno >= logging.ERROR]
    assert errors == []


def _counted_500s(client: TestClient) -> float:
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'status="500"' in line)


def openai_error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]  # type: ignore[no-any-return]


NOT_AN_OBJECT: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("whitespace", b"  \n"),
    ("invalid JSON", b"{not json"),
    ("truncated", b'{"model": "support"'),
    ("not UTF-8", b'{"model": "\xff\xfe"}'),
    ("a list", b'[{"model": "support"}]'),
    ("a string", b'"support"'),
    ("a number", b"42"),
    ("null", b"null"),
    ("true", b"true"),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000),
    ("NaN", b'{"model": "support", "prompt": "hi", "temperature": NaN}'),
    ("Infinity", b'{"model": "support", "prompt": "hi", "temperature": -Infinity}'),
    ("a lone surrogate", b'{"model": "support", "prompt": "hi \\ud800 there"}'),
    # The same surrogate as encoded bytes, not as an escape: UTF-8 allows none.
    ("an encoded surrogate", b'{"model": "support", "prompt": "hi \xed\xa0\x80 there"}'),
    ("a UTF-16 surrogate", '{"model": "support", "prompt": "\ud800"}'.encode("utf-16-le", "surrogatepass")),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/feedback"])
@pytest.mark.parametrize(("what", "body"), NOT_AN_OBJECT, ids=[w for w, _ in NOT_AN_OBJECT])
def test_a_body_that_is_not_a_json_object_is_a_400_naming_the_body(
    gw: Gateway, path: str, what: str, body: bytes
) -> None:
    calls = len(gw.engine.requests)
    error = openai_error(gw.post(path, body), 400)
    assert error["param"] == "body" and error["type"] == "invalid_request_error", error
    assert len(gw.engine.requests) == calls  # nothing reached the engine


def test_a_surrogate_pair_is_a_character_not_an_error(gw: Gateway) -> None:
    r = gw.post("/v1/completions", b'{"model": "support", "prompt": "smile \\ud83d\\ude00"}')
    assert r.status_code == 200, r.text
    assert gw.engine.requests[-1]["prompt"] == "smile \U0001f600"
    utf16 = '{"model": "support", "prompt": "\u00e9t\u00e9 \U0001f600"}'.encode("utf-16")  # JSON allows it
    r = gw.post("/v1/completions", utf16)
    assert r.status_code == 200, r.text
    assert gw.engine.requests[-1]["prompt"] == "\u00e9t\u00e9 \U0001f600"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "", "prompt": "hi"}, "model"),
        ({"model": ["support"], "prompt": "hi"}, "model"),
        ({"model": 7, "prompt": "hi"}, "model"),
        ({"model": "support", "prompt": "hi", "stream": "yes"}, "stream"),
        ({"model": "support", "prompt": "hi", "stream": 1}, "stream"),
        ({"model": "support", "prompt": "hi", "stream": True, "stream_options": "usage"}, "stream_options"),
        ({"model": "support", "prompt": "hi", "stream": True, "stream_options": [1]}, "stream_options"),
        # the engine validates the rest; its 400 is passed on in the same shape, naming the field
        ({"model": "support"}, "prompt"),
    ],
)
def test_completions_with_a_missing_or_mistyped_field_is_a_400_naming_it(
    gw: Gateway, body: dict[str, Any], param: str
) -> None:
    error = openai_error(gw.post("/v1/completions", json.dumps(body).encode()), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_an_unknown_model_is_a_404_in_the_same_shape(gw: Gateway) -> None:
    error = openai_error(
        gw.post("/v1/completions", json.dumps({"model": "ghost", "prompt": "x"}).encode()), 404
    )
    assert error["param"] == "model" and error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rating": 1}, "request_id"),
        ({"request_id": "RID"}, "rating"),
        ({}, "request_id"),
        ({"request_id": 5, "rating": 1}, "request_id"),
        ({"request_id": ["RID"], "rating": 1}, "request_id"),
        ({"request_id": "", "rating": 1}, "request_id"),
        ({"request_id": "RID", "rating": 5}, "rating"),
        ({"request_id": "RID", "rating": "1"}, "rating"),
        ({"request_id": "RID", "rating": None}, "rating"),
        ({"request_id": "RID", "rating": 1, "comment": 7}, "comment"),
        ({"request_id": "RID", "rating": 1, "correction": {"text": "x"}}, "correction"),
        ({"request_id": "RID", "rating": 1, "comment": "x" * 10_001}, "comment"),
        ({"request_id": "RID", "rating": 1, "score": 1}, "score"),
    ],
)
def test_feedback_with_a_missing_or_mistyped_field_is_a_400_naming_it(
    gw: Gateway, body: dict[str, Any], param: str
) -> None:
    rid = gw.a_request_id()
    body = {k: rid if v == "RID" else v for k, v in body.items()}
    error = openai_error(gw.post("/v1/feedback", json.dumps(body).encode()), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    ok = gw.post("/v1/feedback", json.dumps({"request_id": rid, "rating": 1}).encode())
    assert ok.status_code == 200, ok.text  # the bad one changed nothing: the request is still there


MALFORMED_AUTH: list[tuple[str, bytes]] = [
    ("no header", b""),
    ("scheme only", b"Bearer"),
    ("empty token", b"Bearer    "),
    ("Basic", b"Basic dXNlcjpwYXNzd29yZA=="),
    ("another scheme", b"Token KEY"),
    ("the key alone", b"KEY"),
    ("a tab", b"Bearer\tKEY"),
    ("two tokens", b"Bearer KEY KEY"),
    ("non-ASCII token", "Bearer clé-ünïcødé".encode()),
    ("non-ASCII after the key", "Bearer KEYé".encode()),
    ("Latin-1 bytes", b"Bearer \xe9\xff"),
    ("a wrong key", b"Bearer lf-0000000000000000000000000000000000000000000"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/feedback"])
@pytest.mark.parametrize(("what", "header"), MALFORMED_AUTH, ids=[w for w, _ in MALFORMED_AUTH])
def test_a_malformed_authorization_header_is_a_401_that_does_not_echo_it(
    gw: Gateway, path: str, what: str, header: bytes
) -> None:
    body = {"/v1/completions": OK_COMPLETION, "/v1/feedback": {"request_id": gw.a_request_id(), "rating": 1}}
    calls = len(gw.engine.requests)
    r = gw.post(path, json.dumps(body[path]).encode(), authorization=header.replace(b"KEY", gw.key.encode()))
    error = openai_error(r, 401)
    assert error["param"] == "authorization" and error["type"] == "authentication_error", error
    assert gw.key not in r.text and "dXNlcjpw" not in r.text
    assert len(gw.engine.requests) == calls  # nothing reached the engine


@pytest.mark.parametrize("header", [b"bearer KEY", b"BEARER KEY", b"Bearer   KEY   "])
def test_the_bearer_scheme_is_case_insensitive_and_spaces_around_the_key_are_ignored(
    gw: Gateway, header: bytes
) -> None:
    r = gw.post(
        "/v1/completions", json.dumps(OK_COMPLETION).encode(), header.replace(b"KEY", gw.key.encode())
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/feedback"])
@pytest.mark.parametrize("body", [b"{not json", b"[]", b"{}"])
def test_without_a_valid_key_a_bad_body_is_a_401_not_a_400(gw: Gateway, path: str, body: bytes) -> None:
    error = openai_error(gw.post(path, body, authorization=b""), 401)
    assert error["param"] == "authorization"


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "n", 100_000),
        ("/v1/completions", "best_of", 100_000),
        ("/v1/completions", "max_tokens", 1e9),
        ("/v1/chat/completions", "max_completion_tokens", 10**9),
        ("/v1/chat/completions", "messages", [{"role": "user", "content": "hi"}] * 5000),
    ],
)
def test_requests_past_the_gateways_caps_are_a_400_naming_the_field(
    gw: Gateway, path: str, field: str, value: Any
) -> None:
    prompt = (
        {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    body = {"model": "support", **prompt, field: value}
    calls = len(gw.engine.requests)
    error = openai_error(gw.post(path, json.dumps(body).encode()), 400)
    assert error["param"] == field and "server.max_" in error["message"], error
    assert len(gw.engine.requests) == calls  # nothing reached the engine
    within = body | {field: 2 if field != "messages" else value[:2]}
    assert gw.post(path, json.dumps(within).encode()).status_code != 400


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/feedback"])
def test_a_body_past_the_limit_is_a_413_before_it_is_read(gw: Gateway, path: str) -> None:
    limit = ServerSettings().max_body_bytes
    big = b'{"model": "support", "prompt": "' + b"x" * limit + b'"}'
    calls = len(gw.engine.requests)
    error = openai_error(gw.post(path, big), 413)  # refused from its Content-Length
    assert (
        error["param"] == "body"
        and error["code"] == "request_too_large"
        and "max_body_bytes" in error["message"]
    )

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused once past the limit
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    headers = {"content-type": "application/json", "authorization": f"Bearer {gw.key}"}
    r = gw.client.post(path, content=chunked(), headers=headers)
    assert openai_error(r, 413)["param"] == "body"
    assert len(gw.engine.requests) == calls  # nothing reached the engine
    # Without a key, the same body is a 401: the key is checked from the headers first.
    assert openai_error(gw.post(path, big, authorization=b""), 401)["param"] == "authorization"


def test_a_lone_surrogate_in_an_engine_answer_does_not_cost_the_batch_its_write(tmp_path: Path) -> None:
    """Valid JSON text, not Unicode: the store cannot encode it, so the writer replaces it (U+FFFD)
    rather than lose the whole batch, other requests' records with it, after its retries."""
    from datetime import UTC, datetime

    from loraflow.registry.traffic import new_request_id

    store = TrafficStore(str(tmp_path / "traffic"))
    settings = TrafficSettings(sample_rate=1.0, flush_interval_s=30)
    writer = ThreadWriter(settings, store, Redactor(key=b"k", cache_dir=tmp_path / "cache"))

    def exchange(content: str) -> Exchange:
        now = datetime.now(UTC)
        return Exchange(
            request_id=new_request_id(now),
            at=now,
            adapter="support",
            version=1,
            endpoint="/v1/completions",
            request={"prompt": "hi"},
            status=200,
            latency_s=0.01,
            response=[{"index": 0, "content": content, "finish_reason": "stop"}],
        )

    writer.start()
    for content in ("fine", json.loads('"broken \\udc80 bytes"'), "also fine"):
        assert writer.put_nowait(("requests", exchange(content).record(sampled=True))) is None
    writer.close()
    stats = writer.stats()
    assert stats.written["requests"] == 3 and stats.failed == 0
    contents = sorted(r["response"][0]["content"] for r in store.read("requests"))
    assert contents == ["also fine", "broken \ufffd bytes", "fine"]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "chat_template_kwargs"),  # a vLLM extra that changes the prompt: off
        ("/v1/chat/completions", "prompt_embeds"),
        ("/v1/completions", "tempreature"),  # a typo is not dropped silently
        ("/v1/completions", "messages"),  # a chat field sent to completions
    ],
)
def test_a_field_neither_openai_nor_the_settings_define_is_a_400_naming_it(
    gw: Gateway, path: str, field: str
) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    body = {"model": "support", **({"prompt": "hi"} if path == "/v1/completions" else chat), field: {}}
    calls = len(gw.engine.requests)
    error = openai_error(gw.post(path, json.dumps(body).encode()), 400)
    assert error["param"] == field and "unrecognized request argument" in error["message"], error
    assert len(gw.engine.requests) == calls  # nothing reached the engine


def test_every_field_of_openais_requests_and_the_allowed_extras_are_forwarded(gw: Gateway) -> None:
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    body = {
        "model": "support",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "logit_bias": {"1": 1},
        "top_k": 5,  # vLLM extras in server.engine_extra_fields' default
        "ignore_eos": False,
    }
    assert set(body) - {"top_k", "ignore_eos"} <= set(CompletionCreateParamsBase.__optional_keys__) | {
        "model",
        "messages",
    }
    assert gw.post("/v1/chat/completions", json.dumps(body).encode()).status_code == 200
    forwarded = gw.engine.requests[-1]
    assert {k: forwarded[k] for k in body if k != "model"} == {k: v for k, v in body.items() if k != "model"}
