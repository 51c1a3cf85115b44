"""lm-evaluation-harness tasks as part of the regression suite (``[eval.lm_eval]``).

Each system (prompted base, production, candidate) runs the configured tasks with
lm-eval's ``local-chat-completions`` model against the same gateway that
:mod:`loraflow.trainer.evaluate` generates through, so the answers come from what
users are served. Tasks run as written: no system prompt, the task's own few-shot
setting. Only ``generate_until`` tasks can run through a chat endpoint (the others
need prompt log-probabilities), and that is checked before anything is generated.

Per-example scores come from lm-eval's logged samples, paired by ``doc_id``, so
each task gets the same paired-bootstrap comparison as the built-in suite and is
gated by the same ``max_regression_drop``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import numbers
import sys
from dataclasses import dataclass
from typing import Any

from loraflow.registry.errors import InvalidArgumentError, MissingDependencyError
from loraflow.registry.settings import LmEvalSettings
from loraflow.trainer.scoring import Bootstrap
from loraflow.trainer.suite import suite_entry

log = logging.getLogger("loraflow.lm_eval")

PARAM = "eval.lm_eval"


@dataclass(frozen=True)
class Endpoint:
    url: str  # the gateway's root
    api_key: str | None
    timeout_s: float
    concurrency: int


def _import() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"{PARAM} needs pip install 'loraflow[lm-eval]'") from exc


def _task_manager(settings: LmEvalSettings) -> Any:
    from lm_eval.tasks import TaskManager

    if settings.include_path is not None and not settings.include_path.is_dir():
        raise InvalidArgumentError(
            f"{PARAM}.include_path: {settings.include_path} is not a folder", param=f"{PARAM}.include_path"
        )
    return TaskManager(include_path=str(settings.include_path) if settings.include_path else None)


def check_tasks(settings: LmEvalSettings, manager: Any) -> list[str]:
    """The leaf tasks the configured names expand to; refuses unknown, unloadable and
    non-generative tasks, naming the task."""
    leaves: list[str] = []
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
            if task.OUTPUT_TYPE != "generate_until":
                raise InvalidArgumentError(
                    f"{PARAM}.tasks: {leaf!r} is a {task.OUTPUT_TYPE} task; through a chat endpoint only "
                    "generate_until tasks can run",
                    param=f"{PARAM}.tasks",
                )
            leaves.append(leaf)
    unknown = set(settings.metrics) - set(leaves)
    if unknown:
        raise InvalidArgumentError(
            f"{PARAM}.metrics names {', '.join(sorted(unknown))}, not among the tasks run "
            f"({', '.join(leaves)})",
            param=f"{PARAM}.metrics",
        )
    return leaves


def _run(settings: LmEvalSettings, manager: Any, endpoint: Endpoint, model: str, seed: int) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    model_args: dict[str, Any] = {
        "base_url": f"{endpoint.url}/v1/chat/completions",
        "model": model,
        "num_concurrent": endpoint.concurrency,
        "timeout": endpoint.timeout_s,
        "max_retries": 2,
        "tokenized_requests": False,
    }
    if endpoint.api_key:
        model_args["auth_token"] = endpoint.api_key
    # lm-eval prints its tables and progress; `loraflow eval --json` keeps stdout for the report.
    with contextlib.redirect_stdout(sys.stderr):
        results = simple_evaluate(
            model="local-chat-completions",
            model_args=model_args,
            tasks=list(settings.tasks),
            task_manager=manager,
            limit=settings.limit,
            apply_chat_template=True,
            log_samples=True,
            bootstrap_iters=0,  # intervals are ours, paired across systems
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:
        raise InvalidArgumentError(f"{PARAM}: lm-eval returned no results for {model}", param=PARAM)
    return dict(results)


def _metric_key(task: str, results: dict[str, Any], chosen: str | None) -> str:
    """``METRIC,FILTER`` as lm-eval keys its results: the configured one, or the task's first."""
    keys = [str(k) for k in results["results"][task] if "," in k and "_stderr," not in k]
    if chosen is not None:
        matches = [k for k in keys if k == chosen or k.partition(",")[0] == chosen]
        if not matches:
            raise InvalidArgumentError(
                f"{PARAM}.metrics.{task}: {chosen!r} is not among its metrics ({', '.join(keys)})",
                param=f"{PARAM}.metrics",
            )
        return matches[0]
    if not keys:
        raise InvalidArgumentError(f"{PARAM}: lm-eval reported no metric for {task!r}", param=PARAM)
    return keys[0]


def _per_doc(task: str, results: dict[str, Any], key: str) -> dict[int, float]:
    metric, _, filter_name = key.partition(",")
    out: dict[int, float] = {}
    for sample in results["samples"][task]:
        if sample.get("filter", "none") != filter_name:
            continue
        value = sample.get(metric)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidArgumentError(
                f"{PARAM}.metrics.{task}: {metric} is scored over the whole corpus, not per example, so it "
                "has no paired interval; choose a per-example metric",
                param=f"{PARAM}.metrics",
            )
        out[int(sample["doc_id"])] = float(value)
    return out


class LmEvalSuites:
    """The configured tasks, checked when built (before anything is generated), run per system."""

    def __init__(self, settings: LmEvalSettings) -> None:
        _import()
        self.settings = settings
        self.version = importlib.metadata.version("lm_eval")
        self.manager = _task_manager(settings)
        self.tasks = check_tasks(settings, self.manager)

    def run(
        self, endpoint: Endpoint, models: dict[str, str], bootstrap: Bootstrap, *, seed: int
    ) -> dict[str, Any]:
        """Run the tasks for each system (``models``: system key -> the model requests name, with a
        ``candidate``) and return the report's ``lm_eval`` part: one suite entry per leaf task."""
        runs = {
            key: _run(self.settings, self.manager, endpoint, model, seed) for key, model in models.items()
        }
        candidate = runs["candidate"]
        entries = []
        for task in self.tasks:
            key = _metric_key(task, candidate, self.settings.metrics.get(task))
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
