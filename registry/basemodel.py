"""Base models: where their files are, and the fingerprint that identifies them.

A base model is a local directory or a Hugging Face id. The fingerprint is the
sha256 of ``config.json`` plus the tokenizer files, so two copies of the same
model agree, and a different model, or the same weights with another tokenizer
or chat template, do not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.registry.artifacts import digest_of, sha256_file
from loraflow.registry.errors import InvalidArgumentError, NotFoundError

FINGERPRINT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class BaseModelInfo:
    """A base model found on this machine (not pydantic's ``BaseModel``)."""

    id: str  # as recorded: an absolute path for local directories, else the hub id
    path: Path  # a local directory holding at least config.json
    fingerprint: str
    config: dict[str, Any]


def _hub_snapshot(model_id: str) -> Path | None:
    """The local snapshot of a hub model, if it is in the Hugging Face cache. Never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except HFValidationError:
        return None  # not a hub id at all, e.g. a local path that does not exist
    return Path(found).parent if isinstance(found, str) else None


def _locate(ref: str, param: str) -> tuple[Path, str]:
    """(the local folder, the id to record) of a base model: a local directory or a cached hub id."""
    if not ref:
        raise InvalidArgumentError("a base model is required", param=param)
    local = Path(ref).expanduser()
    if local.is_dir():
        return local.resolve(), str(local.resolve())
    snapshot = _hub_snapshot(ref)
    if snapshot is None:
        raise NotFoundError(
            f"base model {ref!r} is neither a local directory nor in the Hugging Face cache; "
            f"pass a local path or download it first (huggingface-cli download {ref})",
            param=param,
        )
    return snapshot, ref


def resolve_base_model(ref: str, *, param: str = "base") -> BaseModelInfo:
    path, model_id = _locate(ref, param)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidArgumentError(f"base model {ref!r} has no config.json in {path}", param=param)
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"base model {ref!r}: config.json is not valid JSON ({exc})") from exc
    files = {name: sha256_file(path / name) for name in FINGERPRINT_FILES if (path / name).is_file()}
    return BaseModelInfo(id=model_id, path=path, fingerprint=digest_of(files), config=config)


def chat_template_hash(path: Path) -> str | None:
    """sha256 of a model folder's chat template, as the tokenizer loads it (None if it has none).

    Training records this hash on each version; the gateway compares it with the
    template of the base it serves.
    """
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        template: object = jinja.read_text()
    else:
        config = path / "tokenizer_config.json"
        template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template_hash(template) if isinstance(template, str) else None


def template_hash(template: str) -> str:
    """The one definition of a chat template's hash: sha256 of its text. Training records it from
    the tokenizer it rendered with; the gateway computes it from the base's files."""
    return hashlib.sha256(template.encode()).hexdigest()


def template_hash_of(ref: str) -> str | None:
    """The chat-template hash of a base model found on this machine; None if it is not here."""
    try:
        path, _ = _locate(ref, "base")
    except (NotFoundError, InvalidArgumentError):
        return None
    return chat_template_hash(path)  # only the template is read: no fingerprint of the files


def template_matches(trained_with: str | None, served: str | None) -> bool | None:
    """Whether a version's training chat template is the one its base renders now (None: unknown)."""
    if trained_with is None or served is None:
        return None
    return trained_with == served
