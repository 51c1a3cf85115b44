"""On a real tokenizer, what the trainer trains on: SmolLM2's ChatML template has no
``{% generation %}`` markers (the tiny Llama's has), so the answer is found as the completion of a
prompt/completion conversation. The loss must cover the answer and the end-of-turn token that
makes served answers stop, and nothing of the prompt: not the system prompt the template adds by
itself, nor the user's turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.trainer.config import TrainConfig
from tests.services import RealModel

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Extract the order: {name} in {city} ordered {qty} items."},
            {"role": "assistant", "content": f'{{"name": "{name}", "city": "{city}", "qty": {qty}}}'},
        ]
    }
    for name, city, qty in (("ada", "lima", 2), ("bob", "oslo", 5), ("cy", "rome", 1))
]


def test_the_loss_covers_the_answer_and_its_end_of_turn_and_nothing_of_the_prompt(
    smollm2: RealModel, tmp_path: Path
) -> None:
    from datasets import Dataset
    from trl.trainer.sft_trainer import SFTTrainer

    from loraflow.registry.basemodel import resolve_base_model
    from loraflow.trainer.model import load_tokenizer, token_counter
    from loraflow.trainer.train import _conversations, _load_model, _lora_config, _sft_args

    assert smollm2.conversion.returncode == 0, smollm2.conversion.stderr
    base = resolve_base_model(str(smollm2.path))
    tokenizer = load_tokenizer(base)
    config = TrainConfig(adapter="orders", base=str(smollm2.path), data="orders@v1", output_dir=tmp_path)
    # What train() builds, up to the first step: its conversations, its SFT arguments, TRL's tokenization.
    rows = _conversations(ROWS, "train", count=token_counter(tokenizer), max_length=256, system_prompt=None)
    trainer = SFTTrainer(
        model=_load_model(smollm2.path, qlora=False),
        args=_sft_args(config, output_dir=tmp_path, max_length=256, on_gpu=False),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=_lora_config(config),
    )
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn == tokenizer.eos_token_id
    for row, example in zip(ROWS, trainer.train_dataset, strict=True):
        ids = example["input_ids"]
        mask = [label != -100 for label in example["labels"]]  # TRL folds the completion mask into labels
        assert [label for label, m in zip(example["labels"], mask, strict=True) if m] == [
            t for t, m in zip(ids, mask, strict=True) if m
        ]
        trained = [t for t, m in zip(ids, mask, strict=True) if m]
        prompt = [t for t, m in zip(ids, mask, strict=True) if not m]
        answer = row["messages"][-1]["content"]
        # The answer, then the end-of-turn token (and the template's newline after it).
        assert tokenizer.decode(trained).startswith(answer + "<|im_end|>"), tokenizer.decode(trained)
        assert end_of_turn in trained
        # The whole prompt is masked: the template's own system turn and the user's words.
        shown = tokenizer.decode(prompt)
        assert shown.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), shown
        assert row["messages"][0]["content"] in shown and shown.endswith("<|im_start|>assistant\n"), shown
        assert mask == sorted(mask), mask  # one prompt, then one answer: nothing after is unmasked
