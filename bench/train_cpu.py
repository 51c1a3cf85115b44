"""Benchmark: LoRA and QLoRA training of the tiny Llama on this CPU (issue: "each under a minute").

Runs the same pipeline as `loraflow train` (validate -> prepare -> SFTTrainer ->
held-out eval -> register) and writes bench/results/train_cpu.json with wall
time, tokens/s, peak memory and the quality numbers for each mode.

    .venv/bin/python bench/train_cpu.py
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.trainer.config import TrainConfig
from loraflow.trainer.data import validate_for_base
from loraflow.trainer.prepare import prepare
from loraflow.trainer.synthetic import make_rows, write_jsonl
from loraflow.trainer.tiny import build_tiny_model
from loraflow.trainer.train import train

ROOT = Path(__file__).resolve().parents[1]

MODES = {
    "lora": {"qlora": False, "learning_rate": 3e-3, "epochs": 8},
    "qlora": {"qlora": True, "learning_rate": 5e-3, "epochs": 12},
}


def main() -> None:
    import torch

    results: dict[str, object] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "task": "synthetic order extraction as JSON, 500 rows, tiny Llama (2 layers, hidden 128)",
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "base")
        settings = Settings(home=root / "home")
        reg = Registry.open(settings)
        data = write_jsonl(root / "orders.jsonl", make_rows(500, seed=0))
        v = validate_for_base(data, str(base), max_length=256)
        prepare(v, name="orders", registry=reg)
        for mode, overrides in MODES.items():
            config = TrainConfig(
                adapter=f"bench-{mode}",
                base=str(base),
                data="orders@v1",
                r=16,
                alpha=32,
                batch_size=16,
                dropout=0.0,
                eval_steps=25,
                early_stopping_patience=4,
                max_new_tokens=48,
                output_dir=root / mode,
                **overrides,
            )
            started = time.perf_counter()
            run = train(config, registry=reg, settings=settings)
            m, rep = run.metrics, run.eval_report
            results["runs"][mode] = {  # type: ignore[index]
                "wall_time_s": round(time.perf_counter() - started, 2),
                "steps": m["steps"],
                "tokens_per_second": m["tokens_per_second"],
                "peak_memory_bytes": m["peak_memory_bytes"],
                "base_eval_loss": m["base_eval_loss"],
                "eval_loss": m["eval_loss"],
                "json_valid": rep["adapter"]["json_valid"],
                "base_json_valid": rep["base"]["json_valid"],
                "stop_rate": rep["adapter"]["stop_rate"],
                "base_stop_rate": rep["base"]["stop_rate"],
                "under_a_minute": time.perf_counter() - started < 60,
            }
        reg.close()
    out = ROOT / "bench" / "results" / "train_cpu.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["runs"], indent=2))


if __name__ == "__main__":
    main()
