"""Benchmark: one engine serving many adapters, with the gateway managing what is resident.

`loraflow serve --base-model` (one supervised vLLM-CPU engine on the tiny model, as a user runs it)
with 64 random rank-8 adapters registered, each the production version of its name. Client tasks
(the official ``AsyncOpenAI``, 8 at a time, back to back) spread their requests uniformly over the
first 1, 4, 16 or 64 adapters, or send them all to the base model. Run once with
``server.max_cpu_loras`` below the larger counts (8) and once above every count (72), so the
engine either holds every adapter or the gateway evicts and loads as traffic moves.

Per cell: throughput (requests/s, mean over rounds), p50/p99 latency, the adapter loads the
phase caused and their mean time (the gateway's ``loraflow_replica_adapter_load{s,_seconds}``),
and the requests refused (429 when every resident adapter is busy). Rounds rotate the order of
the counts. The target: 64 adapters reach at least 0.8 x the throughput of 1.
Writes bench/results/multi_adapter.json and multi_adapter.png.

    .venv/bin/python bench/multi_adapter.py [--seconds 12] [--rounds 2]
    .venv/bin/python bench/multi_adapter.py --base /tmp/smollm2   # the real model (loraflow dev smollm2)
      writes multi_adapter_smollm2.json: there an adapter's matmuls are small beside the layers
      which the tiny model (hidden 128) cannot show
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import pct, save, tiny_registry  # noqa: E402

from tests.multihost.cluster import start_gateway, wait_up  # noqa: E402

COUNTS = (1, 4, 16, 64)
MAX_CPU_LORAS = (8, 72)
CONCURRENCY = 8
MAX_TOKENS = 16
TARGET = 0.8  # 64 adapters vs 1
MESSAGES = [{"role": "user", "content": "Extract the order number from: my order #104233 arrived damaged."}]


@dataclass
class Phase:
    ok: int = 0
    refused: int = 0
    failed: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    loads: float = 0.0
    load_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def replica_figures(url: str) -> tuple[float, float]:
    """Adapter loads and the seconds they took, summed over the gateway's replicas."""
    loads = seconds = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("loraflow_replica_adapter_loads{"):
            loads += float(line.rsplit(" ", 1)[1])
        elif line.startswith("loraflow_replica_adapter_load_seconds{"):
            seconds += float(line.rsplit(" ", 1)[1])
    return loads, seconds


async def phase(client: openai.AsyncOpenAI, url: str, models: list[str], seconds: float, seed: int) -> Phase:
    out = Phase(seconds=seconds)
    rng = random.Random(seed)
    loads0, load_s0 = await asyncio.to_thread(replica_figures, url)
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            sent = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model=rng.choice(models),
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=MAX_TOKENS,
                    extra_body={"ignore_eos": True},
                )
            except openai.RateLimitError:
                out.refused += 1
                continue
            except openai.APIError as exc:
                out.failed += 1
                out.failures.append(repr(exc)[:200])
                continue
            if time.monotonic() <= deadline:
                out.ok += 1
                out.latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    loads1, load_s1 = await asyncio.to_thread(replica_figures, url)
    out.loads, out.load_seconds = loads1 - loads0, load_s1 - load_s0
    return out


def summarize(phases: list[Phase]) -> dict[str, Any]:
    lat = [x for p in phases for x in p.latencies]
    loads = sum(p.loads for p in phases)
    ok = sum(p.ok for p in phases)
    return {
        "throughput_rps_per_round": [round(p.ok / p.seconds, 2) for p in phases],
        "throughput_rps": round(statistics.fmean(p.ok / p.seconds for p in phases), 2),
        "latency_ms": {"p50": round(1000 * pct(lat, 0.5), 1), "p99": round(1000 * pct(lat, 0.99), 1)},
        "requests_ok": ok,
        "requests_refused_429": sum(p.refused for p in phases),
        "requests_failed": sum(p.failed for p in phases),
        "failures": [f for p in phases for f in p.failures][:3],
        "adapter_loads": int(loads),
        "adapter_loads_per_request": round(loads / ok, 3) if ok else None,
        "adapter_load_ms_mean": round(1000 * sum(p.load_seconds for p in phases) / loads, 1)
        if loads
        else None,
    }


async def measure(url: str, names: list[str], seconds: float, rounds: int, warmup: float) -> dict[str, Any]:
    mixes: dict[str, list[str]] = {"base": ["tiny"], **{f"{n}_adapters": names[:n] for n in COUNTS}}
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120)
    try:
        await phase(client, url, names, warmup, seed=-1)  # the engine warm; the mix's loads are measured
        phases: dict[str, list[Phase]] = {m: [] for m in mixes}
        order = list(mixes)
        for r in range(rounds):
            for i, mix in enumerate(order[r % len(order) :] + order[: r % len(order)]):
                phases[mix].append(await phase(client, url, mixes[mix], seconds, seed=100 * r + i))
                p = phases[mix][-1]
                print(f"  round {r} {mix}: {p.ok / p.seconds:.1f} req/s, {p.loads:.0f} loads", flush=True)
        return {m: summarize(ps) for m, ps in phases.items()}
    finally:
        await client.close()


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for cpu_loras, cells in result["runs"].items():
        ax.plot(
            COUNTS, [cells[f"{n}_adapters"]["throughput_rps"] for n in COUNTS], marker="o", label=cpu_loras
        )
        ax.axhline(cells["base"]["throughput_rps"], linestyle=":", linewidth=0.8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(COUNTS, [str(n) for n in COUNTS])
    ax.set_xlabel("adapters the requests are spread over")
    ax.set_ylabel("requests/s")
    ax.set_title(
        f"multi-adapter throughput, vLLM-CPU, {result['model']} (dotted: base alone)\n{result['machine']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0, help="Length of one phase.")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds over the mixes, in rotated order.")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--base", type=Path, help="a model folder to serve instead of the tiny model")
    parser.add_argument("--out", type=Path, help="default results/multi_adapter[_<base folder>].json")
    args = parser.parse_args()
    model = args.base.name if args.base else "tiny model"
    suffix = f"_{args.base.name}" if args.base else ""
    out = args.out or ROOT / "bench" / "results" / f"multi_adapter{suffix}.json"

    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"a{i:02d}" for i in range(max(COUNTS))]
        base, env, _ = tiny_registry(root, names, base=args.base)
        for cpu_loras in MAX_CPU_LORAS:
            server = {"LORAFLOW_SERVER__MAX_CPU_LORAS": str(cpu_loras)}
            gw = start_gateway(base, root / f"gw-{cpu_loras}", {**env, **server})
            try:
                wait_up(gw, "/ready", 600)
                print(f"== max_cpu_loras {cpu_loras}", flush=True)
                runs[f"max_cpu_loras={cpu_loras}"] = asyncio.run(
                    measure(gw.url, names, args.seconds, args.rounds, args.warmup)
                )
            finally:
                gw.stop()

    ratios = {
        k: round(v["64_adapters"]["throughput_rps"] / v["1_adapters"]["throughput_rps"], 3)
        for k, v in runs.items()
    }
    result = {
        "what": "requests spread over 1 to 64 adapters on one engine, against the base alone",
        "model": model,
        "setup": f"`loraflow serve --base-model` (one supervised vLLM-CPU engine, {model}, max_loras 4), "
        f"64 random rank-8 adapters each promoted, {CONCURRENCY} AsyncOpenAI tasks, {MAX_TOKENS} tokens a "
        "request (ignore_eos), adapters drawn uniformly at random per request",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "phase_seconds": args.seconds,
        "rounds": args.rounds,
        "target": f"64 adapters >= {TARGET} x the throughput of 1",
        "ratio_64_to_1": ratios,
        "met": {k: r >= TARGET for k, r in ratios.items()},
        "runs": runs,
    }
    save(result, out, plot)
    print(json.dumps({k: result[k] for k in ("ratio_64_to_1", "met")}, indent=2))


if __name__ == "__main__":
    main()
