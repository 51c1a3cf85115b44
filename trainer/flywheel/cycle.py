"""`loraflow flywheel run`: the next dataset, then a gated candidate, then its promotion.

:func:`run` builds the dataset (:func:`~loraflow.trainer.flywheel.dataset.build_dataset`),
trains a candidate (skipped when a version trained on that dataset exists), evaluates it
against production and the prompted base (skipped when that evaluation exists), and
promotes it: to production when ``flywheel.auto_promote`` allows and the gate passes (with
``expect`` = the production version it was evaluated against), else to staging. A failure
at any step leaves production as it was.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from loraflow.registry import domain
from loraflow.registry.errors import GateRefusedError, NotFoundError
from loraflow.registry.refs import DEFAULT_ALIAS, version_ref
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.trainer.flywheel.dataset import build_dataset

if TYPE_CHECKING:
    from loraflow.trainer.eval.run import OpenEndpoint

STAGING = "staging"


@dataclass
class Cycle:
    """What one ``flywheel run`` did, step by step."""

    adapter: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    candidate: domain.VersionInfo | None = None
    promoted_to: str | None = None

    def step(self, name: str, status: str, **detail: Any) -> None:
        self.steps.append({"step": name, "status": status, **detail})

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "candidate": self.candidate.ref if self.candidate else None,
            "promoted_to": self.promoted_to,
            "steps": self.steps,
        }


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def run(
    registry: Registry,
    settings: Settings,
    name: str,
    *,
    endpoint: OpenEndpoint,
    since: timedelta,
    until: datetime | None = None,
    embedder: Any = None,
    bar: Callable[[str], AbstractContextManager[Callable[[int, int], None] | None]] | None = None,
) -> Cycle:
    """Build the dataset, train, evaluate (through the gateway ``endpoint`` opens, only when the
    candidate needs it), register and promote a candidate of adapter ``name``.
    ``bar(description)``, if given, opens a progress bar around training and around evaluation;
    what it yields is told (done, total) as the step goes."""
    bar = bar or (lambda _: nullcontext())
    from loraflow.trainer.config import TrainConfig
    from loraflow.trainer.eval.run import evaluate
    from loraflow.trainer.train import train

    cycle = Cycle(adapter=name)
    adapter = registry.get(name)
    production = adapter.aliases.get(DEFAULT_ALIAS)

    built = build_dataset(registry, settings, name, since=since, until=until, embedder=embedder)
    cycle.step(
        "dataset",
        "registered" if built.created else "found by digest",
        dataset=built.dataset.ref,
        counts=built.dataset.counts,
        traffic=built.report["counts"],
    )

    # 2. The candidate: the version already trained on this dataset, else a new one.
    trained = [v for v in registry.get(name).versions if v.dataset == built.dataset.ref]
    if trained:
        candidate = trained[-1]
        cycle.step("train", "skipped: already trained on this dataset", version=candidate.ref)
    else:
        source = next((v for v in adapter.versions if v.version == production), None) or max(
            adapter.versions, key=lambda v: v.version
        )
        recorded = dict(source.training_config or {})
        if not recorded:
            raise NotFoundError(
                f"{source.ref} records no training config to train the candidate with", param="NAME"
            )
        recorded = {k: v for k, v in recorded.items() if k in TrainConfig.model_fields}
        recorded.pop("output_dir", None)
        start = (
            version_ref(name, production) if settings.flywheel.warm_start and production is not None else None
        )
        config = TrainConfig.model_validate(
            recorded | settings.flywheel.train | {"data": built.dataset.ref, "init_from": start}
        )
        with bar(f"train on {built.dataset.ref}") as report:
            result = train(config, registry=registry, settings=settings, progress=report)
        candidate = result.version
        cycle.step(
            "train", "trained", version=candidate.ref, config=_config_hash(config.model_dump(mode="json"))
        )
    cycle.candidate = candidate
    if production == candidate.version:
        cycle.step("evaluate", f"skipped: {candidate.ref} is production already")
        cycle.step("promote", f"skipped: {candidate.ref} is production already")
        cycle.promoted_to = DEFAULT_ALIAS
        return cycle

    # 3. Evaluate against production and the prompted base, on the new dataset's sealed test split.
    done = [
        e
        for e in registry.evaluations(name, candidate.version)
        if e.dataset == built.dataset.ref and e.production_version == production
    ]
    if done:
        cycle.step("evaluate", "skipped: already evaluated against this production", evaluation=done[-1].id)
    else:
        with bar(f"evaluate {candidate.ref}") as report:
            evaluation = evaluate(
                candidate.ref,
                registry=registry,
                settings=settings,
                endpoint=endpoint,
                dataset=built.dataset.ref,
                split="test",
                progress=report,
            )
        cycle.step("evaluate", "evaluated", evaluation=evaluation.evaluation.id)

    # 4-5. Registered already by training; promote.
    decision = registry.gate(name, candidate.version)
    cycle.step("gate", "passed" if decision.passed else "refused", gate=decision.to_json())
    target = DEFAULT_ALIAS if settings.flywheel.auto_promotes(name) and decision.passed else STAGING
    current = registry.get(name).aliases.get(target)
    if current == candidate.version:
        cycle.step("promote", f"skipped: {target} is already {candidate.ref}")
    else:
        try:
            registry.promote(
                name, candidate.version, alias=target, expect=production if target == DEFAULT_ALIAS else None
            )
        except GateRefusedError as exc:  # staging may be a gated alias too
            cycle.step("promote", "refused", alias=target, reason=exc.message)
            return cycle
        cycle.step("promote", "promoted", alias=target, version=candidate.ref, previous=current)
    cycle.promoted_to = target
    return cycle
