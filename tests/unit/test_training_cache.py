"""The session's training cache: the same recipe trains once, anything that changes the weights trains
again, and a reused run is registered in the asking registry as a run of its own config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.factories import make_adapter, make_base
from tests.training_cache import TrainingCache

pytestmark = pytest.mark.unit


class FakeTrain:
    """Stands in for ``trainer.train.train``: registers a new random adapter per call."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, 0

    def __call__(self, config: Any, *, registry: Registry, settings: Settings) -> Any:
        from loraflow.trainer.train import TrainResult

        self.calls += 1
        files = make_adapter(self.root / f"run{self.calls}", seed=self.calls)
        metrics, report = {"eval_loss": 1.0 / self.calls}, {"adapter": {"json_valid": 1.0}}
        version = registry.register(
            config.adapter,
            files,
            base_model=config.base,
            dataset=config.data,
            training_config=config.model_dump(mode="json")
            | {"max_length": config.max_length or settings.trainer.max_length, "system_prompt": None},
            metrics=metrics,
            eval_report=report,
        )
        return TrainResult(version=version, metrics=metrics, eval_report=report)


def registry_with(home: Path, name: str, rows: list[str]) -> Registry:
    reg = Registry.open(Settings(home=home))
    folder = home.parent / f"{name}-{home.name}"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        lines = [
            {"messages": [{"role": "user", "content": r}, {"role": "assistant", "content": split}]}
            for r in rows
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "profile.json").write_text(json.dumps({"home": home.name}))  # not read by training
    (folder / "report.json").write_text("{}")
    files = ("train.jsonl", "val.jsonl", "test.jsonl", "profile.json", "report.json")
    reg.register_dataset(name, folder, files, counts={"train": len(rows)}, lineage={}, profile=None)
    return reg


def test_the_same_recipe_trains_once(tmp_path: Path) -> None:
    from loraflow.trainer.config import TrainConfig

    base = str(make_base(tmp_path / "base"))
    fake = FakeTrain(tmp_path / "runs")
    cache = TrainingCache(root=tmp_path / "cache")
    first = registry_with(tmp_path / "home1", "orders", ["a", "b"])
    second = registry_with(tmp_path / "home2", "tickets", ["a", "b"])  # the same rows, another name
    config = TrainConfig(adapter="orders", base=base, data="orders", seed=0, output_dir=tmp_path / "out1")

    trained = cache.train(config, registry=first, settings=first.settings, run=fake)
    again = config.model_copy(
        update={"adapter": "support", "data": "tickets@v1", "output_dir": tmp_path / "out2"}
    )
    reused = cache.train(again, registry=second, settings=second.settings, run=fake)
    assert (fake.calls, cache.trained, cache.reused) == (1, 1, 1)
    assert reused.version.digest == trained.version.digest and reused.version.ref == "support@v1"
    key = cache.recipe(config, registry=first, settings=first.settings)
    said = {"reused_from": "orders@v1", "cache_key": key}  # as train() says of a run it found kept
    assert (reused.metrics, reused.eval_report) == (trained.metrics | said, trained.eval_report)
    assert reused.version.dataset == "tickets@v1" and reused.version.metrics == trained.metrics | said
    recorded = reused.version.training_config or {}
    assert (recorded["adapter"], recorded["output_dir"], recorded["max_length"]) == (
        "support",
        str(tmp_path / "out2"),
        second.settings.trainer.max_length,
    )

    # Whatever changes the weights trains again: the seed, a hyperparameter, the rows, the base.
    cache.train(config.model_copy(update={"seed": 1}), registry=first, settings=first.settings, run=fake)
    cache.train(config.model_copy(update={"r": 4}), registry=first, settings=first.settings, run=fake)
    other_rows = registry_with(tmp_path / "home3", "orders", ["a", "c"])
    cache.train(config, registry=other_rows, settings=other_rows.settings, run=fake)
    other_base = str(make_base(tmp_path / "base2", tokenizer="tok-v2"))
    on_other_base = again.model_copy(update={"adapter": "support-b2", "base": other_base})
    cache.train(on_other_base, registry=second, settings=second.settings, run=fake)
    assert (fake.calls, cache.reused) == (5, 1)

    # reuse=False trains even when the recipe is known.
    cache.train(again, registry=second, settings=second.settings, run=fake, reuse=False)
    assert (fake.calls, cache.reused) == (6, 1)
    for reg in (first, second, other_rows):
        reg.close()
