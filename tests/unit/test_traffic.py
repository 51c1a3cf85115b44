"""Traffic sampling in the gateway: the decision, the rescue buffer, feedback, the sink, and that a
slow sink never slows a request. The gateway runs over fake engines; the sink and Presidio are real."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.redact import Redactor
from loraflow.registry.settings import TrafficSettings
from loraflow.registry.traffic import (
    RedactedBatch,
    TrafficStore,
    new_request_id,
    parse_duration,
    request_date,
)
from loraflow.server.traffic.recorder import Exchange, Feedback, TrafficRecorder, sampled
from loraflow.server.traffic.writer import ThreadWriter
from tests.factories import write_traffic
from tests.fake_vllm import Setup, gateway, ready, wait
from tests.fake_vllm import gateway_setup as gateway_setup

pytestmark = pytest.mark.unit

EMAIL = "jane.roe@example.org"
CHAT = [{"role": "user", "content": f"my mail is {EMAIL}, why was I charged twice?"}]
T = TypeVar("T")


def exchange(rid: str | None = None, *, status: int = 200, adapter: str = "support") -> Exchange:
    now = datetime.now(UTC)
    return Exchange(
        request_id=rid or new_request_id(now),
        at=now,
        adapter=adapter,
        version=1,
        endpoint="/v1/chat/completions",
        request={"messages": CHAT},
        status=status,
        latency_s=0.01,
        response=[{"index": 0, "content": f"write to {EMAIL}", "finish_reason": "stop"}],
        usage={"prompt_tokens": 3, "completion_tokens": 2},
    )


# -- the sampling decision ----------------------------------------------------------


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
def test_sampling_rate_is_statistically_right(rate: float) -> None:
    n = 20_000
    hits = sum(sampled(new_request_id(datetime.now(UTC)), rate) for _ in range(n))
    sigma = math.sqrt(n * rate * (1 - rate))
    assert abs(hits - n * rate) < 4.5 * sigma, (hits, n * rate)


def test_sampling_is_a_function_of_the_request_id_so_replicas_agree() -> None:
    ids = [new_request_id(datetime.now(UTC)) for _ in range(500)]
    assert [sampled(i, 0.3) for i in ids] == [sampled(i, 0.3) for i in ids]
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)
    # a request sampled at a rate is sampled at every higher rate (raising a rate only adds)
    assert all(sampled(i, 0.5) for i in ids if sampled(i, 0.2))


def test_per_adapter_rates_and_their_validation() -> None:
    settings = TrafficSettings(sample_rate=0.1, adapters={"orders": 1.0, "quiet": 0.0})
    assert (settings.rate_for("orders"), settings.rate_for("quiet"), settings.rate_for("x")) == (
        1.0,
        0.0,
        0.1,
    )
    assert not TrafficSettings(sample_rate=0).enabled
    assert TrafficSettings(sample_rate=0, adapters={"a": 0.5}).enabled
    with pytest.raises(ValueError, match=r"traffic.adapters.orders must be between 0 and 1"):
        TrafficSettings(adapters={"orders": 1.5})


# -- the recorder ---------------------------------------------------------------------


def returns_while_blocked(call: Callable[[], T], deadline_s: float = 120) -> T:
    """``call()`` in a thread, while what it must never wait on (a sink, a writer) stays blocked for
    the whole call: a call that waited would never return. The deadline only catches that hang;
    it measures no speed (what recording costs a request is bench/traffic_logging.py's)."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    thread.join(deadline_s)
    assert not thread.is_alive(), "it waited on what is blocked"
    return out[0]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unsampled_records_wait_for_feedback_then_expire(tmp_path: Path, redactor: Redactor) -> None:
    clock = Clock()
    store = TrafficStore(str(tmp_path / "traffic"))
    settings = TrafficSettings(sample_rate=1e-9, rescue_window_s=60, error_sample_rate=1.0)
    recorder = TrafficRecorder(settings, store, ThreadWriter(settings, store, redactor), clock=clock)
    kept, expired, error = exchange(), exchange(), exchange(status=503)
    assert not recorder.offer(kept) and not recorder.offer(expired)
    assert recorder.offer(error)  # errors are sampled at their own rate, here all
    assert set(recorder.parked) == {kept.request_id, expired.request_id}

    async def rate(ex: Exchange, rating: int) -> None:
        served = await recorder.locate(ex.request_id)
        recorder.add_feedback(
            Feedback(ex.request_id, datetime.now(UTC), rating, "better", None, None), served
        )

    import asyncio

    clock.now += 30
    asyncio.run(rate(kept, -1))  # within the window: rescued with its feedback
    assert recorder.rescued == 1
    clock.now += 31
    from loraflow.registry.errors import NotFoundError

    with pytest.raises(NotFoundError) as info:
        asyncio.run(rate(expired, 1))
    assert info.value.param == "request_id"
    recorder.start()
    recorder.close()
    rows = list(store.read("requests"))
    assert {r["request_id"] for r in rows} == {kept.request_id, error.request_id}
    assert {r["request_id"]: r["sampled"] for r in rows}[kept.request_id] is False
    (fb,) = store.read("feedback")
    assert (fb["request_id"], fb["rating"], fb["adapter"], fb["version"]) == (
        kept.request_id,
        -1,
        "support",
        1,
    )


def test_a_full_queue_drops_and_counts_and_never_waits(tmp_path: Path, redactor: Redactor) -> None:
    settings = TrafficSettings(sample_rate=1.0, queue_max_records=5)
    store = TrafficStore(str(tmp_path / "t"))
    recorder = TrafficRecorder(settings, store, ThreadWriter(settings, store, redactor))  # not started
    # Nothing drains the queue: an offer that waited for room would wait forever.
    results = returns_while_blocked(lambda: [recorder.offer(exchange()) for _ in range(50)])
    assert results.count(True) == 5 and recorder.dropped["queue_full"] == 45


def test_nothing_unredacted_reaches_the_sink_and_close_writes_everything(
    tmp_path: Path, redactor: Redactor
) -> None:
    store = TrafficStore(str(tmp_path / "traffic"))
    settings = TrafficSettings(sample_rate=1.0, batch_max_records=7, flush_interval_s=30)
    recorder = TrafficRecorder(settings, store, ThreadWriter(settings, store, redactor))
    recorder.start()
    ids = []
    for _ in range(100):
        ex = exchange()
        ids.append(ex.request_id)
        recorder.offer(ex)
    recorder.close()  # long before the 30 s flush interval: close must not wait for it, nor lose any
    rows = list(store.read("requests"))
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "traffic").rglob("*.jsonl"))
    assert EMAIL.encode() not in raw and b"<EMAIL_ADDRESS_" in raw
    assert rows[0]["redacted"] == {"EMAIL_ADDRESS": 2}
    assert recorder.redacted["EMAIL_ADDRESS"] == 200 and recorder.written["requests"] == 100


def test_a_failing_sink_is_retried_then_counted(
    tmp_path: Path, redactor: Redactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TrafficStore(str(tmp_path / "t"))
    calls = []

    def broken(batch: RedactedBatch) -> list[str]:
        calls.append(len(batch.records))
        raise OSError("bucket unavailable")

    monkeypatch.setattr(store, "write", broken)
    monkeypatch.setattr("loraflow.server.traffic.writer._WRITE_RETRIES", (0.0, 0.0))
    settings = TrafficSettings(sample_rate=1.0)
    recorder = TrafficRecorder(settings, store, ThreadWriter(settings, store, redactor))
    recorder.start()
    recorder.offer(exchange())
    recorder.close()
    assert calls == [1, 1, 1] and recorder.dropped["write_failed"] == 1


# -- the sink -------------------------------------------------------------------------


def test_the_sink_partitions_reads_finds_and_purges(tmp_path: Path, redactor: Redactor) -> None:
    store = TrafficStore(str(tmp_path / "traffic"))
    old = datetime(2026, 1, 2, 23, 59, tzinfo=UTC)
    new = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
    rows = [
        {"request_id": new_request_id(at), "at": at.isoformat(), "adapter": a, "version": 1}
        for at in (old, new)
        for a in ("support", "billing")
    ]
    rows = write_traffic(store, "requests", rows, redactor)
    assert sorted((a, d.isoformat()) for a, d, _ in store.partitions()) == [
        ("billing", "2026-01-02"),
        ("billing", "2026-01-05"),
        ("support", "2026-01-02"),
        ("support", "2026-01-05"),
    ]
    assert (tmp_path / "traffic" / "adapter=support" / "date=2026-01-05").is_dir()
    assert len(list(store.read("requests", adapter="support", since=new - timedelta(hours=1)))) == 1
    assert store.find_request(rows[3]["request_id"]) == rows[3]
    assert store.find_request(new_request_id(new)) is None and store.find_request("not-ours") is None
    assert request_date(rows[0]["request_id"]) == date(2026, 1, 2)
    purged = store.purge(request_ids=[rows[3]["request_id"]])
    assert purged.records_deleted == 1 and store.find_request(rows[3]["request_id"]) is None
    purged = store.purge(before=date(2026, 1, 3))
    assert purged.records_deleted == 2
    assert [r["request_id"] for r in store.read("requests")] == [rows[2]["request_id"]]
    with pytest.raises(InvalidArgumentError):
        store.purge()
    assert store.expired_before(30, today=date(2026, 1, 31)) == date(2026, 1, 2)


def test_durations() -> None:
    assert parse_duration("7d", param="since") == timedelta(days=7)
    assert parse_duration("24h", param="window") == timedelta(hours=24)
    for bad in ("7", "0d", "1y", "-1d", ""):
        with pytest.raises(InvalidArgumentError) as info:
            parse_duration(bad, param="since")
        assert info.value.param == "since"


# -- through the gateway --------------------------------------------------------------


def _records(setup: Setup) -> list[dict[str, Any]]:
    return list(setup.registry.traffic.read("requests"))


def test_the_gateway_records_json_and_streams_returns_request_ids_and_honours_opt_out(
    gateway_setup: Setup,
) -> None:
    with gateway(gateway_setup, traffic={"sample_rate": 1.0, "flush_interval_s": 0.05}) as client:
        ready(client)
        plain = client.post("/v1/chat/completions", json={"model": "support", "messages": CHAT})
        streamed = client.post(
            "/v1/chat/completions", json={"model": "support", "messages": CHAT, "stream": True}
        )
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        opted_out = client.post(
            "/v1/chat/completions",
            json={"model": "support", "messages": CHAT},
            headers={"x-loraflow-no-log": "1"},
        )
        missing = client.post("/v1/chat/completions", json={"model": "support@v9", "messages": CHAT})
        base = client.post("/v1/chat/completions", json={"model": "tiny-base", "messages": CHAT})
        ids = [r.headers["x-request-id"] for r in (plain, streamed, opted_out, missing, base)]
        assert len(set(ids)) == 5 and all(request_date(i) for i in ids)
        wait(lambda: len(_records(gateway_setup)) >= 2, "two records")
    by_id = {r["request_id"]: r for r in _records(gateway_setup)}
    assert set(by_id) == {ids[0], ids[1]}  # not opted out, nor the unknown version, nor the base
    json_rec, stream_rec = by_id[ids[0]], by_id[ids[1]]
    engine = gateway_setup.engines[0].url
    assert json_rec["response"] == [{"index": 0, "content": f"from {engine}", "finish_reason": "stop"}]
    assert stream_rec["response"][0]["content"] == "".join(f"from {engine}".split(" "))
    assert stream_rec["stream"] is True and stream_rec["usage"]["completion_tokens"] == 2
    assert json_rec["version"] == 1 and json_rec["adapter"] == "support" and json_rec["status"] == 200
    assert EMAIL not in json.dumps(json_rec) and "<EMAIL_ADDRESS_" in json.dumps(json_rec["request"])


def test_feedback_joins_rescues_404s_and_names_bad_fields(gateway_setup: Setup) -> None:
    traffic = {"sample_rate": 1e-9, "flush_interval_s": 0.05}
    with gateway(gateway_setup, traffic=traffic) as client:
        ready(client)
        r = client.post("/v1/chat/completions", json={"model": "support", "messages": CHAT})
        rid = r.headers["x-request-id"]
        bad = client.post("/v1/feedback", json={"request_id": rid, "rating": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
        extra = client.post("/v1/feedback", json={"request_id": rid, "rating": 1, "score": 1})
        assert extra.status_code == 400 and extra.json()["error"]["param"] == "score"
        unknown = client.post(
            "/v1/feedback", json={"request_id": new_request_id(datetime.now(UTC)), "rating": 1}
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
        ok = client.post(
            "/v1/feedback", json={"request_id": rid, "rating": -1, "correction": f"mail {EMAIL} back"}
        )
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"object": "feedback", "request_id": rid, "model": "support@v1", "rating": -1}
        wait(lambda: len(list(gateway_setup.registry.traffic.read("feedback"))) == 1, "the feedback")
        metrics = client.get("/metrics").text
    assert "loraflow_traffic_records_rescued_total 1.0" in metrics
    assert 'loraflow_drift_negative_feedback_rate{adapter="support",version="v1"} 1.0' in metrics
    (record,) = _records(gateway_setup)
    assert record["request_id"] == rid and record["sampled"] is False
    (fb,) = gateway_setup.registry.traffic.read("feedback")
    assert EMAIL not in fb["correction"] and fb["correction"].startswith("mail <EMAIL_ADDRESS_")


def test_feedback_needs_a_key_that_may_use_the_adapter(gateway_setup: Setup) -> None:
    from loraflow.registry.keys import create_key

    support_key, _ = create_key(gateway_setup.registry, "support-app", ["support"])
    billing_key, _ = create_key(gateway_setup.registry, "billing-app", ["billing"])
    with gateway(gateway_setup, auth=True, traffic={"sample_rate": 1.0}) as client:
        ready(client)
        wait(lambda: client.get("/ready").status_code == 200, "keys")
        r = client.post(
            "/v1/chat/completions",
            json={"model": "support", "messages": CHAT},
            headers={"authorization": f"Bearer {support_key}"},
        )
        rid = r.headers["x-request-id"]
        body = {"request_id": rid, "rating": 1}
        assert client.post("/v1/feedback", json=body).status_code == 401
        denied = client.post("/v1/feedback", json=body, headers={"authorization": f"Bearer {billing_key}"})
        assert denied.status_code == 404  # to a key that may not use support, the request does not exist
        ok = client.post("/v1/feedback", json=body, headers={"authorization": f"Bearer {support_key}"})
        assert ok.status_code == 200
    (record,) = _records(gateway_setup)
    assert record["key"] == "support-app" and support_key not in json.dumps(record)


class SlowStore(TrafficStore):
    """A sink that blocks every write until released: the worst object store there is."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, batch: RedactedBatch) -> list[str]:
        self.entered.set()
        self.release.wait()
        return super().write(batch)


def _chat_statuses(client: Any, n: int) -> list[int]:
    return [
        client.post("/v1/chat/completions", json={"model": "support", "messages": CHAT}).status_code
        for _ in range(n)
    ]


def test_a_blocked_sink_does_not_slow_requests(gateway_setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowStore(str(gateway_setup.settings.resolved_traffic_uri))
    monkeypatch.setattr(type(gateway_setup.registry), "traffic", property(lambda self: slow))
    traffic = {"sample_rate": 1.0, "queue_max_records": 50, "batch_max_records": 10, "flush_interval_s": 0.01}
    with gateway(gateway_setup, traffic=traffic) as client:
        ready(client)
        try:
            assert _chat_statuses(client, 1) == [200]
            assert slow.entered.wait(60), "the writer never took a batch to the sink"
            # The sink holds the writer's first batch for as long as these requests take: a
            # request that waited on it would never be answered.
            statuses = returns_while_blocked(lambda: _chat_statuses(client, 150))
            assert not slow.release.is_set()
        finally:
            slow.release.set()
        assert statuses == [200] * 150
        recorder = client.app.state.gateway.recorder  # type: ignore[attr-defined]
        assert recorder.dropped["queue_full"] > 0  # the sink never took a batch: the queue filled


def test_a_traffic_store_on_an_unknown_scheme_names_the_setting() -> None:
    with pytest.raises(InvalidArgumentError) as info:  # was fsspec's bare ValueError
        TrafficStore("foo://bucket/traffic")
    assert info.value.param == "artifact_uri" and "foo://bucket/traffic" in info.value.message


def test_the_store_writes_only_what_its_redactor_returned(tmp_path: Path, redactor: Redactor) -> None:
    store = TrafficStore(str(tmp_path / "traffic"))
    now = datetime.now(UTC)
    record = {
        "request_id": new_request_id(now),
        "at": now.isoformat(),
        "adapter": "support",
        "version": 1,
        "request": {"messages": CHAT},
        "response": [{"content": f"I wrote to {EMAIL}"}],
    }
    with pytest.raises(TypeError):  # no way around the boundary: a batch is made by redact()
        store.write(RedactedBatch(kind="requests", records=(record,), found=Counter(), dropped=0))

    class Choking:
        def redact_value(self, value: object) -> tuple[object, Counter[str]]:
            if "charged twice" in json.dumps(value):
                raise RuntimeError("the analyzer choked")
            return redactor.redact_value(value)

    other = record | {"request_id": new_request_id(now), "request": {"messages": []}}
    batch = store.redact("requests", [record, other], Choking())
    assert batch.dropped == 1 and [r["request_id"] for r in batch.records] == [other["request_id"]]
    store.write(batch)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "traffic").rglob("*.jsonl"))
    assert EMAIL.encode() not in raw and b"charged twice" not in raw
    (stored,) = store.read("requests")
    assert stored["redacted"] == {"EMAIL_ADDRESS": 1} and batch.found == Counter({"EMAIL_ADDRESS": 1})


def test_a_torn_file_is_read_around_and_each_bad_line_is_named(tmp_path: Path, redactor: Redactor) -> None:
    store = TrafficStore(str(tmp_path / "traffic"))
    now = datetime.now(UTC)
    rows = [
        {"request_id": new_request_id(now), "at": now.isoformat(), "adapter": "support", "version": 1}
        for _ in range(3)
    ]
    (path,) = store.write(store.redact("requests", rows, redactor))
    good = Path(path).read_bytes()
    torn = good + b'{"request_id": "req-2026' + b"\n\xff\xfe not utf-8\n[1, 2]\n" + b'{"no": "time"}\n'
    Path(path).write_bytes(torn)
    assert [r["request_id"] for r in store.read("requests")] == [r["request_id"] for r in rows]
    assert [(c.path, c.line) for c in store.corrupt] == [(path, 4), (path, 5), (path, 6), (path, 7)]
    assert "not a JSON object" in store.corrupt[2].reason and "KeyError" in store.corrupt[3].reason
    assert store.find_request(rows[1]["request_id"]) is not None  # find_request reads around them too


def test_the_local_sink_syncs_each_file_before_it_is_visible(
    tmp_path: Path, redactor: Redactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    store = TrafficStore(str(tmp_path / "traffic"))
    now = datetime.now(UTC)
    row = {"request_id": new_request_id(now), "at": now.isoformat(), "adapter": "support", "version": 1}
    store.write(store.redact("requests", [row], redactor))
    assert len(synced) == 2  # the file, then its folder (the rename)


def test_what_the_audit_found_on_disk_no_longer_reaches_it(tmp_path: Path, redactor: Redactor) -> None:
    """Through the recorder and the writer at 100% sampling, the audit found a name, a street
    address, an SSN, a password and a date of birth in the traffic JSONL, and an e-mail address
    that was a key of a tools schema. None of them may reach the disk now."""
    leaked = {
        "name": "Jane Doe",
        "address": "1600 Pennsylvania Avenue",
        "ssn": "536-22-8726",
        "password": "hunter2",
        "dob": "12 April 1985",
        "key": "jane.doe@example.com",
    }
    text = (
        f"My name is {leaked['name']}, I live at {leaked['address']} NW. My social is {leaked['ssn']}, "
        f"password: {leaked['password']}, born on {leaked['dob']}."
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {leaked["key"]: {"type": "string"}}},
            },
        }
    ]
    store = TrafficStore(str(tmp_path / "traffic"))
    settings = TrafficSettings(sample_rate=1.0)
    recorder = TrafficRecorder(settings, store, ThreadWriter(settings, store, redactor))
    recorder.start()
    ex = exchange()
    ex.request = {"messages": [{"role": "user", "content": text}], "tools": tools}
    ex.response = [{"index": 0, "content": f"Noted, {leaked['name']}.", "finish_reason": "stop"}]
    recorder.offer(ex)
    recorder.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "traffic").rglob("*.jsonl"))
    assert raw and not [k for k, v in leaked.items() if v.encode() in raw], raw.decode()
    (record,) = store.read("requests")
    assert set(record["redacted"]) >= {
        "PERSON",
        "STREET_ADDRESS",
        "US_SSN",
        "SECRET",
        "DATE_OF_BIRTH",
        "EMAIL_ADDRESS",
    }


def test_a_record_too_large_is_not_queued_and_errors_are_sampled_at_their_rate(
    tmp_path: Path, redactor: Redactor
) -> None:
    store = TrafficStore(str(tmp_path / "traffic"))
    settings = TrafficSettings(
        sample_rate=1.0, record_max_bytes=4096, error_sample_rate=0.1, rescue_window_s=0
    )
    recorder = TrafficRecorder(settings, store, ThreadWriter(settings, store, redactor))  # not started
    big = exchange()
    big.size_bytes = 4097  # 193 KiB of digits once cost the writer 14.5 s: refused before the queue
    assert not recorder.offer(big) and recorder.dropped["too_large"] == 1
    errors = [exchange(status=400) for _ in range(2000)]
    kept = sum(recorder.offer(e) for e in errors)
    assert 120 <= kept <= 280, kept  # 10% of 2000, within 4.5 sigma
    assert recorder.backlog == kept


def test_the_queue_is_bounded_in_bytes_and_frees_what_the_writer_finished(
    tmp_path: Path, redactor: Redactor
) -> None:
    store = TrafficStore(str(tmp_path / "traffic"))
    settings = TrafficSettings(
        sample_rate=1.0, queue_max_bytes=10 * 1024, record_max_bytes=4096, flush_interval_s=0.05
    )
    writer = ThreadWriter(settings, store, redactor)
    recorder = TrafficRecorder(settings, store, writer)
    records = [exchange() for _ in range(5)]
    for r in records:
        r.size_bytes = 3000
    assert [recorder.offer(r) for r in records] == [True, True, True, False, False]  # 9000 + 3000 > 10 KiB
    assert recorder.dropped["queue_full"] == 2 and recorder.queued_bytes == 9000
    writer.start()
    try:
        wait(lambda: recorder.queued_bytes == 0, "the writer to finish the batch")
        assert recorder.offer(records[3])  # room again
    finally:
        recorder.close()


def test_losses_are_recorded_and_read_back_by_window(tmp_path: Path) -> None:
    store = TrafficStore(str(tmp_path / "traffic"))
    t0 = datetime(2026, 12, 2, 10, tzinfo=UTC)
    store.record_loss(records=7, at=t0, reason="gateway died")
    store.record_loss(records=3, at=t0 + timedelta(days=1), reason="gateway died")
    assert [loss["records"] for loss in store.losses()] == [7, 3]
    assert [loss["records"] for loss in store.losses(since=t0 + timedelta(hours=1))] == [3]
    assert list(store.read("requests")) == []  # a loss is no record


def test_what_the_writer_cannot_write_before_the_close_timeout_is_recorded_as_lost(
    tmp_path: Path, redactor: Redactor
) -> None:
    slow = SlowStore(str(tmp_path / "traffic"))
    settings = TrafficSettings(
        sample_rate=1.0, batch_max_records=2, flush_interval_s=0.01, close_timeout_s=0.5
    )
    recorder = TrafficRecorder(settings, slow, ThreadWriter(settings, slow, redactor))
    recorder.start()
    try:
        assert all(recorder.offer(exchange()) for _ in range(6))
        assert slow.entered.wait(30)  # the writer holds its first batch in the sink
        recorder.close()  # gives up after close_timeout_s
        left = recorder.backlog
        assert left == 6 and [loss["records"] for loss in slow.losses()] == [left]
    finally:
        slow.release.set()
