"""Loading a base model and its tokenizer: one code path for local folders and hub ids."""

from __future__ import annotations

from typing import Any

from loraflow.registry.basemodel import BaseModelInfo, resolve_base_model
from loraflow.registry.errors import InvalidArgumentError, MissingDependencyError, NotFoundError


def locate_base_model(ref: str) -> BaseModelInfo:
    """A local folder, a cached hub model, or (when a hub is reachable) a downloaded one."""
    try:
        return resolve_base_model(ref)
    except NotFoundError:
        if "/" not in ref or ref.startswith((".", "/")):
            raise
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as exc:  # network errors come in many types; report the cause
            raise NotFoundError(f"base model {ref!r} could not be downloaded: {exc}", param="base") from exc
        return resolve_base_model(ref)


def load_tokenizer(base: BaseModelInfo) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError("training needs pip install 'loraflow[train]'") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    if not tokenizer.chat_template:
        raise InvalidArgumentError(
            f"{base.id} has no chat template; loraflow renders every example with the template serving uses",
            param="base",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def token_counter(tokenizer: Any) -> Any:
    def count(messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> int:
        return len(
            tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
            )
        )

    return count
