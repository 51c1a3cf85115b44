"""Optional LLM-as-judge: any OpenAI-compatible endpoint grades answers with the configured rubric.

The rubric asks for JSON with a ``score`` (and ``reasoning``). Scores are mapped
from [min_score, max_score] to [0, 1]. The judge's reasoning is kept with every
score; a reply that carries no usable score is kept too, as unparsed (score None),
never silently dropped or counted as a zero.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraflow.registry.errors import EngineUnavailableError
from loraflow.registry.settings import JudgeSettings

_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    score: float | None  # in [0, 1]; None: the reply carried no usable score
    reasoning: str  # the judge's reasoning, or its whole reply when it could not be parsed

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "reasoning": self.reasoning}


def parse_verdict(reply: str, *, min_score: float, max_score: float) -> Verdict:
    """The score and reasoning in a judge's reply (JSON, possibly inside other text)."""
    match = _OBJECT.search(reply)
    data: Any = None
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
    if not isinstance(data, dict):
        return Verdict(None, reply.strip())
    raw, reasoning = data.get("score"), str(data.get("reasoning", "")).strip()
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not min_score <= raw <= max_score:
        return Verdict(None, reasoning or reply.strip())
    return Verdict(round((float(raw) - min_score) / (max_score - min_score), 4), reasoning)


@dataclass(frozen=True)
class JudgeItem:
    question: str
    reference: str
    answer: str


class Judge:
    def __init__(self, settings: JudgeSettings, *, concurrency: int = 4) -> None:
        self.settings = settings
        self.concurrency = concurrency

    def grade(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return asyncio.run(self._grade_all(items))

    async def _grade_all(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        import openai

        s = self.settings
        client = openai.AsyncOpenAI(
            base_url=s.url,
            api_key=s.api_key.get_secret_value() if s.api_key else "unused",
            timeout=s.timeout_s,
            max_retries=2,
        )
        limit = asyncio.Semaphore(self.concurrency)

        async def one(item: JudgeItem) -> Verdict:
            content = f"QUESTION:\n{item.question}\n\nREFERENCE:\n{item.reference}\n\nANSWER:\n{item.answer}"
            async with limit:
                try:
                    reply = await client.chat.completions.create(
                        model=s.model,
                        messages=[
                            {"role": "system", "content": s.rubric},
                            {"role": "user", "content": content},
                        ],
                        temperature=0,
                        max_tokens=s.max_tokens,
                    )
                except openai.APIError as exc:
                    raise EngineUnavailableError(f"the judge at {s.url} failed: {exc}") from exc
            text = reply.choices[0].message.content or ""
            return parse_verdict(text, min_score=s.min_score, max_score=s.max_score)

        try:
            return list(await asyncio.gather(*(one(i) for i in items)))
        finally:
            await client.close()
