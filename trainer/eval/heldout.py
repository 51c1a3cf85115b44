"""Training's end-of-run evaluation: the adapter against its bare base, through PEFT ``generate``.

Greedy, with the serving chat template. The scoring is :mod:`loraflow.trainer.eval.scoring`,
the same scorers ``loraflow eval`` uses on vLLM's answers; only the generator
differs (the model still in memory, so a run reports without starting an engine).
Every held-out output is kept, so the same prompts can be checked against vLLM later.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from loraflow.trainer.eval.scoring import Bootstrap, Generation, Reference, ScoredSystem, Task


def generate(model: Any, tokenizer: Any, prompt: list[dict[str, str]], *, max_new_tokens: int) -> Generation:
    """Greedy generation for one conversation prompt; finish_reason is 'stop' or 'length'."""
    import torch

    started = time.perf_counter()
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
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        finish_reason="stop" if stopped else "length",
        output_tokens=len(new) + int(stopped),
        latency_s=round(time.perf_counter() - started, 4),
    )


def _references(rows: list[dict[str, Any]]) -> list[Reference]:
    return [Reference(text=row["completion"][0]["content"].strip(), label=row.get("label")) for row in rows]


def generation_report(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, max_new_tokens: int
) -> dict[str, Any]:
    """Scores for the adapter and for the base (the same model with the adapter disabled)."""
    if not rows:
        return {"n": 0}
    references = _references(rows)
    task = Task.infer(references)
    was_training = model.training
    model.eval()
    try:
        adapter = [generate(model, tokenizer, r["prompt"], max_new_tokens=max_new_tokens) for r in rows]
        disabled: AbstractContextManager[Any] = (
            model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
        )
        with disabled:
            base = [generate(model, tokenizer, r["prompt"], max_new_tokens=max_new_tokens) for r in rows]
    finally:
        model.train(was_training)
    scored = {
        "adapter": ScoredSystem(task, references, adapter),
        "base": ScoredSystem(task, references, base),
    }
    bootstrap = Bootstrap()
    return {
        "n": len(rows),
        "max_new_tokens": max_new_tokens,
        "generator": "peft",
        "metrics": list(task.metrics),
        "adapter": scored["adapter"].means(),
        "base": scored["base"].means(),
        "intervals": {name: bootstrap.summary(s) for name, s in scored.items()},
        "adapter_minus_base": bootstrap.compare(scored["adapter"], scored["base"]),
        "examples": [
            {
                "prompt": row["prompt"],
                "reference": ref.text,
                "adapter": {"text": a.text, "finish_reason": a.finish_reason},
                "base": {"text": b.text, "finish_reason": b.finish_reason},
            }
            for row, ref, a, b in zip(rows, references, adapter, base, strict=True)
        ],
    }
