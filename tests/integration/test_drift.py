"""`loraflow drift` on traffic records in a real sink, against a dataset prepared from the tiny model's
tokenizer with real all-MiniLM-L6-v2 embeddings: same-distribution traffic is not flagged, shifted
traffic is, and the report is stored (its page beside it), exported by a gateway and rendered."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from loraflow.registry.redact import Redactor
from loraflow.registry.service import Registry
from loraflow.registry.settings import DriftSettings, Settings
from loraflow.registry.traffic import new_request_id
from loraflow.trainer.data import normalize, validate_file
from loraflow.trainer.drift import drift_report, mmd_test
from loraflow.trainer.embed import Embedder
from loraflow.trainer.model import load_tokenizer, locate_base_model, token_counter
from loraflow.trainer.prepare import prepare
from loraflow.trainer.synthetic import make_rows, write_jsonl
from loraflow.trainer.tiny import build_tiny_model, random_lora_adapter
from tests.factories import FORCED, write_traffic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@dataclass
class World:
    registry: Registry
    settings: Settings
    count: Any
    embedder: Embedder


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def world(tmp_path: Path, embedder: Embedder) -> Iterator[World]:
    base = build_tiny_model(tmp_path / "base")
    settings = Settings(home=tmp_path / "home")
    registry = Registry.open(settings)
    count = token_counter(load_tokenizer(locate_base_model(str(base))))
    data = write_jsonl(tmp_path / "orders.jsonl", make_rows(400, seed=0))
    validation = validate_file(data, count_tokens=count, max_length=256)
    dataset, _ = prepare(validation, name="orders-data", registry=registry, embedder=embedder)
    registry.register(
        "orders",
        random_lora_adapter(base, tmp_path / "a1", r=8, seed=1),
        base_model=str(base),
        dataset=dataset.ref,
    )
    registry.promote("orders", 1, force=True, reason=FORCED)
    yield World(registry, settings, count, embedder)
    registry.close()


def _record(world: World, messages: list[dict[str, str]], answer: str, at: datetime) -> dict[str, Any]:
    """A request record as the gateway writes it: the engine counts tokens with the same template."""
    prompt_tokens = world.count(messages, add_generation_prompt=True)
    completion_tokens = world.count([*messages, {"role": "assistant", "content": answer}]) - prompt_tokens
    return {
        "request_id": new_request_id(at),
        "at": at.isoformat(),
        "adapter": "orders",
        "version": 1,
        "endpoint": "/v1/chat/completions",
        "request": {"messages": messages},
        "response": [{"index": 0, "content": answer, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "latency_s": 0.1,
        "status": 200,
        "error": None,
        "stream": False,
        "key": None,
        "sampled": True,
    }


def same_distribution(world: World, n: int) -> list[dict[str, Any]]:
    rows = make_rows(n, seed=7)  # fresh draws from the task the adapter was trained on
    out = []
    for i, row in enumerate(rows):
        messages = [m.model_dump() for m in normalize(row, i + 1).messages]
        out.append(_record(world, messages[:-1], messages[-1]["content"], NOW - timedelta(minutes=i + 1)))
    return out


def shifted(world: World, n: int) -> list[dict[str, Any]]:
    """Users now paste long support conversations and get long prose back: another population."""
    rng = random.Random(3)
    words = "please help my router keeps dropping the connection every evening since the update".split()
    out = []
    for i in range(n):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(40, 80)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(30, 60)))
        out.append(
            _record(world, [{"role": "user", "content": question}], answer, NOW - timedelta(minutes=i + 1))
        )
    return out


def _report(world: World) -> dict[str, Any]:
    _, report = drift_report(
        world.registry,
        DriftSettings(),
        "orders",
        window=timedelta(hours=24),
        now=NOW,
        embedder=world.embedder,
    )
    return report


def test_same_distribution_traffic_is_not_flagged(world: World, redactor: Redactor) -> None:
    write_traffic(world.registry.traffic, "requests", same_distribution(world, 150), redactor)
    report = _report(world)
    assert report["requests"]["answered"] == 150
    assert report["verdict"] == "ok", json.dumps(report["verdicts"]) + json.dumps(report["figures"])
    assert report["figures"]["psi_prompt_tokens"] < 0.1 and report["figures"]["psi_output_tokens"] < 0.1
    assert report["figures"]["format_valid_rate"] == 1.0 and report["verdicts"]["format_valid_rate"] == "ok"


def test_shifted_traffic_is_flagged(world: World, redactor: Redactor) -> None:
    write_traffic(world.registry.traffic, "requests", shifted(world, 150), redactor)
    report = _report(world)
    verdicts = report["verdicts"]
    assert report["verdict"] == "act"
    assert verdicts["psi_prompt_tokens"] == "act" and verdicts["psi_output_tokens"] == "act"
    assert verdicts["embedding"] == "act" and report["figures"]["embedding_mmd_p_value"] < 0.01
    assert verdicts["format_valid_rate"] == "act"  # the task's answers are JSON; these are not


def test_too_few_requests_give_no_verdict(world: World, redactor: Redactor) -> None:
    write_traffic(world.registry.traffic, "requests", shifted(world, 10), redactor)
    _, report = drift_report(world.registry, DriftSettings(), "orders", window=timedelta(hours=24), now=NOW)
    assert set(report["verdicts"].values()) == {"unknown"} and report["verdict"] == "unknown"


def test_mmd_separates_populations_and_not_identical_ones() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 8)), rng.normal(size=(80, 8))
    assert mmd_test(a, b, seed=1)[1] > 0.05
    assert mmd_test(a, b + 0.7, seed=1)[1] < 0.01


def test_the_cli_stores_the_report_renders_it_and_a_gateway_exports_it(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redactor: Redactor
) -> None:
    records = shifted(world, 60)
    for r in records:  # inside the CLI's window, which ends now
        r["at"] = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    write_traffic(world.registry.traffic, "requests", records, redactor)
    monkeypatch.setenv("LORAFLOW_HOME", str(world.settings.home))
    page = tmp_path / "drift.html"
    result = CliRunner().invoke(app, ["drift", "orders", "--window", "1h", "--json", "--html", str(page)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "act" and report["requests"]["answered"] == 60
    html = page.read_text()
    assert "<svg" in html and "Drift of orders@v1" in html and "http" not in html.split("<svg")[0]
    stored = world.registry.drift_reports()["orders@v1"]
    assert stored.report["figures"]["embedding_mmd_p_value"] == report["figures"]["embedding_mmd_p_value"]
    assert stored.page_digest is not None and world.registry.page(stored.page_digest) == html  # the same page

    from tests.fake_vllm import Setup, gateway, ready

    setup = Setup(
        registry=world.registry,
        engines=[],
        base=Path(world.registry.get("orders").base_model),
        settings=world.settings,
    )
    with gateway(setup, traffic={"sample_rate": 0}) as client:
        ready(client)
        metrics = client.get("/metrics").text
    # The gauge carries the stored report's figure, not merely its name.
    series = 'loraflow_drift_embedding_mmd_p_value{adapter="orders",version="v1"} '
    (line,) = [m for m in metrics.splitlines() if m.startswith(series)]
    assert float(line.removeprefix(series)) == pytest.approx(report["figures"]["embedding_mmd_p_value"])
