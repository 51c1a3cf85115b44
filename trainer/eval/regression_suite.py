"""The built-in regression suite: general prompts an adapter must not forget how to answer.

Small and offline (``trainer/eval/regression/general.jsonl``, shipped with the package).
Each system answers the suite's prompts as written, without the task's system
prompt or few-shot examples. The score is ``answer_match``: the reference appears in
the answer's first sentence, since a chat model answers "The capital of France is
Paris." to a one-word question. Every item is one SmolLM2-135M-Instruct answers right
when prompted (``tests/integration/test_regression_suite.py`` checks each), so a
candidate that forgets general ability loses points here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.trainer.eval.scoring import Bootstrap

SUITE_FILE = Path(__file__).parent / "regression" / "general.jsonl"
SUITE_NAME = "builtin-general"
SUITE_METRIC = "answer_match"


@dataclass(frozen=True)
class SuiteItem:
    messages: list[dict[str, str]]  # the prompt
    reference: str
    skill: str


def load_suite(path: Path = SUITE_FILE) -> list[SuiteItem]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        items.append(
            SuiteItem(
                messages=row["messages"][:-1], reference=row["messages"][-1]["content"], skill=row["skill"]
            )
        )
    return items


def suite_entry(
    suite: str,
    metric: str,
    values: dict[str, list[float | None]],
    bootstrap: Bootstrap,
    *,
    higher_is_better: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """A general-ability suite's part of the report, as the gate's ``regression`` rule reads it:
    each system's mean with its interval, and the candidate paired against each other system.
    ``values`` maps a system key to its per-item scores, in the same item order for every system."""
    n = len(next(iter(values.values()), []))
    return {
        "suite": suite,
        "n": n,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "systems": {key: bootstrap.mean(v) for key, v in values.items()},
        "comparisons": {
            key: bootstrap.paired(values["candidate"], v) for key, v in values.items() if key != "candidate"
        },
        **extra,
    }
