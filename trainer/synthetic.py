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


# -- The demo's task on a real model -----------------------------------------------------------
# Prompting alone cannot solve it (measured on SmolLM2-135M-Instruct, see docs/demo.md): the site is
# a code from a house list the base has never seen, the customer is title-cased, and half the
# quantities are written as words. Shifted traffic comes as e-mails that name a second office (the
# sender's) and a second number, which a model trained on one-line orders takes for the answer.
SITES = {
    "paris": "EU-7",
    "berlin": "EU-3",
    "tokyo": "AP-2",
    "lima": "SA-5",
    "oslo": "EU-9",
    "rome": "EU-4",
    "cairo": "AF-1",
    "delhi": "AP-6",
}
CUSTOMERS = "alice bob carol dave erin frank grace heidi ivan judy kim leo mia noah olga pablo".split()
NUMBER_WORDS = "one two three four five six seven eight nine".split()
HOUSE_INSTRUCTION = "Extract customer, site and qty as JSON."
# What the prompted base is told (with a few solved examples): everything the adapter learns.
HOUSE_BRIEF = (
    "Answer with JSON only: customer (the name, capitalized), site (the office's code: "
    + ", ".join(f"{city} {code}" for city, code in SITES.items())
    + "), qty (a number)."
)
HOUSE_ORDERS = [
    "{name} from {city} ordered {qty} items.",
    "Order: {qty} items for {name} in {city}.",
    "customer {name} ({city}) wants {qty} items",
    "{qty} items to {name}, {city} office.",
    "please ship {qty} units to {name} at {city}",
]
_SUBJECTS = ["order", "new order", "request", "quick one", "supplies", "re: order"]
_GREETINGS = ["Hello team,", "Hi all,", "Good morning,", "Dear colleagues,", "Hi there,"]
_ASKS = [
    "I am writing from the {other} office on behalf of {name} in {city}, who needs {qty} items.",
    "Could you send {qty} items to {name} at our {city} site? I sit in {other} myself.",
    "{name} ({city}) asked me to order {qty} items; please bill it to {city}, not to us in {other}.",
    "From {other}: we need {qty} items for {name}, who works in {city}.",
]
_FILLERS = [
    "We received {extra} boxes last month and they were fine.",
    "Last time it took {extra} days, so no rush.",
    "This replaces the order of {extra} we cancelled.",
    "Our team of {extra} says thanks for the quick help.",
]
_CLOSINGS = ["Thanks a lot.", "Best regards.", "Many thanks.", "Cheers."]


def _house_answer(name: str, city: str, qty: int) -> str:
    return json.dumps({"customer": name.title(), "site": SITES[city], "qty": qty})


def _house_qty(rng: random.Random, qty: int) -> str:
    return NUMBER_WORDS[qty - 1] if rng.random() < 0.5 else str(qty)


def make_house_rows(n: int, *, seed: int = 0) -> list[dict[str, object]]:
    """``n`` one-line orders: the input names a customer, a city and a quantity; the answer is
    ``{"customer": Title, "site": the city's house code, "qty": int}``."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        name, city, qty = rng.choice(CUSTOMERS), rng.choice(sorted(SITES)), rng.randint(1, 9)
        text = rng.choice(HOUSE_ORDERS).format(name=name, city=city, qty=_house_qty(rng, qty))
        rows.append(
            {
                "instruction": HOUSE_INSTRUCTION,
                "input": text,
                "output": _house_answer(name, city, qty),
                "label": "order",
            }
        )
    return rows


def make_house_emails(n: int, *, seed: int = 0, signature: str = "Jane Roe") -> list[dict[str, object]]:
    """``n`` e-mails asking for an order: each also names the sender's office and a second number,
    and ends with ``signature`` (where the demo puts contact details the traffic store must not keep)."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        name, qty = rng.choice(CUSTOMERS), rng.randint(1, 9)
        city, other = rng.sample(sorted(SITES), 2)
        ask = rng.choice(_ASKS).format(name=name, city=city, other=other, qty=_house_qty(rng, qty))
        filler = rng.choice(_FILLERS).format(extra=rng.randint(10, 40))
        body = [ask, filler] if rng.random() < 0.5 else [filler, ask]
        text = (
            f"Subject: {rng.choice(_SUBJECTS)}\n{rng.choice(_GREETINGS)} {' '.join(body)} "
            f"{rng.choice(_CLOSINGS)}\n{signature}"
        )
        rows.append(
            {
                "instruction": HOUSE_INSTRUCTION,
                "input": text,
                "output": _house_answer(name, city, qty),
                "label": "email",
            }
        )
    return rows
