"""Test data built from scratch: base-model folders and PEFT-format adapters.

The adapter writer produces the exact PEFT file contract (adapter_config.json +
adapter_model.safetensors, real safetensors bytes) without a tensor library, so
unit and store tests stay fast. Real PEFT-made adapters are used in the
integration tier (see conftest.peft_adapters).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The installed console script, as a user runs it (beside this interpreter, in the venv).
LORAFLOW = Path(sys.executable).parent / "loraflow"


def run_loraflow(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``loraflow ARGS`` as a subprocess in ``cwd``, with this environment plus ``env``."""
    return subprocess.run(
        [str(LORAFLOW), *args],
        cwd=cwd,
        env=os.environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.contextmanager
def no_loraflow_env() -> Iterator[None]:
    """LORAFLOW_* cleared for a module-scoped fixture (the autouse isolated_env is per test), so a
    developer's settings never reach it; restored afterwards."""
    import pytest

    with pytest.MonkeyPatch.context() as env:
        for name in [n for n in os.environ if n.startswith("LORAFLOW_")]:
            env.delenv(name)
        yield


# The reason tests give when they promote random adapters, which have no eval report, past the gate.
FORCED = "test fixture: a random adapter with no eval report"
FORCE = ("--force", "--reason", FORCED)  # the same, on the command line

BASE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
}

SHAPES = {  # (in, out) for BASE_CONFIG
    "q_proj": (128, 128),
    "k_proj": (128, 64),
    "v_proj": (128, 64),
    "o_proj": (128, 128),
    "gate_proj": (128, 256),
    "up_proj": (128, 256),
    "down_proj": (256, 128),
}
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


def make_base(path: Path, *, config: dict[str, Any] | None = None, tokenizer: str = "tok-v1") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or BASE_CONFIG))
    (path / "tokenizer.json").write_text(json.dumps({"model": tokenizer}))
    return path


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, (shape, data) in tensors.items():
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _, data in tensors.values():
            fh.write(data)


def make_adapter(
    path: Path,
    *,
    r: int = 8,
    seed: int = 0,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: int = 2,
    shapes: dict[str, tuple[int, int]] | None = None,
    config: dict[str, Any] | None = None,
    extra_tensors: dict[str, list[int]] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """A PEFT LoRA adapter folder; ``seed`` changes the bytes (and so the digest)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shapes = shapes or SHAPES
    tensors: dict[str, tuple[list[int], bytes]] = {}
    for layer in range(layers):
        for module in modules:
            block = "self_attn" if module in ATTN else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            n_in, n_out = shapes[module]
            tensors[f"{prefix}.lora_A.weight"] = ([r, n_in], rng.randbytes(4 * r * n_in))
            tensors[f"{prefix}.lora_B.weight"] = ([n_out, r], rng.randbytes(4 * r * n_out))
    for key, shape in (extra_tensors or {}).items():
        n = 1
        for d in shape:
            n *= d
        tensors[key] = (shape, rng.randbytes(4 * n))
    write_safetensors(path / "adapter_model.safetensors", tensors)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": list(modules),
        "base_model_name_or_path": base_model_name_or_path,
        "use_dora": False,
        "modules_to_save": None,
        "bias": "none",
    }
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Peru": "Lima"}


def write_lm_eval_tasks(folder: Path, *, output_type: str = "generate_until") -> Path:
    """A capitals task over a local JSONL file, as a user would write one for offline data."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "capitals.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is the capital of {c}?", "answer": a}) + "\n"
            for c, a in CAPITALS.items()
        )
    )
    body = {
        "task": "loraflow_capitals",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": output_type,
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    if output_type == "generate_until":  # BLEU too: scored over the corpus, not per example
        body["metric_list"].append({"metric": "bleu", "aggregation": "bleu", "higher_is_better": True})
    if output_type == "multiple_choice":
        body["doc_to_choice"] = list(CAPITALS.values())
        body["doc_to_target"] = 0
        body["metric_list"] = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    # YAML is a superset of JSON.
    (folder / "capitals.yaml").write_text(json.dumps(body))
    return folder


def gate_report(
    version: int,
    *,
    production: int | None,
    gain_base: tuple[float, float, float] = (0.8, 0.7, 0.9),
    gain_prod: tuple[float, float, float] | None = None,
    regression_diff: float = 0.0,
    json_valid: float = 1.0,
) -> dict[str, Any]:
    """The parts of a `loraflow eval` report the gate reads."""
    from loraflow.registry.refs import version_ref

    def cmp(g: tuple[float, float, float]) -> dict[str, Any]:
        return {"exact_match": {"diff": g[0], "ci": [g[1], g[2]]}}

    comparisons = {"base": cmp(gain_base)} | ({"production": cmp(gain_prod)} if gain_prod else {})
    return {
        "schema": 1,
        "candidate": version_ref("support", version),
        "primary_metric": "exact_match",
        "confidence": 0.95,
        "metrics": ["exact_match", "json_valid"],
        "systems": {"candidate": {"metrics": {"json_valid": {"mean": json_valid, "ci": None}}}},
        "comparisons": comparisons,
        "regression": {
            "suite": "builtin-general",
            "metric": "token_f1",
            "comparisons": {k: {"diff": regression_diff, "ci": None} for k in comparisons},
        },
        "production": {"version": production} if production else None,
    }


def register_dataset(
    reg: Any,
    name: str,
    folder: Path,
    *,
    marker: str = "",
    counts: dict[str, int] | None = None,
    lineage: dict[str, Any] | None = None,
    profile: dict[str, Any] | None = None,
) -> Any:
    """A dataset version registered through the ``Registry`` facade over real split files: a
    train split of one example (``marker`` in it, so different markers give different digests)
    with the ``counts``, ``lineage`` and ``profile`` a test wants to see."""
    from loraflow.registry.drift import Profile

    folder.mkdir(parents=True, exist_ok=True)
    row = {"messages": [{"role": "user", "content": f"q {marker}"}, {"role": "assistant", "content": "a"}]}
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    return reg.register_dataset(
        name,
        folder,
        ("train.jsonl",),
        counts=counts or {"train": 1},
        lineage=lineage or {},
        profile=Profile.model_validate(profile) if profile is not None else None,
    )


def served_record(
    at: Any, *, adapter: str, version: int, prompt: str, answer: str, **fields: Any
) -> dict[str, Any]:
    """A served, sampled request record as the gateway's recorder writes it (``fields`` override
    any of its keys: a status, a shadow answer, ``sampled``)."""
    from loraflow.registry.traffic import new_request_id

    return {
        "request_id": new_request_id(at),
        "at": at.isoformat(),
        "adapter": adapter,
        "version": version,
        "endpoint": "/v1/chat/completions",
        "request": {"messages": [{"role": "user", "content": prompt}]},
        "response": [{"index": 0, "content": answer, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 5},
        "latency_s": 0.1,
        "status": 200,
        "error": None,
        "stream": False,
        "key": None,
        "sampled": True,
    } | fields


def write_traffic(
    store: Any, kind: Any, records: list[dict[str, Any]], redactor: Any
) -> list[dict[str, Any]]:
    """``records`` into a traffic store the one way there is, through its redacting boundary (as the
    gateway's writer writes them); returns them as stored."""
    batch = store.redact(kind, records, redactor)
    assert batch.dropped == 0
    store.write(batch)
    return list(batch.records)
