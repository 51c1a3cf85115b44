"""What `loraflow train` refuses before any weights load, and a registry that is read, never created."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from loraflow.registry.basemodel import resolve_base_model
from loraflow.registry.drift import Profile
from loraflow.registry.errors import (
    InvalidAdapterError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.trainer.config import TrainConfig
from loraflow.trainer.prepare import DATA_FILES, write_dataset_files
from loraflow.trainer.train import preflight, train
from tests.factories import make_adapter, make_base

pytestmark = pytest.mark.unit

ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _dataset(registry: Registry, tmp_path: Path, name: str, lineage: dict[str, Any]) -> str:
    folder = tmp_path / f"ds-{name}"
    folder.mkdir()
    write_dataset_files(folder, {"train": [ROW], "val": [ROW]}, Profile(), {})
    return registry.register_dataset(
        name, folder, DATA_FILES, counts={"train": 1, "val": 1, "test": 0}, lineage=lineage, profile=None
    ).ref


def _config(**fields: Any) -> TrainConfig:
    return TrainConfig.model_validate({"adapter": "orders", "base": "nowhere", "data": "orders"} | fields)


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"adapter": "bad name"}, "adapter", "invalid name 'bad name'"),
        ({"r": 128}, "r", "r=128 is above registry.max_lora_rank (64)"),
        (
            {"target_modules": ["q_proj", "embed_tokens"]},
            "target_modules",
            "['embed_tokens'] cannot be served",
        ),
    ],
)
def test_what_the_registry_would_refuse_is_refused_first(
    registry: Registry, settings: Settings, fields: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        preflight(_config(**fields), registry=registry, settings=settings)
    assert caught.value.param == param and says in caught.value.message


def test_train_refuses_a_bad_name_before_it_loads_or_writes_anything(
    registry: Registry, settings: Settings
) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid name"):
        train(_config(adapter="bad name"), registry=registry, settings=settings)
    assert not (settings.home / "runs").exists()  # no checkpoints left behind


def test_the_base_must_be_the_datasets_and_the_adapters(
    registry: Registry, settings: Settings, tmp_path: Path
) -> None:
    base = make_base(tmp_path / "base")
    other = make_base(tmp_path / "other", tokenizer="tok-v2")
    fingerprint = resolve_base_model(str(base)).fingerprint
    data = _dataset(
        registry, tmp_path, "orders", {"base_model": str(base), "base_model_fingerprint": fingerprint}
    )
    located, dataset = preflight(_config(base=str(base), data=data), registry=registry, settings=settings)
    assert (located.fingerprint, dataset.ref) == (fingerprint, data)

    with pytest.raises(InvalidArgumentError, match="was prepared with base") as caught:
        preflight(_config(base=str(other), data=data), registry=registry, settings=settings)
    assert caught.value.param == "base"

    unprepared = _dataset(registry, tmp_path, "legacy", {})  # older datasets record no base: not checked
    registry.register("orders", make_adapter(tmp_path / "a"), base_model=str(base))
    with pytest.raises(InvalidAdapterError, match="orders is registered on base model"):
        preflight(_config(base=str(other), data=unprepared), registry=registry, settings=settings)


def test_a_read_only_open_creates_no_database(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "typo")
    with pytest.raises(NotFoundError, match=f"no registry database at {tmp_path / 'typo' / 'registry.db'}"):
        Registry.open(settings, create=False)
    assert not (tmp_path / "typo").exists()
    Registry.open(settings).close()  # a command that writes creates it
    Registry.open(settings, create=False).close()


def test_a_home_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidArgumentError, match="set LORAFLOW_HOME") as caught:
        Registry.open(Settings(home=tmp_path / "afile" / "home"))
    assert caught.value.param == "home"


def test_a_database_server_that_cannot_be_reached_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(database_url=f"postgresql://u:secret@127.0.0.1:{port}/registry")
    with pytest.raises(UnavailableError) as caught:
        Registry.open(settings)
    assert f"cannot connect to the registry database at 127.0.0.1:{port}/registry" in caught.value.message
    assert "secret" not in caught.value.message and caught.value.param == "database_url"
    assert os.linesep not in caught.value.message
