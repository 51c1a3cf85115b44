"""Generation through a loraflow gateway, with the official ``openai`` client: what users are served.

Requests go out concurrently (``eval.concurrency`` at a time) so vLLM batches
them; each is greedy (``temperature=0``). Latency is per request, so it includes
the time a request waited in the engine's batch.

A client may share ``answers``, a memo of greedy answers by (model, messages, max_tokens). The
models an evaluation asks (the base, and pinned ``NAME@vN`` versions) never change behind one
gateway, so a question asked again is answered from the memo: the demo's later evaluations ask
the prompted base and production what earlier ones asked them already.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from loraflow.registry.errors import EngineUnavailableError, InvalidArgumentError
from loraflow.trainer.eval.scoring import Generation


class GatewayClient:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        concurrency: int = 8,
        headers: dict[str, str] | None = None,
        answers: dict[tuple[str, str, int], Generation] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key or "unused"
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.headers = dict(headers or {})  # sent with every request (e.g. the traffic opt-out)
        self.on_result: Callable[[], None] | None = None  # called as each generation comes back
        self.answers = answers  # the memo (see the module docstring); None: ask every time

    def _client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            base_url=f"{self.url}/v1",
            api_key=self.api_key,
            timeout=self.timeout_s,
            max_retries=2,
            default_headers=self.headers,
        )

    def base_model_id(self) -> str:
        """The id the gateway serves its base model under (the /v1/models entry with no parent)."""
        import openai

        async def ask() -> str | None:
            client = self._client()
            try:
                page = await client.models.list()
            finally:
                await client.close()
            for card in page.data:
                if getattr(card, "parent", None) is None:
                    return str(card.id)
            return None

        try:
            found = asyncio.run(ask())
        except openai.APIConnectionError as exc:
            raise EngineUnavailableError(f"cannot reach the gateway at {self.url}: {exc}") from exc
        except openai.AuthenticationError as exc:
            raise InvalidArgumentError(
                f"the gateway at {self.url} refused the API key; set eval.api_key", param="eval.api_key"
            ) from exc
        if found is None:
            raise EngineUnavailableError(
                f"the gateway at {self.url} lists no base model to this key: an evaluation calls the "
                "base and pinned versions, so eval.api_key needs the 'base' and 'versions' scopes "
                "(loraflow keys create NAME --scope base --scope versions)"
            )
        return found

    def generate(
        self, model: str, prompts: Sequence[list[dict[str, str]]], *, max_tokens: int
    ) -> list[Generation]:
        return asyncio.run(self._generate_all(model, prompts, max_tokens=max_tokens))

    async def _generate_all(
        self, model: str, prompts: Sequence[list[dict[str, str]]], *, max_tokens: int
    ) -> list[Generation]:
        import openai

        client = self._client()
        limit = asyncio.Semaphore(self.concurrency)

        async def one(messages: list[dict[str, str]]) -> Generation:
            key = (model, json.dumps(messages, sort_keys=True), max_tokens)
            if self.answers is not None and key in self.answers:
                if self.on_result is not None:
                    self.on_result()
                return self.answers[key]
            async with limit:
                started = time.perf_counter()
                try:
                    reply = await client.chat.completions.create(
                        model=model,
                        messages=messages,
                        temperature=0,
                        max_tokens=max_tokens,
                    )
                except openai.APIStatusError as exc:
                    raise EngineUnavailableError(
                        f"the gateway answered {exc.status_code} for model={model}: {exc.message}"
                    ) from exc
                except openai.APIConnectionError as exc:
                    raise EngineUnavailableError(f"cannot reach the gateway at {self.url}: {exc}") from exc
                latency = time.perf_counter() - started
                if self.on_result is not None:
                    self.on_result()
                choice = reply.choices[0]
                generation = Generation(
                    text=(choice.message.content or "").strip(),
                    finish_reason=choice.finish_reason,
                    output_tokens=reply.usage.completion_tokens if reply.usage else None,
                    latency_s=round(latency, 4),
                )
                if self.answers is not None:
                    self.answers[key] = generation
                return generation

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            await client.close()
