"""Identical training runs happen once per test run.

Training is seeded, so a run is a function of its recipe (``loraflow.trainer.cache.run_key``): the
training config (less the adapter's name, the dataset's name, the task and the output folder), the
settings it falls back on, the dataset's content and the base model's files. ``training_cache`` (a session
fixture, registered in ``tests/conftest.py`` through ``pytest_plugins``) keeps the adapter files
and the recorded metrics and eval report of each run by the sha256 of that recipe, the way
``trainer.cache_dir`` keeps them (``loraflow.trainer.cache``). A second run of the same recipe, in any
registry, registers the kept files as ``train()`` registers a kept run (the version's own config names
this run's adapter and output folder; its metrics add ``reused_from`` and ``cache_key``) instead of
training again.

``reuse=False`` always trains (a test that inspects the trainer or the run itself); its result
is still kept for later runs of the same recipe. The cache lives for one test run only: a trainer
change is always trained on at least once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import Settings
    from loraflow.trainer.config import TrainConfig
    from loraflow.trainer.train import TrainResult


def _resolved(config: TrainConfig, settings: Settings) -> dict[str, Any]:
    """What a run takes from the settings when its config leaves it unset (train() records these)."""
    return {
        "max_length": config.max_length or settings.trainer.max_length,
        "system_prompt": config.system_prompt
        if config.system_prompt is not None
        else settings.trainer.system_prompt,
    }


@dataclass
class TrainingCache:
    root: Path
    trained: int = 0
    reused: int = 0

    def recipe(self, config: TrainConfig, *, registry: Registry, settings: Settings) -> str:
        """The sha256 of everything a seeded run's result depends on (the trainer's own cache key)."""
        from loraflow.registry.basemodel import resolve_base_model
        from loraflow.registry.refs import parse_ref
        from loraflow.trainer.cache import run_key, split_digests

        init = registry.resolve(parse_ref(config.init_from)) if config.init_from else None
        return run_key(
            config,
            split_digests(registry, registry.get_dataset(config.data)),
            resolve_base_model(config.base),
            **_resolved(config, settings),
            init_digest=init.digest if init is not None else None,
        )

    def train(
        self,
        config: TrainConfig,
        *,
        registry: Registry,
        settings: Settings,
        reuse: bool = True,
        run: Callable[..., TrainResult] | None = None,
    ) -> TrainResult:
        """``loraflow.trainer.train.train(config, registry=…, settings=…)``, or its earlier result,
        kept and registered again the way ``trainer.cache_dir`` does (:mod:`loraflow.trainer.cache`)."""
        from loraflow.trainer.cache import keep, lookup
        from loraflow.trainer.train import register_kept
        from loraflow.trainer.train import train as real_train

        key = self.recipe(config, registry=registry, settings=settings)
        kept = lookup(self.root, key)
        if kept is None or not reuse:
            result = (run or real_train)(config, registry=registry, settings=settings)
            self.trained += 1
            if kept is None:
                with tempfile.TemporaryDirectory() as tmp:
                    files = registry.fetch(result.version, Path(tmp) / "adapter")
                    record = _resolved(config, settings) | {
                        "metrics": result.metrics,
                        "eval_report": result.eval_report,
                        "trained_as": result.version.ref,
                        "chat_template_hash": result.version.chat_template_hash,
                    }
                    keep(self.root, key, files, record)
            return result
        self.reused += 1
        return register_kept(
            config, kept, key=key, registry=registry, dataset=registry.get_dataset(config.data)
        )


@pytest.fixture(scope="session")
def training_cache(tmp_path_factory: pytest.TempPathFactory) -> TrainingCache:
    return TrainingCache(root=tmp_path_factory.mktemp("training-cache"))
