"""LoRA (and, where bitsandbytes is installed, QLoRA) training speed and memory on a bare CUDA host.

Such a host has torch, transformers and peft, no network, and no room to receive a model folder.
Speed and memory do not depend on the weights' values, so each model is built here from its
config with random weights: SmolLM2-135M-Instruct's (the model the CPU figures use) and a
Llama-3.1-8B-shaped one. The data are random token ids; the loss is over every token. What runs
per model is a plain PEFT loop with what loraflow's trainer configures (r 16, alpha 32, dropout
0.05, all linear layers, AdamW at 2e-4, bf16 weights on a GPU), without TRL (not installed
there): ``--warmup`` steps, then ``--steps`` timed ones.

Prints one JSON line per run, and writes them all to ``$OUT/gpu_trainer.json`` when ``OUT`` is set
(the device runner returns that folder). Run through bench/gpu_trainer.sh; ``--device cpu`` with
small ``--seq``/``--batch``/``--models smollm2`` checks the script itself on a machine with no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct's config.json (what `loraflow dev smollm2` writes).
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Llama-3.1-8B's shape (its config.json, without the rope scaling that only long contexts use).
    "llama-3.1-8b-shape": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
ALIASES = {"smollm2": "smollm2-135m", "llama8b": "llama-3.1-8b-shape"}


def build(name: str, *, dtype: torch.dtype, device: str, qlora: bool) -> Any:
    config = LlamaConfig(**CONFIGS[name])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype: no fp32 copy of an 8B model
    try:
        with torch.device("cpu" if qlora else device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if not qlora:
        return model
    # NF4 with double quantization, as loraflow's QLoRA loads a base: every linear layer but the
    # output one becomes a bitsandbytes Linear4bit over the random weights, quantized as it moves
    # to the device.
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                setattr(module, child_name, quantized)
    model = model.to(device)
    model.is_loaded_in_4bit = True  # what prepare_model_for_kbit_training and PEFT look for
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def run(name: str, args: argparse.Namespace, *, qlora: bool) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    device = args.device
    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(name, dtype=dtype, device=device, qlora=qlora)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    vocab = CONFIGS[name]["vocab_size"]
    generator = torch.Generator(device="cpu").manual_seed(0)

    def step() -> float:
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "model": name,
        "method": "qlora" if qlora else "lora",
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "tokens_per_second": round(args.batch * args.seq * args.steps / seconds, 1),
        "seconds_per_step": round(seconds / args.steps, 4),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if on_gpu else None,
        "trainable_parameters": trainable,
        "parameters": total,
        "last_loss": round(losses[-1], 4),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama8b"], choices=sorted(ALIASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    try:
        import bitsandbytes  # noqa: F401

        methods = [False, True]
    except ImportError:
        methods = [False]
        print(json.dumps({"qlora": "skipped: bitsandbytes is not installed on this host"}), flush=True)
    results = []
    for alias in args.models:
        for qlora in methods:
            try:
                result = run(ALIASES[alias], args, qlora=qlora)
            except torch.OutOfMemoryError as exc:
                result = {
                    "model": ALIASES[alias],
                    "method": "qlora" if qlora else "lora",
                    "error": str(exc)[:300],
                }
            results.append(result)
            print(json.dumps(result), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next model starts from an empty cache
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    out = os.environ.get("OUT")
    if out:
        text = json.dumps({"versions": versions, "runs": results}, indent=2)
        (Path(out) / "gpu_trainer.json").write_text(text)


if __name__ == "__main__":
    main()
