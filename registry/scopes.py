"""What an API key may do beyond calling its adapters by name or alias (NAME, NAME:ALIAS).

Plain Python (no pydantic), so that the CLI's help can list the scopes without loading it.
New keys get none of these; the README's "Keys and scopes" is the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Scope = Literal["base", "versions", "feedback-any", "review", "operator"]
SCOPES: dict[Scope, str] = {
    "base": "call the base model (no adapter)",
    "versions": "call pinned versions NAME@vN of its adapters, candidates included",
    "feedback-any": "rate or correct requests that other keys made to its adapters",
    "review": "a reviewer's role: feedback-any, and reading its adapters' sampled outputs",
    "operator": "every scope above, on every adapter",
}
# A scope that grants others with it.
_IMPLIES: dict[Scope, tuple[Scope, ...]] = {
    "review": ("feedback-any",),
    "operator": ("base", "versions", "feedback-any", "review"),
}
# Keys made before scopes existed could call the base model and pinned versions: the migration
# (0006) gives them exactly these, and `keys list` flags them until they are replaced.
LEGACY_SCOPES: tuple[Scope, ...] = ("base", "versions")


def grants(held: Iterable[Scope], scope: Scope) -> bool:
    """Whether scopes ``held`` grant ``scope``, directly or through one that implies it."""
    return any(scope == s or scope in _IMPLIES.get(s, ()) for s in held)
