"""Self-replay: general prompts, answered by the base model itself, mixed into the training split.

A narrow fine-tune forgets: trained on the demo's task alone, SmolLM2-135M-Instruct answers
"What is 2 plus 3?" with the task's JSON, and the built-in regression suite drops from 1.00 to
0.00. Rehearsing what the model already does (its own greedy answers to everyday questions) is
the cheapest guard there is: no other model, no data to collect. The answers are the base's, so
the adapter is taught to keep them, not new facts.

``TrainConfig.self_replay`` is how many prompts a run mixes in. The prompts are built in
(``PROMPTS``) and share none with the regression suite, which would otherwise be trained on
(``tests/unit/test_replay.py`` checks).
"""

from __future__ import annotations

import random
from typing import Any

from loraflow.registry.errors import InvalidArgumentError

PROMPTS = (
    "What is 4 plus 5?",
    "What is 6 plus 1?",
    "What is 7 minus 2?",
    "What is 2 times 4?",
    "What is 100 minus 1?",
    "What is the capital of Italy?",
    "What is the capital of Spain?",
    "What is the capital of Canada?",
    "What is the capital of Egypt?",
    "What is the longest river in Africa?",
    "Which continent is Kenya in?",
    "How many hours are in a day?",
    "How many months are in a year?",
    "How many wheels does a bicycle have?",
    "What color is grass?",
    "What color is a ripe banana?",
    "Which animal says woof?",
    "What do bees make?",
    "What is the opposite of fast?",
    "What is the opposite of happy?",
    "What is the opposite of old?",
    "What is the plural of foot?",
    "What is the plural of tooth?",
    "Which planet do we live on?",
    "What gas do plants take in from the air?",
    "What is frozen water called?",
    "What is the closest star to Earth?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Is 4 an even number? Answer yes or no.",
    "Is the sun a star? Answer yes or no.",
    "Name a primary color.",
    "Give me a synonym for big.",
    "Write one sentence about the sea.",
    "Say hello in French.",
    "What is a baby cat called?",
    "What do you call a doctor for animals?",
    "What shape has three sides?",
    "Suggest a name for a pet goldfish.",
    "What instrument has black and white keys?",
    "What is 8 plus 8?",
    "What is 9 minus 4?",
    "What is 5 times 5?",
    "What is the capital of Greece?",
    "What is the capital of Portugal?",
    "What is the capital of Australia?",
    "Which ocean lies between Europe and America?",
    "How many minutes are in an hour?",
    "How many sides does a square have?",
    "What color is snow?",
    "Which animal is known as the king of the jungle?",
    "What do cows drink?",
    "What is the opposite of wet?",
    "What is the opposite of early?",
    "What is the plural of goose?",
    "What is the past tense of run?",
    "What planet is closest to the sun?",
    "What do we call a scientist who studies rocks?",
    "What organ pumps blood through the body?",
    "Who wrote Hamlet?",
    "Is ice cold? Answer yes or no.",
    "Is 7 an odd number? Answer yes or no.",
    "Give me a word that rhymes with cat.",
    "Write one sentence about the moon.",
)


def replay_prompts(n: int, *, seed: int) -> list[str]:
    """``n`` of the built-in prompts, drawn with ``seed``."""
    if n > len(PROMPTS):
        raise InvalidArgumentError(
            f"self_replay is {n}, but there are {len(PROMPTS)} built-in replay prompts; set it to at most "
            f"{len(PROMPTS)}",
            param="self_replay",
        )
    return random.Random(seed).sample(list(PROMPTS), n)


def self_replay_rows(
    model: Any, tokenizer: Any, prompts: list[str], *, system_prompt: str | None, max_new_tokens: int
) -> list[dict[str, Any]]:
    """The base model's own greedy answers to ``prompts``, as prompt/completion conversations.
    Called before the adapter is attached, so the answers are the base's."""
    if not prompts:
        return []
    import torch

    conversations = [
        ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        + [{"role": "user", "content": p}]
        for p in prompts
    ]
    texts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # one batch: every prompt ends where generation starts
    try:
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
    finally:
        tokenizer.padding_side = side
    model.eval()
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    eos = _eos_ids(model, tokenizer)
    rows = []
    for conversation, generated in zip(conversations, out[:, encoded["input_ids"].shape[1] :], strict=True):
        ends = [i for i, token in enumerate(generated.tolist()) if token in eos]
        if not ends:  # cut off at max_new_tokens: it would teach the adapter to stop mid-sentence
            continue
        answer = tokenizer.decode(generated[: ends[0]], skip_special_tokens=True).strip()
        if answer:
            rows.append({"prompt": conversation, "completion": [{"role": "assistant", "content": answer}]})
    return rows


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return found
