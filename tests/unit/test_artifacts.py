"""The content-addressed store, on a local folder and on an fsspec object store (memory://)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from loraflow.registry.artifacts import MANIFEST, ArtifactStore, digest_of, sha256_file
from loraflow.registry.errors import IntegrityError, NotFoundError

pytestmark = pytest.mark.unit


def _files(path: Path, content: bytes = b"weights") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    (path / "adapter_model.safetensors").write_bytes(content)
    return path


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    return ArtifactStore(f"memory://loraflow-{uuid.uuid4().hex}")


NAMES = ("adapter_config.json", "adapter_model.safetensors")


def test_digest_depends_on_names_and_bytes(store: ArtifactStore, tmp_path: Path) -> None:
    a = store.put(_files(tmp_path / "a"), NAMES)
    assert store.put(_files(tmp_path / "b"), NAMES).digest == a.digest
    assert store.put(_files(tmp_path / "c", b"other"), NAMES).digest != a.digest
    files = {n: sha256_file(tmp_path / "a" / n) for n in NAMES}
    assert a.digest == digest_of(files)
    assert store.exists(a.digest)


def test_fetch_verifies_and_detects_tampering(store: ArtifactStore, tmp_path: Path) -> None:
    stored = store.put(_files(tmp_path / "a"), NAMES)
    out = store.fetch(stored.digest, tmp_path / "out")
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights"
    path = f"{store._dir(stored.digest)}/adapter_model.safetensors"
    with store.fs.open(path, "wb") as fh:
        fh.write(b"tampered")
    with pytest.raises(IntegrityError):
        store.fetch(stored.digest, tmp_path / "out2")
    with pytest.raises(IntegrityError):
        store.read_bytes(stored.digest, "adapter_model.safetensors")


def test_files_without_manifest_do_not_exist(store: ArtifactStore, tmp_path: Path) -> None:
    """On object stores the manifest is written last: a write cut short is invisible."""
    stored = store.put(_files(tmp_path / "a"), NAMES)
    store.fs.rm(f"{store._dir(stored.digest)}/{MANIFEST}")
    assert not store.exists(stored.digest)
    with pytest.raises(NotFoundError):
        store.fetch(stored.digest, tmp_path / "out")


def test_unknown_digest(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        store.fetch("0" * 64, tmp_path / "out")


def test_memory_store_is_a_real_fsspec_backend() -> None:
    fs, _ = fsspec.core.url_to_fs("memory://x")
    assert type(fs).__name__ == "MemoryFileSystem"


def test_a_manifest_naming_a_path_is_refused_and_nothing_is_written_outside(tmp_path: Path) -> None:
    """A consistent manifest (its digest computed over the names it lists) naming ``../../x``
    must not make fetch write outside the destination: only plain file names are read."""
    store = ArtifactStore(str(tmp_path / "store"))
    data = b"not an adapter"
    import hashlib
    import json

    files = {"../../escaped.txt": hashlib.sha256(data).hexdigest()}
    digest = digest_of(files)
    folder = tmp_path / "store" / "sha256" / digest[:2] / digest
    (folder / "../..").mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "../../escaped.txt").write_bytes(data)
    manifest = {
        "digest": digest,
        "files": {"../../escaped.txt": {"sha256": files["../../escaped.txt"], "size": 14}},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    cache = tmp_path / "cache" / "engine"
    with pytest.raises(IntegrityError, match="plain names"):
        store.fetch(digest, cache / "v1")
    assert not (tmp_path / "cache" / "escaped.txt").exists() and not (cache / "escaped.txt").exists()
    assert not list(tmp_path.joinpath("cache").rglob("escaped.txt"))


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", MANIFEST, ""])
def test_only_plain_file_names_are_stored(tmp_path: Path, name: str) -> None:
    from loraflow.registry.errors import InvalidArgumentError

    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(InvalidArgumentError) as info:
        store.put(_files(tmp_path / "a"), (*NAMES, name))
    assert info.value.param == "name" and not list((tmp_path / "store").rglob(MANIFEST))
