"""Rendering the chart with Helm's own engine (the helm-python-sdk wheel bundles Helm's Go SDK)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "loraflow"
PRODUCTION_VALUES = CHART / "values-production.yaml"
RELEASE, NAMESPACE = "rel", "ml"

# What the chart cannot default: the base model, the artifact store, and where the secrets are.
REQUIRED: dict[str, Any] = {
    "baseModel": "meta-llama/Llama-3.1-8B-Instruct",
    "artifacts": {"uri": "s3://bucket/loraflow"},
    "existingSecret": "loraflow",
}


def production() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
    return values


@functools.cache
def _chart() -> helm.Chart:
    """Loaded once per session: every render reads the same files (and holds one native handle)."""
    return helm.Chart.load(CHART)


def render(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` would render them (hooks included)."""
    out: dict[str, str] = _chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return out


def manifests(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for ``values``."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod: dict[str, Any] = spec["template"]["spec"]
    return pod


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}
