"""Benchmark: loraflow's trainer against plain TRL + PEFT on a real model, same config, data, batch.

SmolLM2-135M-Instruct (converted by ``loraflow dev smollm2``), the synthetic order-extraction task
(``loraflow.trainer.synthetic``), prepared once into a registry. Every system trains on that train
split, in the same conversational rows (loraflow's ``_conversations``: the model's own chat
template, loss on the answer), for the same ``--steps`` optimizer steps of batch ``--batch``, with
the same LoRA (r 16, alpha 32, dropout 0.05, all linear layers), learning rate, seed and
``max_length``. Each run is a fresh process, so its peak memory is its own:

- ``loraflow_lora``, ``loraflow_qlora``: ``loraflow.trainer.train`` with evaluation off during
  training (``eval_steps`` past the end, so no checkpoint either) and no held-out generations;
  the validation passes before and after training stay (they are outside the timed part).
- ``trl_peft_lora``, ``trl_peft_qlora``: ``SFTTrainer(model, args=SFTConfig(...), peft_config=
  LoraConfig(...))``, the model loaded by ``AutoModelForCausalLM`` in fp32 on CPU (bf16 has no
  kernels here), for QLoRA with ``BitsAndBytesConfig`` NF4 + double quantization and PEFT's
  ``prepare_model_for_kbit_training``, as TRL's QLoRA recipe does.

Tokens/s: tokens of the train split (chat template applied) x epochs done / seconds inside
``trainer.train()``, the same formula for every system (it is the one loraflow reports).
Memory: the peak resident set (VmHWM) from just before the model is loaded to the end, and the
model's own footprint (``get_memory_footprint()``: weights and buffers, after quantization).
Each system runs ``--repeats`` times, interleaved with the others (a slow spell of this shared
machine then hits every system); the figures are each system's median run by tokens/s, with every
run's tokens/s and peak listed. Targets (issue 25): loraflow >= 0.95 x TRL's tokens/s, for LoRA and
for QLoRA; QLoRA's memory well below LoRA's (the base's weights, and the run's peak).
Writes bench/results/trainer_smollm2.json and .png.

    .venv/bin/loraflow dev smollm2 /tmp/smollm2      # once; ~25 s
    .venv/bin/python bench/trainer_smollm2.py --model /tmp/smollm2   # ~16 min here
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

SYSTEMS = ("loraflow_lora", "trl_peft_lora", "loraflow_qlora", "trl_peft_qlora")
ROWS = 120
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
LEARNING_RATE = 2e-4
MAX_LENGTH = 256
SEED = 0


def prepare_world(root: Path, model: Path) -> None:
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings
    from loraflow.trainer.data import validate_for_base
    from loraflow.trainer.prepare import prepare
    from loraflow.trainer.synthetic import make_rows, write_jsonl

    registry = Registry.open(Settings(home=root / "home"))
    try:
        data = write_jsonl(root / "orders.jsonl", make_rows(ROWS, seed=0))
        prepare(validate_for_base(data, str(model), max_length=MAX_LENGTH), name="orders", registry=registry)
    finally:
        registry.close()


def worker(system: str, root: Path, model: Path, steps: int, batch: int) -> dict[str, Any]:
    """One run in this (fresh) process."""
    import torch
    import trl  # noqa: F401  (imported before the peak is reset, as every system imports it)

    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings

    torch.manual_seed(SEED)
    settings = Settings(home=root / "home")
    registry = Registry.open(settings)
    try:
        if system.startswith("loraflow"):
            from loraflow.trainer.config import TrainConfig
            from loraflow.trainer.train import train

            config = TrainConfig(
                adapter=system.replace("_", "-"),
                base=str(model),
                data="orders@v1",
                qlora=system.endswith("qlora"),
                r=LORA["r"],
                alpha=LORA["alpha"],
                dropout=LORA["dropout"],
                target_modules=LORA["target_modules"],
                max_steps=steps,
                batch_size=batch,
                learning_rate=LEARNING_RATE,
                max_length=MAX_LENGTH,
                seed=SEED,
                eval_steps=10**6,  # no evaluation (nor checkpoint) during training
                eval_generations=0,
                output_dir=root / system,
            )
            peak_reset()
            run = train(config, registry=registry, settings=settings)
            return {
                "tokens_per_second": run.metrics["tokens_per_second"],
                "peak_memory_bytes": peak_rss(),
                "model_footprint_bytes": run.metrics["base_weights_bytes"],
                "steps": run.metrics["steps"],
                "epochs": run.metrics["epochs"],
                "train_loss": run.metrics["train_loss"],
            }
        return _trl(system, root, registry, settings, model, steps, batch)
    finally:
        registry.close()


def _trl(
    system: str, root: Path, registry: Any, settings: Any, model_path: Path, steps: int, batch: int
) -> dict[str, Any]:
    """Plain TRL + PEFT + transformers; loraflow only reads the same train split as its rows."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from loraflow.trainer.model import token_counter  # the measurement, not the training: as loraflow counts
    from loraflow.trainer.prepare import load_split
    from loraflow.trainer.train import _conversations

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    count = token_counter(tokenizer)
    rows = _conversations(
        load_split(registry, registry.get_dataset("orders@v1"), "train"),
        "train",
        count=count,
        max_length=MAX_LENGTH,
        system_prompt=settings.trainer.system_prompt,
    )
    tokens = sum(count(r["prompt"] + r["completion"]) for r in rows)
    peak_reset()
    if system.endswith("qlora"):
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"}
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    footprint = int(model.get_memory_footprint())
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(root / system),
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=LEARNING_RATE,
            max_length=MAX_LENGTH,
            completion_only_loss=True,
            seed=SEED,
            data_seed=SEED,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,  # SFTConfig's default is True; loraflow trains in fp32 on a CPU (no bf16 kernels)
            dataloader_pin_memory=False,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    epochs = float(trainer.state.epoch or 0.0)
    return {
        "tokens_per_second": round(tokens * epochs / seconds, 1),
        "peak_memory_bytes": peak_rss(),
        "model_footprint_bytes": footprint,
        "steps": int(trainer.state.global_step),
        "epochs": round(epochs, 3),
        "train_loss": round(float(result.training_loss), 6),
    }


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    colors = ["tab:blue" if n.startswith("loraflow") else "tab:gray" for n in names]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 3.6))
    speed.barh(names, [runs[n]["tokens_per_second"] for n in names], color=colors)
    speed.set_xlabel("train tokens / s (higher is better)")
    memory.barh(names, [runs[n]["peak_memory_bytes"] / 2**20 for n in names], color=colors, alpha=0.45)
    memory.barh(names, [runs[n]["model_footprint_bytes"] / 2**20 for n in names], color=colors)
    memory.set_xlabel("MiB: the run's peak RSS (light), the base's weights (dark)")
    fig.suptitle(
        f"loraflow vs TRL + PEFT, same LoRA config and batch, SmolLM2-135M-Instruct on {result['machine']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the folder `loraflow dev smollm2` wrote")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (12: one epoch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per system, interleaved; the median")
    parser.add_argument("--only", choices=SYSTEMS, nargs="+", default=list(SYSTEMS))
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer_smollm2.json")
    args = parser.parse_args()
    model = args.model.resolve()
    if args.worker:
        print(
            "RESULT " + json.dumps(worker(args.worker, args.root, model, args.steps, args.batch)), flush=True
        )
        return
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model {model}: no config.json; run `loraflow dev smollm2 {model}` first")

    import torch

    samples: dict[str, list[dict[str, Any]]] = {system: [] for system in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_world(root, model)
        for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits all
            for system in args.only:
                command = [sys.executable, __file__, "--worker", system, "--root", str(root)]
                command += ["--model", str(model), "--steps", str(args.steps), "--batch", str(args.batch)]
                started = time.perf_counter()
                done = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    env={k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
                )
                found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not found:
                    raise SystemExit(f"{system} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                sample = json.loads(found[-1][len("RESULT ") :])
                sample["process_wall_s"] = round(time.perf_counter() - started, 1)
                samples[system].append(sample)
                print(repeat, system, sample, flush=True)
    runs: dict[str, Any] = {}
    for system, got in samples.items():  # the median run by tokens/s, with every run's figures
        median = sorted(got, key=lambda r: r["tokens_per_second"])[len(got) // 2]
        runs[system] = {
            **median,
            "tokens_per_second_runs": [r["tokens_per_second"] for r in got],
            "peak_memory_bytes_runs": [r["peak_memory_bytes"] for r in got],
        }

    verdicts: dict[str, Any] = {}
    for kind in ("lora", "qlora"):
        ours, theirs = runs.get(f"loraflow_{kind}"), runs.get(f"trl_peft_{kind}")
        if ours and theirs:
            ratio = ours["tokens_per_second"] / theirs["tokens_per_second"]
            verdicts[f"{kind}_speed_vs_trl_peft"] = {
                "value": round(ratio, 3),
                "target": ">= 0.95",
                "met": ratio >= 0.95,
            }
    for who in ("loraflow", "trl_peft"):
        lora, qlora = runs.get(f"{who}_lora"), runs.get(f"{who}_qlora")
        if lora and qlora:
            weights = qlora["model_footprint_bytes"] / lora["model_footprint_bytes"]
            verdicts[f"{who}_qlora_base_weights_vs_lora"] = {
                "value": round(weights, 3),
                "target": "severalfold smaller (< 0.5)",
                "met": weights < 0.5,
            }
            peak = qlora["peak_memory_bytes"] / lora["peak_memory_bytes"]
            verdicts[f"{who}_qlora_peak_memory_vs_lora"] = {
                "value": round(peak, 3),
                "target": "well below 1.0 (< 0.8)",
                "met": peak < 0.8,
            }
    result = {
        "what": "training throughput and peak memory: loraflow LoRA/QLoRA vs plain TRL + PEFT, same config",
        "task": f"synthetic order extraction as JSON ({ROWS} rows before the split), SmolLM2-135M-Instruct, "
        f"{args.steps} steps of batch {args.batch}, LoRA {LORA}, lr {LEARNING_RATE}, fp32; "
        f"median of {args.repeats} interleaved runs per system",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        + ("CUDA" if torch.cuda.is_available() else "no GPU"),
        "verdicts": verdicts,
        "runs": runs,
    }
    save(result, args.out, plot)
    print(json.dumps(verdicts, indent=2))


if __name__ == "__main__":
    main()
