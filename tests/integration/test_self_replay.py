"""Self-replay on a real instruct model: the rows are the base's own greedy answers (the same in a
batch as asked one at a time, so left padding changes nothing), and an answer cut off by the token
limit is dropped rather than taught as if it ended there."""

from __future__ import annotations

import pytest

from loraflow.trainer.replay import PROMPTS, self_replay_rows
from tests.services import RealModel

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_self_replay_rows_are_the_base_models_own_finished_answers(smollm2: RealModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2.conversion.returncode == 0, smollm2.conversion.stderr
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)
    prompts = list(PROMPTS[:12])
    rows = self_replay_rows(model, tokenizer, prompts, system_prompt=None, max_new_tokens=64)
    assert 5 <= len(rows) < len(prompts), rows  # some of SmolLM2's answers run past 64 tokens
    for row in rows[:4]:
        (turn,) = row["prompt"]
        assert turn["role"] == "user" and turn["content"] in prompts
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            alone = model.generate(**ids, max_new_tokens=64, do_sample=False)
        expected = tokenizer.decode(alone[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert row["completion"] == [{"role": "assistant", "content": expected}]

    with_system = self_replay_rows(
        model, tokenizer, prompts[:2], system_prompt="Be brief.", max_new_tokens=64
    )
    assert all(r["prompt"][0] == {"role": "system", "content": "Be brief."} for r in with_system)
    # Three tokens end no answer of these: every one would be cut off, so none is kept.
    assert self_replay_rows(model, tokenizer, prompts, system_prompt=None, max_new_tokens=3) == []
