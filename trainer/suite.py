"""The built-in regression suite: general prompts an adapter must not forget how to answer.

Small and offline (``trainer/regression/general.jsonl``, shipped with the package).
Each system answers the suite's prompts as written, without the task's system
prompt or few-shot examples; the score is token F1 against the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUITE_FILE = Path(__file__).parent / "regression" / "general.jsonl"
SUITE_NAME = "builtin-general"
SUITE_METRIC = "token_f1"


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
