"""lm-evaluation-harness tasks as part of the regression suite (``[eval.lm_eval]``).

Each system (prompted base, production, candidate) runs the configured tasks with
lm-eval's ``local-chat-completions`` model against the same gateway that
:mod:`loraflow.trainer.eval.run` generates through, so the answers come from what
users are served. Tasks run as written: no system prompt, the task's own few-shot
setting. Only ``generate_until`` tasks can run through a chat endpoint (the others
need prompt log-probabilities), and that is checked before anything is generated.

Per-example scores come from lm-eval's logged samples, paired by ``doc_id``, so
each task gets the same paired-bootstrap comparison as the built-in suite and is
gated by the same ``max_regression_drop``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import sys
from pathlib import Path
from typing import Any

from loraflow.registry.errors import InvalidArgumentError, MissingDependencyError
from loraflow.registry.settings import LmEvalSettings
from loraflow.trainer.eval.client import GatewayClient
from loraflow.trainer.eval.regression_suite import suite_entry
from loraflow.trainer.eval.scoring import Bootstrap

log = logging.getLogger("loraflow.lm_eval")

PARAM = "eval.lm_eval"


def _import() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"{PARAM} needs pip install 'loraflow[lm-eval]'") from exc


def _task_manager(settings: LmEvalSettings) -> Any:
    include = settings.include_path
    if include is not None and not include.is_dir():
        raise InvalidArgumentError(
            f"{PARAM}.include_path: {include} is not a folder", param=f"{PARAM}.include_path"
        )
    return _indexed(str(include) if include else None, _fingerprint(include))


def _fingerprint(include: Path | None) -> tuple[tuple[str, int, int], ...]:
    """What the task folder holds: an edited or added task file invalidates the cached index."""
    if include is None:
        return ()
    stats = ((p, p.stat()) for p in sorted(include.rglob("*")) if p.is_file())
    return tuple((str(p), st.st_mtime_ns, st.st_size) for p, st in stats)


@functools.lru_cache(maxsize=4)
def _indexed(include: str | None, fingerprint: tuple[tuple[str, int, int], ...]) -> Any:
    """lm-eval's TaskManager walks its whole task tree (about 7 s here); the built-in tasks do not change
    within a process, so one index per (include folder, its contents) is built once and reused."""
    from lm_eval.tasks import TaskManager

    del fingerprint  # part of the cache key only
    return TaskManager(include_path=include)


def check_tasks(settings: LmEvalSettings, manager: Any) -> dict[str, str]:
    """Each leaf task the configured names expand to -> the ``METRIC,FILTER`` the gate reads.
    Refuses, naming the task: unknown or unloadable tasks, a task named twice (directly or
    through a group), tasks that are not ``generate_until``, and metrics that are not a
    per-example mean (those have no paired interval)."""
    keys: dict[str, str] = {}
    for name in settings.tasks:
        if name not in manager.all_tasks:
            raise InvalidArgumentError(
                f"{PARAM}.tasks: {name!r} is not an lm-eval task, group or tag"
                + (f" (nor one in {settings.include_path})" if settings.include_path else ""),
                param=f"{PARAM}.tasks",
            )
        try:
            loaded = manager.load([name])["tasks"]
        except Exception as exc:  # lm-eval raises whatever its dataset loader raises
            raise InvalidArgumentError(
                f"{PARAM}.tasks: cannot load {name!r}: {type(exc).__name__}: {exc}", param=f"{PARAM}.tasks"
            ) from exc
        for leaf, task in loaded.items():
            if leaf in keys:
                raise InvalidArgumentError(
                    f"{PARAM}.tasks: {leaf!r} is named twice (directly or through a group)",
                    param=f"{PARAM}.tasks",
                )
            if task.OUTPUT_TYPE != "generate_until":
                raise InvalidArgumentError(
                    f"{PARAM}.tasks: {leaf!r} is a {task.OUTPUT_TYPE} task; through a chat endpoint only "
                    "generate_until tasks can run",
                    param=f"{PARAM}.tasks",
                )
            keys[leaf] = _metric_key(leaf, task, settings.metrics.get(leaf))
    unknown = set(settings.metrics) - set(keys)
    if unknown:
        raise InvalidArgumentError(
            f"{PARAM}.metrics names {', '.join(sorted(unknown))}, not among the tasks run "
            f"({', '.join(keys)})",
            param=f"{PARAM}.metrics",
        )
    return keys


def _metric_key(leaf: str, task: Any, chosen: str | None) -> str:
    """``METRIC,FILTER`` as lm-eval keys its results: the configured one, or the task's first
    per-example metric under its first filter."""
    from lm_eval.api.metrics import mean

    param = f"{PARAM}.metrics"
    per_example = [m for m, how in task.aggregation().items() if how is mean]
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    if chosen is None:
        if not per_example:
            raise InvalidArgumentError(
                f"{PARAM}.tasks: {leaf!r} has no per-example metric (mean aggregation) to pair", param=param
            )
        return f"{per_example[0]},{filters[0]}"
    metric, _, filter_name = chosen.partition(",")
    if metric not in task.aggregation():
        raise InvalidArgumentError(
            f"{param}.{leaf}: {metric!r} is not among its metrics ({', '.join(task.aggregation())})",
            param=param,
        )
    if metric not in per_example:
        raise InvalidArgumentError(
            f"{param}.{leaf}: {metric!r} is aggregated over the whole corpus, not averaged per example, "
            f"so it has no paired interval; choose one of {', '.join(per_example) or 'none'}",
            param=param,
        )
    if filter_name and filter_name not in filters:
        raise InvalidArgumentError(
            f"{param}.{leaf}: filter {filter_name!r} is not among its filters ({', '.join(filters)})",
            param=param,
        )
    return f"{metric},{filter_name or filters[0]}"


def _run(
    tasks: list[str], limit: int | None, manager: Any, gateway: GatewayClient, model: str, seed: int
) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    model_args: dict[str, Any] = {
        "base_url": f"{gateway.url}/v1/chat/completions",
        "model": model,
        "num_concurrent": gateway.concurrency,
        "timeout": gateway.timeout_s,
        "max_retries": 2,
        "tokenized_requests": False,
        # Our key, always: lm-eval's default header carries $OPENAI_API_KEY, which is not for us.
        "header": {**gateway.headers, "Authorization": f"Bearer {gateway.api_key}"},
    }
    # lm-eval prints its tables and progress; `loraflow eval --json` keeps stdout for the report.
    with contextlib.redirect_stdout(sys.stderr):
        results = simple_evaluate(
            model="local-chat-completions",
            model_args=model_args,
            tasks=tasks,  # the leaves: a group's own aggregate is not gated
            task_manager=manager,
            limit=limit,
            apply_chat_template=True,
            log_samples=True,
            bootstrap_iters=0,  # intervals are ours, paired across systems
            # lm-eval seeds the process-wide random, numpy and torch generators with these.
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:
        raise InvalidArgumentError(f"{PARAM}: lm-eval returned no results for {model}", param=PARAM)
    return dict(results)


def _per_doc(task: str, results: dict[str, Any], key: str) -> dict[int, float]:
    metric, _, filter_name = key.partition(",")
    out: dict[int, float] = {}
    for sample in results["samples"][task]:
        if sample.get("filter", "none") != filter_name:
            continue
        value = sample.get(metric)
        try:
            out[int(sample["doc_id"])] = float(value)  # numbers, and bools (numpy's too)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"{PARAM}.metrics.{task}: lm-eval logged {metric} = {value!r} for document "
                f"{sample.get('doc_id')}, not a number",
                param=f"{PARAM}.metrics",
            ) from None
    if not out:
        raise InvalidArgumentError(f"{PARAM}: lm-eval logged no {key} samples for {task!r}", param=PARAM)
    return out


class LmEvalSuites:
    """The configured tasks, checked when built (before anything is generated), run per system."""

    def __init__(self, settings: LmEvalSettings) -> None:
        _import()
        self.settings = settings
        self.version = importlib.metadata.version("lm_eval")
        self.manager = _task_manager(settings)
        self.keys = check_tasks(settings, self.manager)  # leaf task -> METRIC,FILTER

    def run(
        self, gateway: GatewayClient, models: dict[str, str], bootstrap: Bootstrap, *, seed: int
    ) -> dict[str, Any]:
        """Run the tasks for each system (``models``: system key -> the model requests name, with a
        ``candidate``) and return the report's ``lm_eval`` part: one suite entry per leaf task."""
        runs = {
            key: _run(list(self.keys), self.settings.limit, self.manager, gateway, model, seed)
            for key, model in models.items()
        }
        candidate = runs["candidate"]
        entries = []
        for task, key in self.keys.items():
            per_doc = {system: _per_doc(task, run, key) for system, run in runs.items()}
            docs = sorted(set.intersection(*(set(d) for d in per_doc.values())))
            metric = key.partition(",")[0]
            higher = candidate.get("higher_is_better", {}).get(task, {}).get(metric)
            entries.append(
                suite_entry(
                    f"lm-eval:{task}",
                    key,
                    {system: [d[i] for i in docs] for system, d in per_doc.items()},
                    bootstrap,
                    higher_is_better=higher is not False,
                    task=task,
                    aggregate={system: run["results"][task].get(key) for system, run in runs.items()},
                    n_shot=candidate.get("n-shot", {}).get(task),
                )
            )
        return {"version": self.version, "limit": self.settings.limit, "tasks": entries}
