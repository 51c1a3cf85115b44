"""A small synthetic task for the demo and the tests: extract order fields from a sentence as JSON.

Deterministic for a seed. The prompts vary in wording, so the adapter has to
learn the format and to copy the fields. The base model does neither.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = "alice bob carol dave erin frank grace heidi ivan judy".split()
CITIES = "paris berlin tokyo lima oslo rome cairo delhi".split()
TEMPLATES = {
    "order": [
        "{name} from {city} ordered {qty} items.",
        "Order: {qty} items for {name} in {city}.",
        "customer {name} ({city}) wants {qty} items",
    ],
    "return": [
        "{name} in {city} returned {qty} items.",
        "Return of {qty} items by {name} from {city}.",
    ],
}
INSTRUCTION = "Extract name, city and qty as JSON."


def make_rows(n: int, *, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        label = rng.choice(sorted(TEMPLATES))
        name, city, qty = rng.choice(NAMES), rng.choice(CITIES), rng.randint(1, 9)
        text = rng.choice(TEMPLATES[label]).format(name=name, city=city, qty=qty)
        answer = json.dumps({"name": name, "city": city, "qty": qty})
        rows.append({"instruction": INSTRUCTION, "input": text, "output": answer, "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
