"""Wire types of /v1/models: OpenAI's model list, with each adapter's aliases and versions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class VersionCard(BaseModel):
    id: str = Field(description="NAME@vN: what a response's `model` says when this version answered.")
    version: int
    status: Literal["registered", "archived"]
    digest: str = Field(description="sha256 of the adapter's files.")
    template_matches: bool | None = Field(
        description="Whether it was trained with the chat template of the base this gateway serves "
        "(null: unknown)."
    )


class ModelCard(BaseModel):
    id: str = Field(
        description="What to pass as `model`: the base, or an adapter (NAME, NAME:ALIAS, NAME@vN)."
    )
    object: Literal["model"] = "model"
    owned_by: str = "loraflow"
    parent: str | None = Field(None, description="The base model an adapter runs on; null for the base.")
    created: int = Field(
        description="Unix time: the adapter's registration, or the gateway's start for the base."
    )
    aliases: dict[str, int] | None = Field(
        None, description="Alias -> version, e.g. {'production': 3}; null for the base."
    )
    versions: list[VersionCard] | None = Field(None, description="Every version; null for the base.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
