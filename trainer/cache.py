"""Trained adapters kept by what made them, so the same run is not trained twice.

``trainer.cache_dir`` set, a run's key is the sha256 of its recipe (:func:`run_key`): the training
config less what names the run rather than shapes it (the adapter's name, the dataset's name, the
task, the output folder), what it takes from the settings, the rows of the dataset's splits, and the
base model's fingerprint and weights. A finished run copies its adapter
files, metrics and eval report under the key; a later run with the same key registers those as
the next version instead of training, its metrics saying which run they came from. The demo uses
it so that a second ``loraflow demo`` does not repeat four training runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.registry import domain
from loraflow.registry.artifacts import sha256_file
from loraflow.registry.basemodel import BaseModelInfo
from loraflow.registry.service import Registry
from loraflow.trainer.config import TrainConfig

# Fields that name the run, not what it trains: two runs that differ only here train the same weights.
_NAMING = ("adapter", "data", "output_dir", "task")
_RECORD = "run.json"


@dataclass(frozen=True)
class CachedRun:
    adapter_dir: Path  # adapter_config.json + adapter_model.safetensors
    record: dict[str, Any]  # metrics, eval_report, chat_template_hash, max_length, system_prompt, from


def split_digests(registry: Registry, dataset: domain.DatasetVersionInfo) -> dict[str, str]:
    """sha256 of each split's rows (a dataset version's own digest also covers its report, which
    names the file it was prepared from: the same rows from another folder would not match)."""
    from loraflow.trainer.prepare import SPLITS

    return {s: hashlib.sha256(registry.dataset_split(dataset, s)).hexdigest() for s in SPLITS}


def run_key(
    config: TrainConfig,
    splits: dict[str, str],
    base: BaseModelInfo,
    *,
    max_length: int,
    system_prompt: str | None,
    init_digest: str | None = None,
) -> str:
    """The sha256 of everything a seeded run's weights depend on: the config (less what only names
    the run), what it takes from the settings (``max_length``, ``system_prompt``), the digest of
    each split (:func:`split_digests`), the base model's fingerprint and weight files, and the
    digest of the adapter it starts from (``init_from``, which the key holds by content, not name)."""
    shape = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NAMING}
    shape["init_from"] = init_digest
    recipe = {
        "config": shape,
        "settings": {"max_length": max_length, "system_prompt": system_prompt},
        "data": splits,
        "base": base.fingerprint,
        "weights": weights_digest(base.path),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def weights_digest(folder: Path) -> dict[str, str]:
    """sha256 of each weight file (the fingerprint covers config and tokenizer, not weights)."""
    return {
        p.name: _sha256_file(p.resolve(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.glob("*.safetensors"))
    }


@functools.lru_cache(maxsize=64)
def _sha256_file(path: Path, size: int, mtime_ns: int) -> str:  # size, mtime: a rewritten file is new
    return sha256_file(path)


def lookup(cache_dir: Path, key: str) -> CachedRun | None:
    folder = cache_dir / key
    try:
        record = json.loads((folder / _RECORD).read_text())
    except (OSError, json.JSONDecodeError):  # absent, or a copy cut short: train again
        return None
    return CachedRun(adapter_dir=folder / "adapter", record=record)


def keep(cache_dir: Path, key: str, adapter_dir: Path, record: dict[str, Any]) -> None:
    """Copy a finished run in: staged in a temporary folder, then renamed into place whole."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".partial-") as tmp:
        staged = Path(tmp) / key
        shutil.copytree(adapter_dir, staged / "adapter")
        (staged / _RECORD).write_text(json.dumps(record, indent=2, default=str))
        target = cache_dir / key
        if target.is_dir() and not (target / _RECORD).is_file():  # no record: a broken entry
            shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run kept this key first: the same weights
            staged.rename(target)
