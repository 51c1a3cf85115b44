"""A registry the console's tests browse and review: one adapter in every state the console shows.

``support``: a dataset, v1 in production (with a drift report and its page), v2 evaluated against
it (report, page, examples whose answers differ) and in a shadow rollout whose pairs are in the
traffic store, and twelve sampled requests of v1 (one with an e-mail in it, redacted as stored),
two of them rated by the customer. ``other``: an adapter a key scoped to ``support`` must never
see. Keys: ``operator``, ``reviewer`` (review on support), ``reader`` (no scopes, support) and
``outsider`` (other only). Everything goes through the ``Registry`` facade and the traffic
store's redacting boundary, as production writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loraflow.registry import domain
from loraflow.registry.keys import create_key
from loraflow.registry.redact import Redactor
from loraflow.registry.refs import version_ref
from loraflow.registry.service import Registry
from loraflow.trainer.reports.eval_page import render_html
from tests.factories import served_record, write_traffic

TOPICS = [
    "password reset",
    "invoice copy",
    "refund status",
    "delivery delay",
    "account locked",
    "change address",
    "cancel order",
    "damaged item",
    "missing parts",
    "upgrade plan",
    "gift card",
    "warranty claim",
]
EMAIL = "jane.roe@example.com"
PAGE = """<!doctype html><html><head><title>{title}</title><style>h1{{color:#333}}</style></head>
<body><h1>{title}</h1><p id="marker">{marker}</p><script>document.title='pwned'</script></body></html>"""


@dataclass(frozen=True)
class World:
    registry: Registry
    keys: dict[str, str]  # name -> the key itself
    requests: list[dict[str, Any]]  # as stored (redacted)
    evaluation: domain.EvaluationInfo
    drift: domain.DriftReportInfo
    rollout: domain.RolloutInfo
    now: datetime


def request_record(
    at: datetime, topic: str, *, version: int = 1, shadow: str | None = None
) -> dict[str, Any]:
    """A served request of ``support``; with ``shadow``, the rollout candidate's answer beside it."""
    answer = f'{{"team": "billing", "topic": "{topic}"}}'
    record = served_record(
        at, adapter="support", version=version, prompt=f"Please help: {topic}.", answer=answer
    )
    if shadow is not None:
        record["sampled"] = False  # kept because it was shadowed, as the gateway keeps them
        record["shadow"] = {
            "version": 2,
            "response": [{"index": 0, "content": shadow, "finish_reason": "stop"}],
            "status": 200,
            "error": None,
            "latency_s": 0.1,
        }
    return record


def eval_report(version: int, production: int) -> dict[str, Any]:
    """A `loraflow eval` report as the eval run writes it: 8 examples, on 2 of which production
    already answers like the candidate (so a blind round has 6 pairs)."""
    texts = {
        "candidate": lambda i, topic: f'{{"team": "support", "topic": "{topic}"}}',
        "production": lambda i, topic: (
            f'{{"team": "{"billing" if i % 4 else "support"}", "topic": "{topic}"}}'
        ),
        "base": lambda i, topic: "I am not sure which team handles this.",
    }
    examples = []
    for i, topic in enumerate(TOPICS[:8]):
        reference = f'{{"team": "support", "topic": "{topic}"}}'
        outputs = {}
        for key, text_of in texts.items():
            text = text_of(i, topic)
            outputs[key] = {
                "text": text,
                "finish_reason": "stop",
                "output_tokens": 12,
                "latency_s": 0.4,
                "scores": {
                    "exact_match": float(text == reference),
                    "json_valid": float(text.startswith("{")),
                },
            }
        examples.append(
            {
                "index": i,
                "prompt": f"Route: {topic}",
                "reference": reference,
                "label": None,
                "outputs": outputs,
            }
        )

    def stats(key: str, metric: str) -> dict[str, Any]:
        values = [e["outputs"][key]["scores"][metric] for e in examples]
        mean = sum(values) / len(values)
        return {"mean": mean, "ci": [max(0.0, mean - 0.2), min(1.0, mean + 0.2)]}

    metrics = ["exact_match", "json_valid"]
    systems = {
        key: {"label": label, "model": model, "metrics": {m: stats(key, m) for m in metrics}}
        for key, label, model in (
            ("base", "prompted base (3-shot)", "base"),
            ("production", f"production support v{production}", f"support:production (v{production})"),
            ("candidate", f"candidate support v{version}", f"support v{version}"),
        )
    }

    def compare(key: str) -> dict[str, Any]:
        out = {}
        for m in metrics:
            diff = systems["candidate"]["metrics"][m]["mean"] - systems[key]["metrics"][m]["mean"]
            out[m] = {"diff": diff, "ci": [max(-1.0, diff - 0.25), min(1.0, diff + 0.25)]}
        return out

    return {
        "schema": 1,
        "candidate": version_ref("support", version),
        "adapter": "support",
        "version": version,
        "dataset": version_ref("support-data", 1),
        "split": "test",
        "split_digest": "0" * 64,
        "n": len(examples),
        "confidence": 0.95,
        "primary_metric": "exact_match",
        "metrics": metrics,
        "higher_is_better": {"exact_match": True, "json_valid": True},
        "production": {"version": production},
        "systems": systems,
        "comparisons": {"production": compare("production"), "base": compare("base")},
        "regression": None,
        "judge": None,
        "examples": examples,
        "engine": {"gateway": "supervised", "base_model": "tiny-llama", "vllm": "0.32.0"},
        "settings": {"max_new_tokens": 64},
        "created_at": datetime.now(UTC).isoformat(),
    }


def _dataset(registry: Registry, folder: Path) -> domain.DatasetVersionInfo:
    """A dataset of real split files (the flywheel reads every split of production's dataset)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, topics in (("train", TOPICS[:6]), ("val", TOPICS[6:8]), ("test", TOPICS[8:])):
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"Route this ticket: {topic} ({split})"},
                    {"role": "assistant", "content": f'{{"team": "support", "topic": "{topic}"}}'},
                ]
            }
            for topic in topics
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[split] = len(rows)
    files = ("train.jsonl", "val.jsonl", "test.jsonl")
    return registry.register_dataset(
        "support-data", folder, files, counts=counts, lineage={"kind": "file"}, profile=None
    )


def build(
    registry: Registry, redactor: Redactor, *, base: Path, adapters: tuple[Path, Path], data: Path
) -> World:
    """Populate ``registry`` (empty) with the world above."""
    now = datetime.now(UTC)
    ds = _dataset(registry, data)
    registry.register("support", adapters[0], base_model=str(base), task="route tickets", dataset=ds.ref)
    registry.register("support", adapters[1], base_model=str(base), task="route tickets", dataset=ds.ref)
    registry.register("other", adapters[0], base_model=str(base), task="someone else's")
    registry.promote("support", 1, force=True, reason="the first production")
    evaluation = registry.record_evaluation(
        "support",
        2,
        dataset=ds.ref,
        split="test",
        split_digest="0" * 64,
        production_version=1,
        report=(report := eval_report(2, 1)),
        page=render_html(report),  # the page `loraflow eval` stores
    )
    drift = registry.record_drift(
        "support",
        1,
        window_start=now - timedelta(hours=1),
        window_end=now,
        report={"figures": {}, "verdicts": {}},
        page=PAGE.format(title="drift report of support v1", marker="stored-drift-page"),
    )
    rollout = registry.start_rollout(
        "support",
        2,
        steps=[domain.RolloutStep(shadow=100), domain.RolloutStep(canary=50)],
        force=True,
        reason="test",
    )
    records = [request_record(now - timedelta(minutes=50 - i), topic) for i, topic in enumerate(TOPICS)]
    records[3]["request"]["messages"][0]["content"] = f"Please help: write to {EMAIL} about my refund."
    shadowed = [  # served while the rollout's shadow step ran
        request_record(
            rollout.started_at + timedelta(milliseconds=1 + i),
            topic,
            shadow=f'{{"team": "support", "topic": "{topic}"}}',
        )
        for i, topic in enumerate(TOPICS[:4])
    ]
    store = registry.traffic
    stored = write_traffic(store, "requests", records + shadowed, redactor)
    customer = [
        {
            "request_id": stored[i]["request_id"],
            "at": (now - timedelta(minutes=1)).isoformat(),
            "adapter": "support",
            "version": 1,
            "rating": rating,
            "correction": None,
            "comment": "thanks" if rating > 0 else "wrong team",
            "key": None,
        }
        for i, rating in ((0, 1), (1, -1))
    ]
    write_traffic(store, "feedback", customer, redactor)
    keys = {
        "operator": create_key(registry, "operator", scopes=["operator"])[0],
        "reviewer": create_key(registry, "reviewer", adapters=["support"], scopes=["review"])[0],
        "reader": create_key(registry, "reader", adapters=["support"])[0],
        "outsider": create_key(registry, "outsider", adapters=["other"], scopes=["review"])[0],
    }
    return World(
        registry=registry,
        keys=keys,
        requests=stored[: len(records)],
        evaluation=evaluation,
        drift=drift,
        rollout=rollout,
        now=now,
    )
