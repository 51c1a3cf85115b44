"""Benchmark: loraflow's trainer (LoRA, QLoRA) against plain TRL ``SFTTrainer`` with its defaults.

Same tiny Llama, same data: 500 synthetic order-extraction rows, prepared once into a registry;
every system trains on its train split, rendered with the same chat template. Each run is a
fresh process, so peak memory is that run's alone:

- ``loraflow_lora``, ``loraflow_qlora``: `loraflow.trainer.train` with TrainConfig's defaults
  (3 epochs, r 16, batch 8, evaluation every 20 steps on the validation split).
- ``loraflow_lora_eval_off``: the same LoRA run with no evaluation (so no checkpoint) during
  training: what the training steps alone cost, against what the defaults' evaluations add.
- ``trl_default``: ``SFTTrainer(model=PATH, args=SFTConfig(output_dir=...), train_dataset=...)``,
  nothing else set but ``use_cpu`` where there is no GPU (TRL refuses to start without it):
  full fine-tuning, 3 epochs, batch 8.
- ``trl_default_lora``: the same, plus ``peft_config=LoraConfig(task_type="CAUSAL_LM")``
  (PEFT's defaults: r 8 on q_proj and v_proj), TRL's documented LoRA recipe.

Tokens/s: tokens of the train split (chat template applied) x epochs done / seconds inside
``trainer.train()``, the way loraflow reports it (its periodic evaluations and checkpoints count
against it; TRL's defaults have neither). Peak memory: the process's peak resident set (VmHWM)
over the run, from model load to the end, reset after imports (``/proc/self/clear_refs``).
Targets: loraflow at least as fast as TRL's defaults, and QLoRA lower in peak memory.
Writes bench/results/trainer.json and trainer.png.

    .venv/bin/python bench/trainer.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_common import peak_reset, peak_rss, save  # noqa: E402

SYSTEMS = ("loraflow_lora", "loraflow_qlora", "loraflow_lora_eval_off", "trl_default", "trl_default_lora")
ROWS = 500


def prepare_world(root: Path) -> None:
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings
    from loraflow.trainer.data import validate_for_base
    from loraflow.trainer.prepare import prepare
    from loraflow.trainer.synthetic import make_rows, write_jsonl
    from loraflow.trainer.tiny import build_tiny_model

    base = build_tiny_model(root / "base")
    registry = Registry.open(Settings(home=root / "home"))
    try:
        data = write_jsonl(root / "orders.jsonl", make_rows(ROWS, seed=0))
        prepare(validate_for_base(data, str(base), max_length=256), name="orders", registry=registry)
    finally:
        registry.close()


def worker(system: str, root: Path) -> dict[str, Any]:
    """One run in this (fresh) process."""
    import torch  # noqa: F401  (imported before the peak is reset, as every system imports it)
    import trl  # noqa: F401

    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings

    settings = Settings(home=root / "home")
    registry = Registry.open(settings)
    try:
        if system.startswith("loraflow"):
            from loraflow.trainer.config import TrainConfig
            from loraflow.trainer.train import train

            config = TrainConfig(
                adapter=system.replace("_", "-"),
                base=str(root / "base"),
                data="orders@v1",
                qlora=system == "loraflow_qlora",
                output_dir=root / system,
                # eval_off: no validation pass (nor checkpoint) during training: the steps alone.
                **({"eval_steps": 10**6} if system.endswith("eval_off") else {}),
            )
            peak_reset()
            run = train(config, registry=registry, settings=settings)
            return {
                "tokens_per_second": run.metrics["tokens_per_second"],
                "peak_memory_bytes": peak_rss(),
                "steps": run.metrics["steps"],
                "epochs": run.metrics["epochs"],
                "eval_loss": run.metrics["eval_loss"],
            }
        return _trl(system, root, registry, settings)
    finally:
        registry.close()


def _trl(system: str, root: Path, registry: Any, settings: Any) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from loraflow.trainer.model import load_tokenizer, locate_base_model, token_counter
    from loraflow.trainer.prepare import load_split
    from loraflow.trainer.train import _conversations

    tokenizer = load_tokenizer(locate_base_model(str(root / "base")))
    count = token_counter(tokenizer)
    rows = _conversations(
        load_split(registry, registry.get_dataset("orders@v1"), "train"),
        "train",
        count=count,
        max_length=settings.trainer.max_length,
        system_prompt=settings.trainer.system_prompt,
    )
    tokens = sum(int(count(r["prompt"] + r["completion"])) for r in rows)
    peak_reset()
    trainer = SFTTrainer(
        model=str(root / "base"),
        # TRL's defaults, but for the one setting it refuses to start without on a machine with no GPU.
        args=SFTConfig(output_dir=str(root / system), use_cpu=not torch.cuda.is_available()),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM") if system == "trl_default_lora" else None,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    epochs = float(trainer.state.epoch or 0.0)
    return {
        "tokens_per_second": round(tokens * epochs / seconds, 1),
        "peak_memory_bytes": peak_rss(),
        "steps": int(trainer.state.global_step),
        "epochs": round(epochs, 3),
        "train_loss": round(float(trainer.state.log_history[-1].get("train_loss", float("nan"))), 6),
    }


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 3.8))
    speed.barh(names, [runs[n]["tokens_per_second"] for n in names], color="tab:blue")
    speed.set_xlabel("train tokens / s")
    memory.barh(names, [runs[n]["peak_memory_bytes"] / 2**20 for n in names], color="tab:green")
    memory.set_xlabel("peak resident memory of the run, MiB")
    fig.suptitle(f"trainer vs TRL SFTTrainer defaults, tiny Llama on {result['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer.json")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.root)), flush=True)
        return

    import torch

    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_world(root)
        for system in SYSTEMS:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", system, "--root", str(root)],
                capture_output=True,
                text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
            )
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not found:
                raise SystemExit(f"{system} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            runs[system] = json.loads(found[-1][len("RESULT ") :])
            print(system, runs[system], flush=True)

    trl = runs["trl_default"]
    verdicts = {
        f"{s}_speed_vs_trl_default": {
            "value": round(runs[s]["tokens_per_second"] / trl["tokens_per_second"], 3),
            "target": ">= 1.0",
            "met": runs[s]["tokens_per_second"] >= trl["tokens_per_second"],
        }
        for s in ("loraflow_lora", "loraflow_qlora")
    }
    verdicts["qlora_peak_memory_vs_trl_default"] = {
        "value": round(runs["loraflow_qlora"]["peak_memory_bytes"] / trl["peak_memory_bytes"], 3),
        "target": "< 1.0",
        "met": runs["loraflow_qlora"]["peak_memory_bytes"] < trl["peak_memory_bytes"],
    }
    result = {
        "what": "training throughput and peak memory: loraflow LoRA/QLoRA vs plain TRL SFTTrainer defaults",
        "task": f"synthetic order extraction as JSON, {ROWS} rows, tiny Llama (2 layers, hidden 128)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        + ("CUDA" if torch.cuda.is_available() else "no GPU"),
        "verdicts": verdicts,
        "runs": runs,
    }
    save(result, args.out, plot)
    print(json.dumps(verdicts, indent=2))


if __name__ == "__main__":
    main()
