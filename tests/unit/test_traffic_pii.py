"""PII through the gateway, checked where it matters: the bytes on disk.

One gateway runs as ``loraflow serve`` runs it, with the *process* traffic writer (the
default), over a fake engine that answers with PII: an e-mail address, a phone number, a
card number, an IBAN, an IP address and an API token, in JSON answers, in streamed ones
(chat and completions), split across two stream events and across two transport chunks; in
the request; and in feedback comments and corrections. Each case uses its own values, so a
leak names the path it came through. After the gateway has shut down (its writer has written
everything queued), every file under its home (the traffic store, the registry) is read as
bytes and searched for each raw value, in each spelling the redactor normalizes.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings, Settings, TrafficSettings
from loraflow.registry.traffic import TrafficStore
from loraflow.server.app import create_app
from loraflow.server.engine.vllm_http import VLLMHttpEngine
from tests.factories import FORCED, make_adapter, make_base, no_loraflow_env
from tests.fake_vllm import BASE_ID, FakeVLLM, wait

pytestmark = pytest.mark.unit

CLASSES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "SECRET")

# Values of each class that Presidio's validators accept (Luhn, mod-97, phonenumbers): one row per case.
VALUES: tuple[tuple[str, ...], ...] = (
    ("ann.json@example.com", "bo.stream@example.com", "cy.text@example.com", "di.req@example.com",
     "ed.fb@example.com", "fi.fix@example.com"),
    ("+1 415 555 2671", "+44 20 7946 0958", "(212) 555-0134", "+49 30 901820", "+1 646 555 0199",
     "+1 312 555 0147"),
    ("4111 1111 1111 1111", "5555 5555 5555 4444", "4012 8888 8888 1881", "3782 822463 10005",
     "6011 1111 1111 1117", "5105 1051 0510 5100"),
    ("GB82 WEST 1234 5698 7654 32", "DE89 3704 0044 0532 0130 00", "FR14 2004 1010 0505 0001 3M02 606",
     "NL91 ABNA 0417 1643 00", "ES91 2100 0418 4502 0005 1332", "BE68 5390 0754 7034"),
    ("203.0.113.42", "198.51.100.7", "192.0.2.15", "10.20.30.40", "172.16.5.4", "198.51.100.201"),
    ("sk-proj-4f9Qm2ZxL8vT1kR7pW3nY6bC", "ghp_" + "a1B2c3D4e5" * 4, "AKIAIOSFODNN7EXAMPL3",
     "xoxb-1234567890-abcdefghij", "sk-proj-9z8Y7x6W5v4U3t2S1r0Q", "ghp_" + "Z9y8X7w6V5" * 4),
)  # fmt: skip


def pii(case: int) -> dict[str, str]:
    """The values of every class for the ``case``-th case."""
    return {entity: values[case] for entity, values in zip(CLASSES, VALUES, strict=True)}


def sentence(values: dict[str, str]) -> str:
    return (
        f"Write to {values['EMAIL_ADDRESS']} or call {values['PHONE_NUMBER']}. The card "
        f"{values['CREDIT_CARD']} and the IBAN {values['IBAN_CODE']} are on file; the login "
        f"came from {values['IP_ADDRESS']} with the token {values['SECRET']} ."
    )


def spellings(entity: str, value: str) -> set[str]:
    """The raw value and the forms the redactor normalizes it to (none may reach the disk)."""
    forms = {value, value.lower(), value.upper()}
    if entity in ("PHONE_NUMBER", "CREDIT_CARD"):
        forms.add(re.sub(r"\D", "", value))
    if entity == "IBAN_CODE":
        forms.add(value.replace(" ", ""))
    return forms


@dataclass
class Case:
    """One path PII can take into the store; ``values`` must never reach the disk."""

    name: str
    values: dict[str, str]
    request_id: str = ""
    answer: str = ""  # what the client got back


@dataclass
class ScriptedVLLM(FakeVLLM):
    """The fake engine, answering each case (named by ``case=NAME`` in the request) with its own
    text, streamed as the given pieces; ``split`` cuts an SSE event's bytes where a marker starts,
    so one event arrives as two transport chunks (the first marker found in it)."""

    replies: dict[str, list[str]] = field(default_factory=dict)
    split: dict[str, list[str]] = field(default_factory=dict)

    @staticmethod
    def case(body: dict[str, Any]) -> str:
        found = re.search(r"case=(\w+)", json.dumps(body))
        assert found, body
        return found.group(1)

    def _complete(self, request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if not body.get("stream"):
            return super()._complete(request, body)  # ``answer`` gives the text
        self.requests.append(body)
        name = self.case(body)
        completions = request.url.path == "/v1/completions"
        events = [
            {
                "id": "c",
                "object": "text_completion" if completions else "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {"index": 0, "text": piece, "finish_reason": None}
                    if completions
                    else {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                ],
            }
            for piece in self.replies[name]
        ]
        events.append(
            {"id": "c", "object": "x", "created": 1, "model": body["model"], "choices": [], "usage": USAGE}
        )
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=self._chunks(events, self.split.get(name)),
        )

    @staticmethod
    async def _chunks(events: list[dict[str, Any]], markers: list[str] | None) -> AsyncIterator[bytes]:
        for event in events:
            data = b"data: " + json.dumps(event).encode() + b"\n\n"
            at = next((i for m in markers or [] if (i := data.find(m.encode())) > 0), -1)
            if at > 0:
                yield data[:at]
                yield data[at:]
            else:
                yield data
        yield b"data: [DONE]\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@dataclass
class Served:
    home: Path
    store: TrafficStore
    cases: dict[str, Case]
    stats: dict[str, Any]

    def record(self, kind: str, case: str) -> dict[str, Any]:
        (found,) = [r for r in self.store.read(kind) if r["request_id"] == self.cases[case].request_id]  # type: ignore[arg-type]
        return found


def _chat(case: str, content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "support", "messages": [{"role": "user", "content": f"case={case} {content}"}], **extra}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Every case through one gateway with the process writer, then the gateway shut down."""
    root = tmp_path_factory.mktemp("pii")
    with no_loraflow_env():  # the autouse isolated_env is per test; this is per module
        base = make_base(root / "base")
        settings = Settings(
            home=root / "home",
            server=ServerSettings(poll_interval_s=0.05),
            traffic=TrafficSettings(sample_rate=1.0, flush_interval_s=0.05, writer="process"),
        )
    registry = Registry.open(settings)
    registry.register("support", make_adapter(root / "a1", seed=1), base_model=str(base))
    registry.promote("support", 1, force=True, reason=FORCED)

    names = ("json", "stream", "text", "request", "comment", "correction")
    cases = {name: Case(name, pii(i)) for i, name in enumerate(names)}
    split_email = "jane.doe@example.com"
    split_phone = "+1 202 555 0173"
    stream_text = sentence(cases["stream"].values)
    text_text = sentence(cases["text"].values)
    engine = ScriptedVLLM(
        "http://replica-0",
        str(base),
        answer=lambda body: sentence(cases[ScriptedVLLM.case(body)].values),
        replies={
            # word by word: every value arrives in pieces, and the e-mail address across two events
            "stream": [w + " " for w in stream_text.split(" ")] + ["Also jane.doe@exa", "mple.com ."],
            # whole: each event is split in two transport chunks inside a value
            "text": [text_text, f"Phone {split_phone} now."],
        },
        split={"text": [cases["text"].values["EMAIL_ADDRESS"][3:], split_phone[5:]]},
    )
    cases["stream"].values["split e-mail"] = split_email
    cases["text"].values["split phone"] = split_phone
    app = create_app(
        settings,
        registry=registry,
        engines=[VLLMHttpEngine(engine.url, transport=engine.transport())],
        base_model=str(base),
        base_model_id=BASE_ID,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        wait(lambda: client.get("/ready").status_code == 200, "/ready")

        def post(path: str, body: dict[str, Any], case: str) -> Any:  # a TestClient response
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            cases[case].request_id = r.headers["x-request-id"]
            return r

        r = post("/v1/chat/completions", _chat("json"), "json")
        cases["json"].answer = r.json()["choices"][0]["message"]["content"]
        r = post("/v1/chat/completions", _chat("stream", stream=True), "stream")
        cases["stream"].answer = "".join(_pieces(r.text, "delta"))
        r = post("/v1/completions", {"model": "support", "prompt": "case=text go", "stream": True}, "text")
        cases["text"].answer = "".join(_pieces(r.text, "text"))
        asked = cases["request"].values
        post(
            "/v1/completions",
            {
                "model": "support",
                "prompt": [f"case=request {sentence(asked)}", f"again {asked['EMAIL_ADDRESS']}"],
                "stop": [asked["IP_ADDRESS"]],
            },
            "request",
        )
        for case in ("comment", "correction"):
            post("/v1/chat/completions", _chat(case), case)  # its answer is the case's PII, too
            rated = client.post(
                "/v1/feedback",
                json={"request_id": cases[case].request_id, "rating": -1, case: sentence(cases[case].values)},
            )
            assert rated.status_code == 200, rated.text
    # The lifespan's shutdown closed the writer process: everything queued is on disk now.
    stats = {
        "written": dict(app.state.gateway.recorder.stats().written),
        "redacted": dict(app.state.gateway.recorder.stats().redacted),
        "dropped": dict(app.state.gateway.recorder.dropped),
    }
    yield Served(home=root / "home", store=registry.traffic, cases=cases, stats=stats)
    registry.close()


def _pieces(sse: str, key: str) -> Iterator[str]:
    for line in sse.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                piece = choice.get("delta", {}).get("content") if key == "delta" else choice.get("text")
                yield piece or ""


def _on_disk(home: Path) -> dict[Path, bytes]:
    files = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    assert any(p.suffix == ".jsonl" for p in files), "the traffic store wrote nothing"
    return files


def _leaks(served: Served, case: str) -> list[str]:
    files = _on_disk(served.home)
    return [
        f"{entity} {form!r} in {path.relative_to(served.home)}"
        for entity, value in served.cases[case].values.items()
        for form in spellings(entity, value)
        for path, data in files.items()
        if form.encode() in data
    ]


def _placeholders(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"<([A-Z_]+)_[0-9a-f]{12}>", text)}


def test_the_writer_wrote_every_record_and_dropped_none(served: Served) -> None:
    assert served.stats["written"] == {"requests": 6, "feedback": 2}
    assert not any(served.stats["dropped"].values()), served.stats["dropped"]
    assert all(served.stats["redacted"].get(c, 0) >= 6 for c in CLASSES), served.stats["redacted"]


def test_pii_in_a_json_answer_never_reaches_the_disk(served: Served) -> None:
    assert _leaks(served, "json") == []
    case = served.cases["json"]
    assert case.answer == sentence(case.values)  # the client gets its answer as the engine gave it
    record = served.record("requests", "json")
    assert _placeholders(json.dumps(record["response"])) == set(CLASSES)


def test_pii_in_a_streamed_answer_and_an_email_split_across_two_events_never_reach_the_disk(
    served: Served,
) -> None:
    assert _leaks(served, "stream") == []
    case = served.cases["stream"]
    assert "jane.doe@exa" in case.answer and case.answer.endswith("Also jane.doe@example.com .")
    record = served.record("requests", "stream")
    content = record["response"][0]["content"]
    assert record["stream"] is True and _placeholders(content) == set(CLASSES)
    assert re.search(r"Also <EMAIL_ADDRESS_[0-9a-f]{12}> \.$", content), content


def test_pii_split_across_transport_chunks_of_a_completions_stream_never_reaches_the_disk(
    served: Served,
) -> None:
    assert _leaks(served, "text") == []
    case = served.cases["text"]
    assert case.answer == sentence(case.values) + f"Phone {case.values['split phone']} now."
    content = served.record("requests", "text")["response"][0]["content"]
    assert _placeholders(content) == set(CLASSES) and content.count("<PHONE_NUMBER_") == 2


def test_pii_in_the_request_never_reaches_the_disk(served: Served) -> None:
    assert _leaks(served, "request") == []
    record = served.record("requests", "request")
    assert _placeholders(json.dumps(record["request"]["prompt"])) == set(CLASSES)
    assert _placeholders(json.dumps(record["request"]["stop"])) == {"IP_ADDRESS"}


@pytest.mark.parametrize("case", ["comment", "correction"])
def test_pii_in_feedback_never_reaches_the_disk(served: Served, case: str) -> None:
    assert _leaks(served, case) == []
    feedback = served.record("feedback", case)
    assert feedback["rating"] == -1 and _placeholders(feedback[case]) == set(CLASSES)
    assert feedback["redacted"] == dict.fromkeys(CLASSES, 1)
    assert _placeholders(json.dumps(served.record("requests", case)["response"])) == set(CLASSES)
