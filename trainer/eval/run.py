"""`loraflow eval NAME@vN`: the candidate against the prompted base and production, on a sealed split.

1. The split must be held out: eval refuses the train or val split of the dataset
   the version was trained on, and any split sharing an example with that
   dataset's train/val splits (its lineage), after normalization.
2. Three systems answer the same examples through a loraflow gateway, the code
   path users are served by (the caller opens it: :mod:`loraflow.cli.endpoint` gives
   the configured one, or starts one like ``loraflow serve``): (a) the base with
   the best prompt (a system prompt plus ``eval.few_shot`` examples drawn from
   the *training* split), (b) production, if there is one, (c) the candidate.
   Adapters get the system prompt they were trained with.
3. :mod:`loraflow.trainer.eval.scoring` scores them; every comparison carries a paired
   bootstrap interval. The built-in regression suite, optional lm-eval tasks
   (:mod:`loraflow.trainer.eval.lm_eval_suite`) and an optional judge run too.
4. The report is stored on the version (with the dataset version, the split's
   digest, the engine and the settings) for the promotion gate to read, and its HTML
   page (:mod:`loraflow.trainer.reports.eval_page`, rendered from the same report)
   beside it in the artifact store, for the console. The stored page has no gate
   section: the gate's verdict is about now (production moves, the report goes stale),
   so ``--html`` adds the verdict of the moment to the page it writes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraflow.registry import domain
from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.refs import DEFAULT_ALIAS, parse_ref
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.trainer.data import BadLine, Example, normalize
from loraflow.trainer.eval.client import GatewayClient
from loraflow.trainer.eval.judge import Judge, JudgeItem
from loraflow.trainer.eval.lm_eval_suite import LmEvalSuites
from loraflow.trainer.eval.regression_suite import SUITE_METRIC, SUITE_NAME, load_suite, suite_entry
from loraflow.trainer.eval.scoring import (
    HIGHER_IS_BETTER,
    Bootstrap,
    Generation,
    Reference,
    ScoredSystem,
    Task,
)
from loraflow.trainer.prepare import SPLITS, fingerprint, load_split, split_rows
from loraflow.trainer.reports.eval_page import render_html
from loraflow.trainer.reports.render import require_page_libraries

REPORT_SCHEMA = 1
DEFAULT_BASE_SYSTEM_PROMPT = "Answer exactly in the format the examples show."


@dataclass(frozen=True)
class EvalResult:
    report: dict[str, Any]
    evaluation: domain.EvaluationInfo


@dataclass(frozen=True)
class _System:
    key: str  # "base", "production" or "candidate"
    label: str
    model: str  # what requests name: the base's id, or NAME@vN
    prompts: list[list[dict[str, str]]]


def _examples(rows: list[dict[str, Any]], where: str) -> list[Example]:
    out = []
    for line, row in enumerate(rows, start=1):
        try:
            out.append(normalize(row, line))
        except BadLine as bad:
            raise InvalidArgumentError(f"{where} line {line}: {bad.reason}", param="dataset") from None
    return out


def check_sealed(
    registry: Registry,
    version: domain.VersionInfo,
    dataset: domain.DatasetVersionInfo,
    split: str,
    examples: list[Example],
) -> dict[str, Any]:
    """Refuse a split the version was trained or validated on; returns what was checked."""
    trained_on = version.dataset
    if trained_on is None:
        return {"checked": False, "why": f"{version.ref} records no training dataset"}
    if trained_on == dataset.ref and split != "test":
        raise InvalidArgumentError(
            f"{version.ref} was trained on {dataset.ref}: its {split!r} split is not held out "
            "(the test split is the sealed one); use --split test",
            param="split",
        )
    source = registry.get_dataset(trained_on)
    trained = _examples(
        load_split(registry, source, "train") + load_split(registry, source, "val"), trained_on
    )
    seen = {fingerprint(e) for e in trained}
    leaked = [e.line for e in examples if fingerprint(e) in seen]
    if leaked:
        raise InvalidArgumentError(
            f"{len(leaked)} of the {len(examples)} examples of {dataset.ref} {split} are in the data "
            f"{version.ref} was trained or validated on ({trained_on} train/val), e.g. line {leaked[0]}; "
            "evaluate on a split it never saw",
            param="dataset",
        )
    return {"checked": True, "trained_on": trained_on, "overlap": 0}


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _trained_system_prompt(version: domain.VersionInfo) -> str | None:
    value = (version.training_config or {}).get("system_prompt")
    return str(value) if value else None


def few_shot_prompt(prompt: list[dict[str, str]], shots: list[Example], system: str) -> list[dict[str, str]]:
    """The prompted base's conversation: a system prompt, the shots as earlier turns, then the prompt."""
    own_system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None
    turns = [m for m in prompt if m["role"] != "system"]
    shot_turns = [m.model_dump() for s in shots for m in s.messages if m.role != "system"]
    return [{"role": "system", "content": own_system or system}, *shot_turns, *turns]


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible loraflow gateway to generate through, and what the report records of
    it under ``engine`` (the gateway's URL, or how the one started for this run was configured)."""

    url: str
    api_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # A memo of greedy answers shared by the evaluations through this endpoint (GatewayClient).
    answers: dict[tuple[str, str, int], Generation] | None = field(default=None, compare=False)


# A base model -> a context in which a gateway serves it and its adapters. The trainer never starts
# one: ``loraflow.cli.endpoint`` opens the configured gateway, or starts one through
# ``loraflow.server.embedded`` the way ``loraflow serve`` does.
OpenEndpoint = Callable[[str], AbstractContextManager[Endpoint]]


@contextmanager
def _client(settings: Settings, endpoint: Endpoint) -> Iterator[GatewayClient]:
    e = settings.eval
    # Evaluation traffic is not production traffic: it must not become the flywheel's next dataset.
    opt_out = {settings.traffic.opt_out_header: "1"}
    yield GatewayClient(
        endpoint.url,
        api_key=endpoint.api_key,
        timeout_s=e.request_timeout_s,
        concurrency=e.concurrency,
        headers=opt_out,
        answers=endpoint.answers,
    )


def _load_schema(settings: Settings, adapter: str) -> dict[str, Any] | None:
    path = settings.eval.json_schemas.get(adapter)
    if path is None:
        return None
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(
            f"eval.json_schemas.{adapter}: cannot read {path} as JSON ({exc})", param="eval.json_schemas"
        ) from exc
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"eval.json_schemas.{adapter}: {path} must hold a JSON object", param="eval.json_schemas"
        )
    return value


def evaluate(
    ref: str,
    *,
    registry: Registry,
    settings: Settings,
    endpoint: OpenEndpoint,
    dataset: str | None = None,
    split: str = "test",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Evaluate ``ref`` (NAME@vN or NAME:ALIAS) through the gateway ``endpoint`` opens for its base,
    and store the report on its version. ``progress`` is told (generations done, generations in
    all) as the answers of every system come back."""
    e = settings.eval
    parsed = parse_ref(ref, param="NAME@vN")
    if parsed.version is None and parsed.alias is None:
        raise InvalidArgumentError(f"eval takes NAME@vN or NAME:ALIAS, got {ref!r}", param="NAME@vN")
    if split not in SPLITS:
        raise InvalidArgumentError(
            f"--split must be one of {', '.join(SPLITS)}, not {split!r}", param="split"
        )
    require_page_libraries()  # the page is stored with the report: refuse before generating, not after
    candidate = registry.resolve(parsed)
    name = candidate.adapter
    adapter = registry.get(name)
    dataset_ref = dataset or candidate.dataset
    if dataset_ref is None:
        raise InvalidArgumentError(
            f"{candidate.ref} records no training dataset; pass --dataset NAME@vN", param="dataset"
        )
    ds = registry.get_dataset(dataset_ref)
    raw = registry.dataset_split(ds, split)
    rows = split_rows(raw)
    if not rows:
        raise InvalidArgumentError(f"{ds.ref} has no {split} examples", param="split")
    examples = _examples(rows, f"{ds.ref} {split}")
    sealed = check_sealed(registry, candidate, ds, split, examples)

    references = [Reference(text=ex.messages[-1].content.strip(), label=ex.label) for ex in examples]
    task = Task.infer(references, schema=_load_schema(settings, name), metrics=e.metrics)
    policy = settings.gate.policy_for(name)
    primary = policy.primary_metric or task.primary_default
    if primary not in task.metrics:
        raise InvalidArgumentError(
            f"the gate's primary metric {primary!r} is not computed for this task "
            f"({', '.join(task.metrics)}); set gate.adapters.{name}.primary_metric",
            param="gate.primary_metric",
        )
    production_version = adapter.aliases.get(DEFAULT_ALIAS)
    production = (
        registry.get_version(name, production_version)
        if production_version is not None and production_version != candidate.version
        else None
    )
    train_examples = _examples(load_split(registry, ds, "train"), f"{ds.ref} train")
    shots = random.Random(e.seed).sample(train_examples, min(e.few_shot, len(train_examples)))
    base_system = e.system_prompt or _trained_system_prompt(candidate) or DEFAULT_BASE_SYSTEM_PROMPT
    prompts = [[m.model_dump() for m in ex.messages[:-1]] for ex in examples]

    bootstrap = Bootstrap(samples=e.bootstrap_samples, confidence=e.confidence, seed=e.seed)
    suite = load_suite() if e.regression else []
    lm_eval = LmEvalSuites(e.lm_eval) if e.lm_eval is not None else None  # checks its tasks now
    lm_eval_report: dict[str, Any] | None = None
    with endpoint(adapter.base_model) as opened, _client(settings, opened) as client:
        engine = opened.info
        base_id = client.base_model_id()
        systems = [
            _System(
                "base",
                f"prompted base ({len(shots)}-shot)",
                base_id,
                [few_shot_prompt(p, shots, base_system) for p in prompts],
            )
        ]
        for key, version in (("production", production), ("candidate", candidate)):
            if version is not None:
                system_prompt = _trained_system_prompt(version)
                systems.append(
                    _System(
                        key,
                        f"{key} {version.ref}",
                        version.ref,
                        [_with_system(p, system_prompt) for p in prompts],
                    )
                )
        if progress is not None:
            total, done = len(systems) * (len(prompts) + len(suite)), 0

            def one_more() -> None:
                nonlocal done
                done += 1
                progress(done, total)

            client.on_result = one_more
        generations = {s.key: client.generate(s.model, s.prompts, max_tokens=e.max_tokens) for s in systems}
        suite_generations = {
            s.key: client.generate(s.model, [i.messages for i in suite], max_tokens=e.max_tokens)
            for s in systems
            if suite
        }
        if lm_eval is not None:
            lm_eval_report = lm_eval.run(client, {s.key: s.model for s in systems}, bootstrap, seed=e.seed)
    scored = {key: ScoredSystem(task, references, gens) for key, gens in generations.items()}
    candidate_scores = scored["candidate"]
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "candidate": candidate.ref,
        "adapter": name,
        "version": candidate.version,
        "dataset": ds.ref,
        "split": split,
        "split_digest": hashlib.sha256(raw).hexdigest(),
        "n": len(examples),
        "sealed": sealed,
        "confidence": e.confidence,
        "primary_metric": primary,
        "metrics": list(task.metrics),
        "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in task.metrics},
        "production": {"version": production.version} if production is not None else None,
        "systems": {
            s.key: {"label": s.label, "model": s.model, "metrics": bootstrap.summary(scored[s.key])}
            for s in systems
        },
        "comparisons": {
            s.key: bootstrap.compare(candidate_scores, scored[s.key]) for s in systems if s.key != "candidate"
        },
        "prompts": {
            "base_system_prompt": base_system,
            "few_shot": len(shots),
            "few_shot_from": f"{ds.ref} train",
            "few_shot_lines": [s.line for s in shots],
        },
        "regression": _regression(suite, suite_generations, bootstrap) if suite else None,
        "lm_eval": lm_eval_report,
        "judge": None,
        "examples": [
            {
                "index": i,
                "prompt": next((m.content for m in reversed(ex.messages[:-1]) if m.role == "user"), ""),
                "reference": references[i].text,
                "label": ex.label,
                "outputs": {
                    key: _output(gens[i], scored[key].scores[i]) for key, gens in generations.items()
                },
            }
            for i, ex in enumerate(examples)
        ],
        "engine": {"base_model": adapter.base_model, "base_model_id": base_id, **engine},
        "settings": {"eval": e.model_dump(mode="json"), "gate": policy.model_dump(mode="json")},
        "created_at": datetime.now(UTC).isoformat(),
    }
    if e.judge is not None:
        report["judge"] = _judge(e.judge, report, bootstrap)
    evaluation = registry.record_evaluation(
        name,
        candidate.version,
        dataset=ds.ref,
        split=split,
        split_digest=report["split_digest"],
        production_version=production_version,
        report=report,
        page=render_html(report),
    )
    return EvalResult(report=report, evaluation=evaluation)


def _output(gen: Generation, scores: dict[str, float | None]) -> dict[str, Any]:
    return {
        "text": gen.text,
        "finish_reason": gen.finish_reason,
        "output_tokens": gen.output_tokens,
        "latency_s": gen.latency_s,
        "scores": scores,
    }


def _regression(
    suite: list[Any], generations: dict[str, list[Generation]], bootstrap: Bootstrap
) -> dict[str, Any]:
    refs = [Reference(text=item.reference) for item in suite]
    task = Task.infer(refs, metrics=[SUITE_METRIC])
    values = {
        key: [s[SUITE_METRIC] for s in ScoredSystem(task, refs, gens).scores]
        for key, gens in generations.items()
    }
    items = [
        {
            "prompt": item.messages[-1]["content"],
            "reference": item.reference,
            "outputs": {key: gens[i].text for key, gens in generations.items()},
        }
        for i, item in enumerate(suite)
    ]
    return suite_entry(
        SUITE_NAME,
        SUITE_METRIC,
        values,
        bootstrap,
        skills=sorted({item.skill for item in suite}),
        items=items,
    )


def _judge(judge_settings: Any, report: dict[str, Any], bootstrap: Bootstrap) -> dict[str, Any]:
    judge = Judge(judge_settings)
    per_system: dict[str, list[float | None]] = {}
    for key in report["systems"]:
        items = [
            JudgeItem(question=ex["prompt"], reference=ex["reference"], answer=ex["outputs"][key]["text"])
            for ex in report["examples"]
        ]
        verdicts = judge.grade(items)
        for ex, verdict in zip(report["examples"], verdicts, strict=True):
            ex["outputs"][key]["judge"] = verdict.to_json()
        per_system[key] = [v.score for v in verdicts]
    return {
        "model": judge_settings.model,
        "url": judge_settings.url,
        "rubric": judge_settings.rubric,
        "systems": {
            key: bootstrap.mean(scores)
            | {"scored": sum(s is not None for s in scores), "unparsed": sum(s is None for s in scores)}
            for key, scores in per_system.items()
        },
        "comparisons": {
            key: bootstrap.paired(per_system["candidate"], scores)
            for key, scores in per_system.items()
            if key != "candidate"
        },
    }
