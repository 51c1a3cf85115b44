"""The built-in general regression suite measures something only if a real instruct model answers
its items when prompted: then a candidate that forgets how to answer them loses points. Each item
is checked here against SmolLM2-135M-Instruct (greedy, its own chat template, nothing else in the
prompt, as ``loraflow eval`` sends the suite), scored by the suite's own metric."""

from __future__ import annotations

import pytest

from loraflow.trainer.eval.regression_suite import SUITE_METRIC, load_suite
from loraflow.trainer.eval.scoring import Generation, Reference, ScoredSystem, Task
from tests.services import RealModel

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_smollm2_prompted_answers_every_item_of_the_builtin_suite(smollm2: RealModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2.conversion.returncode == 0, smollm2.conversion.stderr
    suite = load_suite()
    assert len(suite) >= 30 and len({item.skill for item in suite}) >= 6
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32).eval()
    answers: list[str] = []
    for start in range(0, len(suite), 8):
        batch = suite[start : start + 8]
        texts = [
            tokenizer.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True)
            for item in batch
        ]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **encoded, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    refs = [Reference(text=item.reference) for item in suite]
    task = Task.infer(refs, metrics=[SUITE_METRIC])
    scores = ScoredSystem(task, refs, [Generation(text=a, finish_reason=None) for a in answers]).scores
    wrong = [
        (item.messages[-1]["content"], item.reference, answer)
        for item, answer, score in zip(suite, answers, scores, strict=True)
        if score[SUITE_METRIC] != 1.0
    ]
    assert not wrong, wrong
