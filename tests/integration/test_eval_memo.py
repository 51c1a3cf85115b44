"""The evaluation client's memo of greedy answers: a question asked again of the same model, with
the same token limit, is answered from the memo, not sent; anything else is sent."""

from __future__ import annotations

import pytest

from loraflow.server.embedded import serve_in_thread
from loraflow.server.engine.supervisor import free_port
from loraflow.trainer.eval.client import GatewayClient
from loraflow.trainer.eval.scoring import Generation
from tests.fake_vllm import BASE_ID, Setup, gateway, gateway_setup

__all__ = ["gateway_setup"]  # the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_question_asked_again_of_the_same_model_is_answered_from_the_memo(gateway_setup: Setup) -> None:
    client = gateway(gateway_setup)
    (engine,) = gateway_setup.engines
    engine.answer = lambda body: f"{body['messages'][-1]['content']} -> {body['max_tokens']}"
    prompts = [[{"role": "user", "content": q}] for q in ("one?", "two?")]
    memo: dict[tuple[str, str, int], Generation] = {}
    with serve_in_thread(client.app, free_port(), timeout_s=30) as url:  # type: ignore[arg-type]
        ask = GatewayClient(url, timeout_s=30.0, concurrency=2, answers=memo)
        first = ask.generate(BASE_ID, prompts, max_tokens=8)
        assert len(engine.requests) == 2 and len(memo) == 2
        results: list[int] = []
        ask.on_result = lambda: results.append(1)
        assert ask.generate(BASE_ID, prompts, max_tokens=8) == first  # from the memo
        assert len(engine.requests) == 2 and len(results) == 2  # progress is still told
        assert [g.text for g in ask.generate(BASE_ID, prompts, max_tokens=9)] == ["one? -> 9", "two? -> 9"]
        assert len(engine.requests) == 4  # another limit is another question
        GatewayClient(url, timeout_s=30.0, concurrency=2).generate(BASE_ID, prompts, max_tokens=8)
        assert len(engine.requests) == 6  # no memo: always asked
