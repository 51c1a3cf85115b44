"""Held-out generation: the adapter against its base model, greedy, with the serving chat template.

For each held-out prompt it records whether the output matches the reference
exactly, whether the model stopped by itself (emitted the end-of-turn token
before ``max_new_tokens``, i.e. finish reason ``stop``), and, where the
references are JSON, whether the output parses as JSON with the same keys.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from typing import Any


def _json_keys(text: str) -> set[str] | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return set(value) if isinstance(value, dict) else None


def generate(
    model: Any, tokenizer: Any, prompt: list[dict[str, str]], *, max_new_tokens: int
) -> tuple[str, str]:
    """(text, finish_reason) for one conversation prompt; finish_reason is 'stop' or 'length'."""
    import torch

    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = {k: v.to(model.device) for k, v in ids.items()}
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    stopped = tokenizer.eos_token_id in new
    if stopped:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), "stop" if stopped else "length"


def _score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    exact = stops = json_ok = json_total = 0
    samples: list[dict[str, Any]] = []
    for row in rows:
        reference = row["completion"][0]["content"].strip()
        text, finish = generate(model, tokenizer, row["prompt"], max_new_tokens=max_new_tokens)
        exact += text == reference
        stops += finish == "stop"
        ref_keys = _json_keys(reference)
        if ref_keys is not None:
            json_total += 1
            json_ok += _json_keys(text) == ref_keys
        if len(samples) < 3:
            samples.append(
                {
                    "prompt": row["prompt"][-1]["content"],
                    "reference": reference,
                    "output": text,
                    "finish_reason": finish,
                }
            )
    n = max(len(rows), 1)
    return {
        "exact_match": round(exact / n, 4),
        "stop_rate": round(stops / n, 4),
        "json_format_rate": round(json_ok / json_total, 4) if json_total else None,
        "samples": samples,
    }


def generation_report(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, max_new_tokens: int
) -> dict[str, Any]:
    """Scores for the adapter and for the base (the same model with the adapter disabled)."""
    if not rows:
        return {"n": 0}
    was_training = model.training
    model.eval()
    try:
        adapter = _score(model, tokenizer, rows, max_new_tokens)
        disabled: AbstractContextManager[Any] = (
            model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        )
        with disabled:
            base = _score(model, tokenizer, rows, max_new_tokens)
    finally:
        model.train(was_training)
    return {"n": len(rows), "max_new_tokens": max_new_tokens, "adapter": adapter, "base": base}
