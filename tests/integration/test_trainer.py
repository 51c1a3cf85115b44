"""The trainer on the tiny local Llama, on CPU: data checks, LoRA and QLoRA runs, registration.

The task is synthetic field extraction as JSON. The base model is random, so it
produces neither JSON nor an end-of-turn token. A trained adapter must do both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app as loraflow_app
from loraflow.registry.errors import InvalidArgumentError, NotFoundError
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.trainer.config import TrainConfig
from loraflow.trainer.synthetic import make_rows, write_jsonl
from tests.services import Tiny
from tests.training_cache import TrainingCache

pytestmark = [pytest.mark.integration, pytest.mark.slow]
runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The session's tiny base, a registry, and the synthetic dataset prepared as orders@v1."""
    from loraflow.trainer.data import validate_for_base
    from loraflow.trainer.embed import Embedder
    from loraflow.trainer.prepare import prepare

    root = tmp_path_factory.mktemp("trainer")
    base = tiny.base
    settings = Settings(home=root / "home")
    reg = Registry.open(settings)
    data = write_jsonl(root / "orders.jsonl", make_rows(500, seed=0))
    validation = validate_for_base(data, str(base), max_length=256)
    dataset, report = prepare(validation, name="orders", registry=reg, seed=0, embedder=Embedder())
    yield {
        "root": root,
        "base": base,
        "settings": settings,
        "registry": reg,
        "dataset": dataset,
        "report": report,
        "data": data,
    }
    reg.close()


def _config(ws: dict[str, Any], **kw: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "adapter": "orders",
        "base": str(ws["base"]),
        "data": "orders@v1",
        "r": 16,
        "alpha": 32,
        "learning_rate": 3e-3,
        "epochs": 8,
        "batch_size": 16,
        "dropout": 0.0,
        "eval_steps": 25,
        "early_stopping_patience": 4,
        "eval_generations": 16,
        "max_new_tokens": 48,
        "seed": 0,
        "output_dir": ws["root"] / f"run-{kw.get('adapter', 'orders')}",
    }
    values.update(kw)
    return TrainConfig(**values)


@contextmanager
def recording_trainers() -> Iterator[list[Any]]:
    """Observe the SFTTrainer a run builds (its model, after training), without changing it."""
    import trl.trainer.sft_trainer as sft

    trainers: list[Any] = []

    class Recording(sft.SFTTrainer):  # type: ignore[misc]
        evaluations = 0  # passes over the validation split, inside the loop or not

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

        def evaluate(self, *args: Any, **kwargs: Any) -> Any:
            self.evaluations += 1
            return super().evaluate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "SFTTrainer", Recording)
        yield trainers


@pytest.fixture(scope="module")
def lora_run(workspace: dict[str, Any], training_cache: TrainingCache) -> Any:
    # Always trained (the test inspects the trainer); kept for e2e's orders@v1, the same recipe.
    with recording_trainers() as trainers:
        run = training_cache.train(
            _config(workspace), registry=workspace["registry"], settings=workspace["settings"], reuse=False
        )
    (trainer,) = trainers
    workspace["lora_model"] = trainer.model  # the PeftModel as training left it
    return run


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_prepare_dedups_splits_and_profiles(workspace: dict[str, Any]) -> None:
    ds, report = workspace["dataset"], workspace["report"]
    assert report["exact_duplicates_dropped"] > 0  # 500 draws from a small space repeat
    assert (
        sum(ds.counts.values())
        == 500 - report["exact_duplicates_dropped"] - report["near_duplicates_dropped"]
    )
    assert report["overlap_after_normalization"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert report["stratified_by_label"] is True
    assert ds.profile is not None
    assert ds.profile.tokens is not None and ds.profile.embedding is not None
    assert ds.profile.tokens.total > 0 and (ds.profile.tokens.max or 0) <= 256
    assert ds.profile.embedding.dim == 384 and len(ds.profile.embedding.centroid) == 384
    assert ds.lineage["kind"] == "file" and ds.lineage["seed"] == 0
    # Stratified: both labels appear in every split in about the input proportions.
    from loraflow.trainer.prepare import load_split

    for split in ("train", "val", "test"):
        labels = {row["label"] for row in load_split(workspace["registry"], ds, split)}
        assert labels == {"order", "return"}


def test_prepare_is_deterministic_and_near_dups_are_dropped(
    workspace: dict[str, Any], tmp_path: Path
) -> None:
    import random

    from loraflow.trainer.data import validate_file
    from loraflow.trainer.prepare import deduplicate, split

    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choices(vocab, k=40)) for _ in range(30)]
    near_copy = texts[3].split()
    near_copy[20] = "changed"
    rows = [{"prompt": t, "completion": "ok", "label": "a" if i % 2 else "b"} for i, t in enumerate(texts)]
    rows.append({"prompt": " ".join(near_copy), "completion": "ok", "label": "a"})
    rows.append({"prompt": texts[5].upper(), "completion": "ok", "label": "b"})  # exact after normalization
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples = validate_file(path).examples
    dedup = deduplicate(examples, threshold=0.7)
    assert dedup.near_dropped == [31]
    assert dedup.exact_dropped == [32]
    assert len(dedup.kept) == 30
    a = split(dedup.kept, val_fraction=0.2, test_fraction=0.2, seed=3)
    b = split(dedup.kept, val_fraction=0.2, test_fraction=0.2, seed=3)
    c = split(dedup.kept, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert [e.line for e in a["test"]] == [e.line for e in b["test"]]
    assert [e.line for e in a["test"]] != [e.line for e in c["test"]]


def test_lora_run_learns_the_format_and_to_stop(workspace: dict[str, Any], lora_run: Any) -> None:
    m, rep = lora_run.metrics, lora_run.eval_report
    assert m["eval_loss"] < m["base_eval_loss"]
    assert m["train_loss"] > 0 and m["tokens_per_second"] > 0
    assert m["loss_curve"] and m["eval_curve"] and m["wall_time_s"] > 0
    assert rep["adapter"]["json_valid"] >= 0.75
    assert rep["base"]["json_valid"] == 0.0
    assert rep["adapter"]["stop_rate"] >= 0.9
    assert rep["base"]["stop_rate"] < rep["adapter"]["stop_rate"]
    assert rep["adapter"]["token_f1"] > rep["base"]["token_f1"]
    assert rep["metrics"] == [
        "exact_match",
        "token_f1",
        "rouge_l",
        "json_valid",
        "stop_rate",
        "output_tokens",
        "latency_s",
    ]
    diff = rep["adapter_minus_base"]["json_valid"]
    assert diff["ci"][0] > 0  # the paired interval clears zero
    assert len(rep["examples"]) == rep["n"] == 16
    v = lora_run.version
    assert v.ref == "orders@v1" and v.dataset == "orders@v1"
    assert v.metrics == m and v.eval_report == rep
    assert v.chat_template_hash and len(v.chat_template_hash) == 64
    assert v.training_config is not None and v.training_config["learning_rate"] == 3e-3
    assert workspace["registry"].get("orders").base_model == str(workspace["base"].resolve())


def test_training_moved_only_the_lora_weights(workspace: dict[str, Any], lora_run: Any) -> None:
    """The model SFTTrainer trained: every base weight is bit-identical to the base on disk."""
    import torch
    from transformers import AutoModelForCausalLM

    pristine = AutoModelForCausalLM.from_pretrained(str(workspace["base"]), dtype=torch.float32).state_dict()
    trained = workspace["lora_model"].get_base_model().state_dict()
    base_weights = {k: v for k, v in trained.items() if "lora_" not in k}
    assert {k.replace(".base_layer", "") for k in base_weights} == set(pristine)
    for name, tensor in base_weights.items():
        torch.testing.assert_close(tensor, pristine[name.replace(".base_layer", "")], rtol=0, atol=0)
    lora_b = [t for k, t in trained.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero; all moved


def test_the_registered_adapter_emits_json_and_stops_by_itself(
    workspace: dict[str, Any], lora_run: Any, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.trainer.eval.heldout import generate
    from loraflow.trainer.prepare import load_split

    reg: Registry = workspace["registry"]
    folder = reg.fetch(lora_run.version, tmp_path / "adapter")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # nothing but LoRA matrices was saved
    trained = {
        k.replace(".default", ""): v for k, v in workspace["lora_model"].state_dict().items() if "lora_" in k
    }
    assert trained.keys() == weights.keys()  # the registered files are exactly what training produced
    for key, tensor in weights.items():
        torch.testing.assert_close(tensor, trained[key], rtol=0, atol=0)

    base = AutoModelForCausalLM.from_pretrained(str(workspace["base"]), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(workspace["base"]))
    held_out = load_split(reg, workspace["dataset"], "test")[:8]
    results = []
    for row in held_out:
        prompt = row["messages"][:-1]
        answer = generate(model, tokenizer, prompt, max_new_tokens=48)
        with model.disable_adapter():
            base = generate(model, tokenizer, prompt, max_new_tokens=48)
        results.append((answer.text, answer.finish_reason, base.text, base.finish_reason))
    stops = [finish for _, finish, _, _ in results]
    assert stops.count("stop") >= 7, results
    assert sum(_is_order_json(text) for text, *_ in results) >= 6, results
    assert not any(_is_order_json(base_text) for _, _, base_text, _ in results)
    assert all(base_finish == "length" for *_, base_finish in results)


def _is_order_json(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"name", "city", "qty"}


def test_qlora_run(workspace: dict[str, Any], lora_run: Any) -> None:
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit

    from loraflow.trainer.train import train

    with recording_trainers() as trainers:
        run = train(
            _config(workspace, adapter="orders-qlora", qlora=True, learning_rate=5e-3, epochs=12),
            registry=workspace["registry"],
            settings=workspace["settings"],
        )
    model = trainers[0].model
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(quantized) == 14  # every linear projection of both layers is 4-bit
    for module in quantized.values():
        assert isinstance(module.weight, Params4bit) and module.weight.quant_type == "nf4"
        assert module.weight.dtype == torch.uint8 and not module.weight.requires_grad
        assert module.weight.quant_state.nested  # double quantization
    lora_wrapped = [n for n, m in model.named_modules() if type(m).__module__ == "peft.tuners.lora.bnb"]
    assert len(lora_wrapped) == 14  # and LoRA runs on top of each
    m, rep = run.metrics, run.eval_report
    assert run.version.training_config is not None and run.version.training_config["qlora"] is True
    assert m["eval_loss"] < m["base_eval_loss"]
    assert rep["adapter"]["json_valid"] >= 0.75 and rep["base"]["json_valid"] == 0.0
    assert rep["adapter"]["stop_rate"] >= 0.9
    assert m["base_weights_bytes"] < lora_run.metrics["base_weights_bytes"]  # NF4 weights held


def test_invalid_dataset_is_refused_before_weights_load(
    workspace: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import loraflow.trainer.train as train_mod

    def no_weights(*_: object, **__: object) -> None:
        raise AssertionError("model weights were loaded for an invalid dataset")

    monkeypatch.setattr(train_mod, "_load_model", no_weights)
    with pytest.raises(InvalidArgumentError) as info:
        train_mod.train(
            _config(workspace, adapter="too-long", max_length=20),
            registry=workspace["registry"],
            settings=workspace["settings"],
        )
    assert "too many tokens" in info.value.message and info.value.param == "data"
    with pytest.raises(NotFoundError):
        workspace["registry"].get("too-long")


def test_a_failure_after_training_registers_nothing(
    workspace: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import loraflow.trainer.train as train_mod

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(train_mod, "generation_report", broken)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train_mod.train(
            _config(workspace, adapter="crashes", max_steps=5, eval_steps=5),
            registry=workspace["registry"],
            settings=workspace["settings"],
        )
    with pytest.raises(NotFoundError):
        workspace["registry"].get("crashes")


def test_resume_continues_from_the_last_checkpoint(workspace: dict[str, Any]) -> None:
    """10 steps, then --resume to 20, ends where 20 straight steps end: it picked up the
    checkpoint's weights, optimizer state and place in the data, and ran only the rest."""
    from safetensors.torch import load_file

    from loraflow.trainer.train import train

    reg: Registry = workspace["registry"]
    run = {"eval_steps": 5, "eval_generations": 0, "lr_scheduler": "constant"}
    first = train(
        _config(workspace, adapter="resumed", max_steps=10, **run),
        registry=reg,
        settings=workspace["settings"],
    )
    second = train(
        _config(workspace, adapter="resumed", max_steps=20, **run),
        registry=reg,
        settings=workspace["settings"],
        resume=True,
    )
    straight = train(
        _config(workspace, adapter="straight", max_steps=20, **run),
        registry=reg,
        settings=workspace["settings"],
    )
    assert (first.metrics["resumed"], first.metrics["resumed_from_step"]) == (False, None)
    assert (second.metrics["resumed"], second.metrics["resumed_from_step"]) == (True, 10)
    assert second.metrics["steps"] == straight.metrics["steps"] == 20
    assert second.metrics["base_eval_loss"] == first.metrics["base_eval_loss"]
    assert [v.version for v in reg.get("resumed").versions] == [1, 2]

    def weights(version: Any, name: str) -> dict[str, Any]:
        folder = reg.fetch(version, workspace["root"] / "fetched" / name)
        return dict(load_file(str(folder / "adapter_model.safetensors")))

    resumed, uninterrupted, after_ten = (
        weights(second.version, "resumed"),
        weights(straight.version, "straight"),
        weights(first.version, "first"),
    )
    import torch

    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(after_ten[k], uninterrupted[k]) for k in uninterrupted)  # it trained on


def test_peak_memory_is_the_runs_not_the_processes(workspace: dict[str, Any]) -> None:
    """A process that once held more than this run needs reports this run's peak."""
    from loraflow.trainer.train import train

    ballast = bytearray(2 * 1024**3)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page: the process's high-water mark rises by 2 GiB
    high_water = _vm_hwm()
    del ballast
    before_run = _rss()
    run = train(
        _config(workspace, adapter="memory", max_steps=3, eval_steps=3, eval_generations=0),
        registry=workspace["registry"],
        settings=workspace["settings"],
    )
    peak = run.metrics["peak_memory_bytes"]
    assert run.metrics["peak_memory_scope"] == "run"
    assert before_run <= peak < high_water - 1024**3


def test_cli_validate_reports_every_bad_line(workspace: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    long_prompt = " ".join(["word"] * 80)
    bad.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "hi", "completion": "there"}),
                "{not json",
                json.dumps({"question": "?"}),
                json.dumps({"prompt": "", "completion": "x"}),
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "a"},
                            {"role": "user", "content": "b"},
                            {"role": "assistant", "content": "c"},
                        ]
                    }
                ),
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "a"},
                            {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"},
                        ]
                    }
                ),
                json.dumps({"instruction": "x", "output": "y"}),
                json.dumps({"prompt": long_prompt, "completion": "x"}),
                json.dumps({"instruction": "do it"}),
            ]
        )
        + "\n"
    )
    result = runner.invoke(
        loraflow_app, ["data", "validate", str(bad), "--base", str(workspace["base"]), "--max-length", "40"]
    )
    assert result.exit_code == 2
    lines = {
        int(line.split(":")[1]): line for line in result.output.splitlines() if line.startswith(str(bad))
    }
    assert sorted(lines) == [2, 3, 4, 5, 6, 8, 9]
    assert "invalid JSON" in lines[2]
    assert "unknown format" in lines[3]
    assert "field 'prompt' is empty" in lines[4]
    assert "bad role order" in lines[5]
    assert "last message must be the assistant's" in lines[6]
    assert "too many tokens" in lines[8] and "max_length 40" in lines[8]
    assert "missing field 'output'" in lines[9]


def test_cli_validate_good_file_prints_token_stats(workspace: dict[str, Any]) -> None:
    result = runner.invoke(
        loraflow_app, ["data", "validate", str(workspace["data"]), "--base", str(workspace["base"]), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["examples"] == 500 and summary["bad_lines"] == 0
    assert summary["tokens"]["total"] > summary["tokens"]["max"] > 0


def test_train_config_errors_name_the_field(tmp_path: Path) -> None:
    from loraflow.trainer.config import build_config

    cfg = tmp_path / "train.yaml"
    cfg.write_text("adapter: x\nbase: b\ndata: d\nr: 0\n")
    with pytest.raises(InvalidArgumentError) as info:
        build_config(cfg, {})
    assert info.value.param == "r"
    cfg.write_text("adapter: x\nbase: b\ndata: d\nlearning_rte: 0.1\n")
    with pytest.raises(InvalidArgumentError) as info:
        build_config(cfg, {})
    assert info.value.param == "learning_rte"
    toml = tmp_path / "train.toml"
    toml.write_text('adapter = "x"\nbase = "b"\ndata = "d"\nepochs = 2\n')
    assert build_config(toml, {"epochs": 5.0, "r": None}).epochs == 5.0


def test_early_stopping_keeps_the_best_checkpoint(workspace: dict[str, Any]) -> None:
    from loraflow.trainer.data import validate_for_base
    from loraflow.trainer.prepare import prepare
    from loraflow.trainer.train import train

    data = write_jsonl(workspace["root"] / "small.jsonl", make_rows(120, seed=0))
    prepare(
        validate_for_base(data, str(workspace["base"]), max_length=256),
        name="small",
        registry=workspace["registry"],
        val_fraction=0.2,
    )
    run = train(
        _config(
            workspace,
            adapter="early",
            data="small",
            lr_scheduler="constant",
            learning_rate=0.01,
            epochs=40,
            eval_steps=5,
            early_stopping_patience=2,
            eval_generations=0,
        ),
        registry=workspace["registry"],
        settings=workspace["settings"],
    )
    m = run.metrics
    planned = 40 * -(-workspace["registry"].get_dataset("small").counts["train"] // 16)
    assert m["steps"] < planned  # stopped early
    curve = [loss for _, loss in m["eval_curve"]]
    assert m["best_eval_loss"] == min(curve)
    assert m["eval_loss"] == m["best_eval_loss"]
    assert int(m["best_checkpoint"].split("-")[1]) < m["steps"]
    # The best checkpoint was reloaded: what is registered is its adapter, not the last step's.
    from safetensors.torch import load_file

    registered = workspace["registry"].fetch(run.version, workspace["root"] / "fetched-early")
    best = workspace["root"] / "run-early" / m["best_checkpoint"]
    import torch

    for key, tensor in load_file(str(best / "adapter_model.safetensors")).items():
        torch.testing.assert_close(load_file(str(registered / "adapter_model.safetensors"))[key], tensor)


def test_a_run_shorter_than_eval_steps_evaluates_once_after_training(workspace: dict[str, Any]) -> None:
    """No evaluation or checkpoint inside the loop (the final model is the only candidate); the
    validation loss is measured once after training, and the run still learned."""
    from loraflow.trainer.train import train

    with recording_trainers() as trainers:
        run = train(
            _config(workspace, adapter="short", max_steps=6, eval_steps=20, eval_generations=0),
            registry=workspace["registry"],
            settings=workspace["settings"],
        )
    m = run.metrics
    assert m["steps"] == 6 and m["eval_curve"] == [[6, m["eval_loss"]]] and m["best_checkpoint"] is None
    assert not list((workspace["root"] / "run-short").glob("checkpoint-*"))
    assert trainers[0].evaluations == 2  # the base model's, then the adapter's
    assert m["eval_loss"] < m["base_eval_loss"]


def test_cli_train_and_tiny_model(workspace: dict[str, Any], tmp_path: Path) -> None:
    result = runner.invoke(loraflow_app, ["dev", "tiny-model", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "tiny").iterdir()
    }

    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"adapter: cli-run\nbase: {workspace['base']}\ndata: orders@v1\neval_generations: 0\n"
        f"output_dir: {tmp_path / 'run'}\nepochs: 9\n"
    )
    env = {"LORAFLOW_HOME": str(workspace["settings"].home)}
    result = runner.invoke(
        loraflow_app,
        [
            *("train", "--config", str(cfg), "--max-steps", "4", "--eval-steps", "2"),
            "--r",
            "4",
            "--alpha",
            "8",
            "--json",
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["ref"] == "cli-run@v1" and printed["metrics"]["steps"] == 4 and printed["rank"] == 4
    v = workspace["registry"].get_version("cli-run", 1)
    assert v.rank == 4 and v.metrics is not None and v.metrics["steps"] == 4
    assert v.training_config is not None and v.training_config["epochs"] == 9.0

    result = runner.invoke(loraflow_app, ["train", "--config", str(cfg), "--r", "0"], env=env)
    assert result.exit_code == 2 and "training config: r:" in result.output
    result = runner.invoke(loraflow_app, ["train", "--config", str(cfg), "--r", "0", "--json"], env=env)
    assert result.exit_code == 2 and json.loads(result.stdout)["error"]["code"] == "invalid_argument"

    args = ["data", "prepare", str(workspace["data"]), "--name", "cli-prep", "--no-embeddings", "--json"]
    result = runner.invoke(loraflow_app, [*args, "--base-model", str(workspace["base"])], env=env)
    assert result.exit_code == 0, result.output
    prepared = json.loads(result.stdout)
    assert prepared["ref"] == "cli-prep@v1" and sum(prepared["counts"].values()) > 0
    assert "exact_duplicates_dropped" in prepared["report"]


def test_recorded_template_hash_matches_the_base_folder(workspace: dict[str, Any], lora_run: Any) -> None:
    from loraflow.registry.basemodel import chat_template_hash

    assert lora_run.version.chat_template_hash == chat_template_hash(workspace["base"])


def test_trainer_cache_registers_a_kept_run_instead_of_training_again(
    workspace: dict[str, Any], tmp_path: Path
) -> None:
    """``trainer.cache_dir``: the same recipe under another adapter and output folder is registered
    from the kept files (no trainer is built); a changed recipe, or an entry whose record was never
    written (a copy cut short), trains."""
    from loraflow.trainer.train import train

    settings: Settings = workspace["settings"]
    kept = tmp_path / "kept"
    cached = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"cache_dir": kept})})
    reg = workspace["registry"]
    config = _config(workspace, adapter="kept-a", max_steps=3, eval_steps=20, eval_generations=0)
    with recording_trainers() as trainers:
        first = train(config, registry=reg, settings=cached)
        again = _config(
            workspace,
            adapter="kept-b",
            max_steps=3,
            eval_steps=20,
            eval_generations=0,
            output_dir=tmp_path / "b",
        )
        second = train(again, registry=reg, settings=cached)
        assert len(trainers) == 1
        assert second.version.digest == first.version.digest  # the same adapter files
        assert second.metrics["reused_from"] == first.version.ref == "kept-a@v1"
        assert second.metrics["eval_loss"] == first.metrics["eval_loss"]
        assert second.version.training_config is not None
        assert second.version.training_config["adapter"] == "kept-b"
        assert second.version.chat_template_hash == first.version.chat_template_hash

        train(again.model_copy(update={"learning_rate": 1e-3}), registry=reg, settings=cached)
        assert len(trainers) == 2  # another recipe
        entry = kept / second.metrics["cache_key"]
        (entry / "run.json").unlink()
        # (Under a third name: the same seeded run gives kept-b's files, which it holds already.)
        third = train(again.model_copy(update={"adapter": "kept-c"}), registry=reg, settings=cached)
        assert len(trainers) == 3 and "reused_from" not in third.metrics
        assert (entry / "run.json").is_file()  # kept again
    unset = train(again.model_copy(update={"adapter": "kept-d"}), registry=reg, settings=settings)
    assert "reused_from" not in unset.metrics  # no cache_dir: it trains


def test_init_from_continues_training_from_a_registered_version(
    workspace: dict[str, Any], lora_run: Any
) -> None:
    """``init_from``: the run starts from the version's weights (its first loss is that version's
    validation loss), the base loss is measured with the adapter off, and the version records the
    one it started from, by number even when named by alias. A rank that differs is refused first."""
    from loraflow.trainer.train import train

    reg, settings = workspace["registry"], workspace["settings"]
    start = lora_run.version
    with pytest.raises(InvalidArgumentError) as err:
        train(_config(workspace, adapter="warm", init_from=start.ref, r=8), registry=reg, settings=settings)
    assert err.value.param == "init_from"
    with pytest.raises(NotFoundError):
        reg.get("warm")  # nothing registered
    run = train(
        _config(
            workspace, adapter="warm", init_from=start.ref, max_steps=2, eval_steps=20, eval_generations=0
        ),
        registry=reg,
        settings=settings,
    )
    m = run.metrics
    assert m["init_from"] == start.ref and run.version.training_config is not None
    assert run.version.training_config["init_from"] == start.ref
    assert m["init_eval_loss"] == pytest.approx(lora_run.metrics["eval_loss"], abs=1e-3)
    assert m["base_eval_loss"] == pytest.approx(lora_run.metrics["base_eval_loss"], abs=1e-4)
    assert m["init_eval_loss"] < m["base_eval_loss"]  # it did not start from a new adapter
