"""`loraflow train`: a registered dataset version -> a LoRA/QLoRA adapter -> the adapter's next version.

- Examples are rendered with the base tokenizer's chat template, the one
  serving uses, as TRL prompt/completion conversations. So the loss covers
  only the final assistant turn *including* the template's end-of-turn token.
  Without that token an adapter never learns to stop (trl#5988, vllm#4180).
- Everything the registry would refuse after training is checked before any
  weights are loaded (:func:`preflight`): the adapter name, the rank against
  ``registry.max_lora_rank``, the target modules, the base against the
  adapter's registered one and the dataset's. The data are re-validated against
  the tokenizer (max_length) then too. A bad dataset never reaches the model.
- The base model's validation loss is measured before training (LoRA starts as
  the identity). Then training evaluates every ``eval_steps``, stops early on
  validation loss, and keeps the best checkpoint. A run shorter than
  ``eval_steps`` evaluates once, after training, and writes no checkpoint: the
  final model is the only candidate, so evaluating and saving it inside the
  loop (what transformers does at the last step) would only cost time.
- Only after everything succeeded is the adapter registered. Any failure
  registers nothing.
"""

from __future__ import annotations

import json
import math
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.registry import domain
from loraflow.registry.basemodel import BaseModelInfo, template_hash
from loraflow.registry.errors import (
    InvalidAdapterError,
    InvalidArgumentError,
    MissingDependencyError,
    NotFoundError,
)
from loraflow.registry.refs import check_name, parse_ref
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.trainer.cache import CachedRun, keep, lookup, run_key, split_digests
from loraflow.trainer.config import TrainConfig
from loraflow.trainer.data import validate_records
from loraflow.trainer.eval.heldout import generation_report
from loraflow.trainer.model import load_tokenizer, locate_base_model, token_counter
from loraflow.trainer.prepare import load_split
from loraflow.trainer.replay import replay_prompts, self_replay_rows

BASE_EVAL_FILE = "loraflow_base_eval.json"


@dataclass(frozen=True)
class TrainResult:
    version: domain.VersionInfo
    metrics: dict[str, Any]
    eval_report: dict[str, Any]


def _conversations(
    rows: list[dict[str, Any]], split: str, *, count: Any, max_length: int, system_prompt: str | None
) -> list[dict[str, Any]]:
    """Re-validate a split and turn it into TRL prompt/completion conversations."""
    checked = validate_records(
        enumerate(rows, start=1),
        Path(split),
        count_tokens=count,
        max_length=max_length,
        system_prompt=system_prompt,
    )
    if checked.errors:
        listed = "; ".join(str(e) for e in checked.errors[:10]) + (" …" if len(checked.errors) > 10 else "")
        raise InvalidArgumentError(
            f"dataset split {split!r} fails validation ({len(checked.errors)} rows): {listed}", param="data"
        )
    out = []
    for ex in checked.examples:
        messages = [m.model_dump() for m in ex.messages]
        out.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return out


def _progress_callback(report: Callable[[int, int], None] | None = None) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One bar: steps, ETA, and the latest train/eval loss. With ``report``, the caller draws
        the bar: it is told (steps done, steps in all) instead."""

        bar: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if report is not None:
                report(state.global_step, state.max_steps)
                return
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step", disable=None
            )  # only on a terminal

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if report is not None:
                report(state.global_step, state.max_steps)
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.bar is not None and logs:
                shown = {k: round(v, 4) for k, v in logs.items() if k in ("loss", "eval_loss")}
                if shown:
                    self.bar.set_postfix(shown)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _load_model(path: Path, *, qlora: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not qlora:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, quantization_config=quant, device_map={"": 0} if on_gpu else {"": "cpu"}
    )
    if not on_gpu:
        _keep_4bit_weights_trainable_on_cpu(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _keep_4bit_weights_trainable_on_cpu(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference during our eval passes.

    On CPUs with AVX512-BF16, a Linear4bit that runs in eval mode without grad
    (the baseline evaluation, every eval step) converts its weights to an
    inference-only layout. Later backward passes then go through ``gemv_4bit``,
    which has no autograd kernel, so gradients to earlier layers are silently
    wrong (torch warns "an autograd kernel was not registered").
    """
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _tokens(rows: list[dict[str, Any]], count: Any) -> int:
    """Tokens per epoch: every example rendered with the chat template."""
    return sum(int(count(row["prompt"] + row["completion"])) for row in rows)


class PeakMemory:
    """The peak memory of one training run, not of the whole process.

    On a GPU it is torch's peak allocation since the run began. On Linux it is the
    peak resident set size (VmHWM) after resetting it at the start of the run
    (``/proc/self/clear_refs``), so a long-lived process that trained, say, a bigger
    model before reports this run's peak. Elsewhere it falls back to the process
    peak (``ru_maxrss``), and ``scope`` says so.
    """

    def __init__(self) -> None:
        import torch

        self.on_gpu = torch.cuda.is_available()
        self.scope = "run"
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.scope = "process"

    def peak_bytes(self) -> int:
        import torch

        if self.on_gpu:
            return int(torch.cuda.max_memory_allocated())
        if self.scope == "run":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _StartStep:
    """Records the optimizer step training starts from: 0, or the checkpoint's when resuming."""

    def __init__(self) -> None:
        self.step: int | None = None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        recorder = self

        class StartStep(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                recorder.step = int(state.global_step)

        return StartStep()


def preflight(
    config: TrainConfig, *, registry: Registry, settings: Settings
) -> tuple[BaseModelInfo, domain.DatasetVersionInfo]:
    """Refuse, before any weights are loaded, a run whose adapter the registry would refuse at the end.
    Returns the located base model and the dataset version."""
    check_name(config.adapter, param="adapter")
    limits = settings.registry
    if config.r > limits.max_lora_rank:
        raise InvalidArgumentError(
            f"LoRA rank r={config.r} is above registry.max_lora_rank ({limits.max_lora_rank}), so the "
            "adapter could not be registered: lower r, or raise registry.max_lora_rank (at most the "
            "engine's server.max_lora_rank)",
            param="r",
        )
    if isinstance(config.target_modules, list):
        unsupported = sorted(set(config.target_modules) - set(limits.supported_target_modules))
        if unsupported:
            raise InvalidArgumentError(
                f"target_modules {unsupported} cannot be served (registry.supported_target_modules: "
                f"{', '.join(limits.supported_target_modules)})",
                param="target_modules",
            )
    base = locate_base_model(config.base)
    dataset = registry.get_dataset(config.data)
    prepared_on = dataset.lineage.get("base_model_fingerprint")
    if prepared_on and prepared_on != base.fingerprint:
        raise InvalidArgumentError(
            f"dataset {dataset.ref} was prepared with base {dataset.lineage.get('base_model')} (its token "
            f"lengths and drift profile count that tokenizer), not {base.id}: prepare it again with "
            f"--base-model {config.base}, or train on its base",
            param="base",
        )
    try:
        adapter = registry.get(config.adapter)
    except NotFoundError:
        return base, dataset
    if adapter.base_model_fingerprint != base.fingerprint:
        raise InvalidAdapterError(
            f"{adapter.name} is registered on base model {adapter.base_model}, not {base.id}: "
            "train it on that base, or choose a new adapter name",
            param="base",
        )
    return base, dataset


def _base_eval_loss(trainer: Any, *, continued: bool) -> float:
    """The base model's validation loss: a new LoRA starts as the identity, so the model as built;
    a continued one is switched off for it."""
    if not continued:
        return float(trainer.evaluate()["eval_loss"])
    with trainer.model.disable_adapter():
        return float(trainer.evaluate()["eval_loss"])


def _init_version(
    config: TrainConfig, *, registry: Registry, base: BaseModelInfo
) -> domain.VersionInfo | None:
    """The version ``config.init_from`` names, checked against the run: the same base, rank and alpha."""
    if config.init_from is None:
        return None
    version = registry.resolve(parse_ref(config.init_from, param="init_from"))
    registered_on = registry.get(version.adapter).base_model_fingerprint
    if registered_on != base.fingerprint:
        raise InvalidArgumentError(
            f"init_from {version.ref} is an adapter of another base model, not {base.id}", param="init_from"
        )
    if (version.rank, version.alpha) != (config.r, config.alpha):
        raise InvalidArgumentError(
            f"init_from {version.ref} has r={version.rank} and alpha={version.alpha:g}; set r and alpha to "
            f"those (this run asks for r={config.r}, alpha={config.alpha})",
            param="init_from",
        )
    return version


def _lora_config(config: TrainConfig) -> Any:
    """The PEFT adapter to train: rank, alpha, dropout, target modules (TrainConfig's LoRA fields)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )


def _total_steps(config: TrainConfig, train_examples: int) -> int:
    """The optimizer steps a run takes, counted as transformers' ``Trainer`` counts them."""
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(train_examples / config.batch_size)
    per_epoch = max(batches // config.grad_accum + int(batches % config.grad_accum > 0), 1)
    return math.ceil(config.epochs * per_epoch)


def _sft_args(
    config: TrainConfig, *, output_dir: Path, max_length: int, on_gpu: bool, periodic_eval: bool = True
) -> Any:
    """TRL's SFTConfig for a run: the schedule from the config, evaluation and a checkpoint every
    ``eval_steps`` keeping the best by validation loss (without ``periodic_eval``, neither),
    loss on completions only, and on CPU fp32 without pinned memory."""
    from trl.trainer.sft_config import SFTConfig

    periodic: dict[str, Any] = (
        {
            "eval_strategy": "steps",
            "eval_steps": config.eval_steps,
            "save_strategy": "steps",
            "save_steps": config.eval_steps,
            "save_total_limit": 2,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
        if periodic_eval
        else {"eval_strategy": "no", "save_strategy": "no"}
    )
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        **periodic,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        max_length=max_length,
        completion_only_loss=True,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=on_gpu,
        dataloader_pin_memory=on_gpu,
    )


def train(
    config: TrainConfig,
    *,
    registry: Registry,
    settings: Settings,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train, evaluate on the validation split, and register the adapter as the next version.
    ``progress`` is told (steps done, steps in all) as training goes; unset, a terminal gets a bar."""
    base, dataset = preflight(config, registry=registry, settings=settings)
    init = _init_version(config, registry=registry, base=base)
    if init is not None:  # recorded (and keyed) as the version it resolved to, never an alias
        config = config.model_copy(update={"init_from": init.ref})
    try:
        import peft  # noqa: F401  (checked here: _lora_config builds the adapter with it)
        import torch
        from datasets import Dataset
        from transformers import EarlyStoppingCallback, PrinterCallback, set_seed
        from trl.trainer.sft_trainer import SFTTrainer
    except ImportError as exc:
        raise MissingDependencyError("training needs pip install 'loraflow[train]'") from exc

    started = time.perf_counter()
    memory = PeakMemory()
    max_length = config.max_length or settings.trainer.max_length
    system_prompt = (
        config.system_prompt if config.system_prompt is not None else settings.trainer.system_prompt
    )
    cache_dir = settings.trainer.cache_dir
    key = ""
    if cache_dir is not None:
        digests = split_digests(registry, dataset)
        key = run_key(
            config,
            digests,
            base,
            max_length=max_length,
            system_prompt=system_prompt,
            init_digest=init.digest if init is not None else None,
        )
        if not resume and (kept := lookup(cache_dir, key)) is not None:
            return register_kept(config, kept, key=key, registry=registry, dataset=dataset)

    # 1. Everything that can be checked without weights (preflight above, and the data).
    tokenizer = load_tokenizer(base)
    count = token_counter(tokenizer)
    splits = {}
    for split in ("train", "val", "test"):
        splits[split] = _conversations(
            load_split(registry, dataset, split),
            split,
            count=count,
            max_length=max_length,
            system_prompt=system_prompt,
        )
    if not splits["train"]:
        raise InvalidArgumentError(f"dataset {dataset.ref} has no training examples", param="data")
    if not splits["val"]:
        raise InvalidArgumentError(
            f"dataset {dataset.ref} has no validation split; prepare it with --val-fraction > 0", param="data"
        )
    replay = replay_prompts(config.self_replay, seed=config.seed)

    # 2. The model.
    set_seed(config.seed)
    output_dir = config.output_dir or settings.home / "runs" / config.adapter
    output_dir.mkdir(parents=True, exist_ok=True)
    model = _load_model(base.path, qlora=config.qlora)
    base_weights_bytes = int(model.get_memory_footprint())  # NF4 under QLoRA: what it saves
    # Self-replay: the base's own answers, generated before the adapter exists (loraflow.trainer.replay).
    replayed = self_replay_rows(
        model, tokenizer, replay, system_prompt=system_prompt, max_new_tokens=config.max_new_tokens
    )
    splits["train"] = splits["train"] + replayed
    if init is not None:  # continued training: the version's adapter, trainable, instead of a new one
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            model, str(registry.fetch(init, output_dir / "init-adapter")), is_trainable=True
        )
    lora = _lora_config(config) if init is None else None  # continued: the loaded adapter is trained
    on_gpu = torch.cuda.is_available()
    periodic_eval = config.eval_steps < _total_steps(config, len(splits["train"]))
    args = _sft_args(
        config, output_dir=output_dir, max_length=max_length, on_gpu=on_gpu, periodic_eval=periodic_eval
    )
    start_step = _StartStep()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(splits["train"]),
        eval_dataset=Dataset.from_list(splits["val"]),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[
            *([EarlyStoppingCallback(config.early_stopping_patience)] if periodic_eval else []),
            _progress_callback(progress),
            start_step.callback(),
        ],
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar shows the losses instead of raw dicts

    # 3. Baseline: LoRA's B starts at zero, so this is the base model's validation loss.
    base_eval_file = output_dir / BASE_EVAL_FILE
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    resuming = resume and bool(checkpoints) and base_eval_file.is_file()
    # Continued training (init_from): the base is the model with the adapter off, and the loss the
    # run starts from is the version's.
    if resuming:
        start = json.loads(base_eval_file.read_text())
    else:
        start = {"base_eval_loss": _base_eval_loss(trainer, continued=init is not None)}
        if init is not None:
            start["init_eval_loss"] = float(trainer.evaluate()["eval_loss"])
        base_eval_file.write_text(json.dumps(start))
    base_eval_loss = float(start["base_eval_loss"])

    # 4. Train (or resume), keeping the best checkpoint.
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resuming else None)
    train_seconds = time.perf_counter() - train_started
    # With periodic evaluation the loop evaluated its last step and reloaded the best checkpoint,
    # whose loss is best_metric: evaluating it again would repeat a pass over the validation split.
    best = trainer.state.best_metric if periodic_eval else None
    eval_loss = float(best) if best is not None else float(trainer.evaluate()["eval_loss"])
    if not math.isfinite(eval_loss):
        raise InvalidArgumentError(
            f"training diverged (eval_loss={eval_loss}); lower learning_rate", param="learning_rate"
        )

    history = trainer.state.log_history
    train_tokens = _tokens(splits["train"], count)
    epochs_done = float(trainer.state.epoch or 0.0)
    metrics: dict[str, Any] = {
        "base_eval_loss": round(base_eval_loss, 6),
        **({"init_from": init.ref, "init_eval_loss": round(start["init_eval_loss"], 6)} if init else {}),
        "eval_loss": round(eval_loss, 6),
        "best_eval_loss": round(float(trainer.state.best_metric or eval_loss), 6),
        "train_loss": round(float(result.training_loss), 6),
        "loss_curve": [[h["step"], round(h["loss"], 6)] for h in history if "loss" in h],
        "eval_curve": [[h["step"], round(h["eval_loss"], 6)] for h in history if "eval_loss" in h],
        "steps": int(trainer.state.global_step),
        "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
        "epochs": round(epochs_done, 3),
        "tokens_per_second": round(train_tokens * epochs_done / train_seconds, 1) if train_seconds else None,
        "peak_memory_bytes": memory.peak_bytes(),
        "peak_memory_scope": memory.scope,
        "base_weights_bytes": base_weights_bytes,
        "self_replay_examples": len(replayed),
        "wall_time_s": None,  # filled below
        "resumed": resuming,
        "resumed_from_step": start_step.step if resuming else None,
        "device": "cuda" if on_gpu else "cpu",
    }

    # 5. Evaluate against the base model on held-out prompts, then register.
    held_out = splits["test"] or splits["val"]
    eval_report = generation_report(
        trainer.model, tokenizer, held_out[: config.eval_generations], max_new_tokens=config.max_new_tokens
    )
    eval_report["split"] = "test" if splits["test"] else "val"
    metrics["wall_time_s"] = round(time.perf_counter() - started, 2)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapter"
        peft_model: Any = trainer.model
        peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
        recorded = {"max_length": max_length, "system_prompt": system_prompt}
        template = template_hash(str(tokenizer.chat_template))
        version = registry.register(
            config.adapter,
            adapter_dir,
            base_model=config.base,
            task=config.task,
            dataset=dataset.ref,
            training_config=config.model_dump(mode="json") | recorded,
            metrics=metrics,
            eval_report=eval_report,
            chat_template_hash=template,
        )
        if cache_dir is not None:
            kept_as = recorded | {"metrics": metrics, "eval_report": eval_report, "trained_as": version.ref}
            keep(cache_dir, key, adapter_dir, kept_as | {"chat_template_hash": template})
    return TrainResult(version=version, metrics=metrics, eval_report=eval_report)


def register_kept(
    config: TrainConfig, kept: CachedRun, *, key: str, registry: Registry, dataset: domain.DatasetVersionInfo
) -> TrainResult:
    """Register a kept run (same config, data and base: loraflow.trainer.cache) as the next version."""
    record = kept.record
    metrics = dict(record["metrics"]) | {"reused_from": record["trained_as"], "cache_key": key}
    version = registry.register(
        config.adapter,
        kept.adapter_dir,
        base_model=config.base,
        task=config.task,
        dataset=dataset.ref,
        training_config=config.model_dump(mode="json")
        | {"max_length": record["max_length"], "system_prompt": record["system_prompt"]},
        metrics=metrics,
        eval_report=record["eval_report"],
        chat_template_hash=record["chat_template_hash"],
    )
    return TrainResult(version=version, metrics=metrics, eval_report=record["eval_report"])
