"""The one settings object.

Read from ``loraflow.toml`` in the working directory (or the file named by
``LORAFLOW_CONFIG``) and from ``LORAFLOW_*`` environment variables, which win.
Nested sections use ``__`` in environment variables, e.g.
``LORAFLOW_REGISTRY__MAX_LORA_RANK=128``.

Build it once at the edge (CLI entry point, app factory) with :func:`load_settings`
and pass it in. Nothing in loraflow builds settings at import time.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "LORAFLOW_CONFIG"
DEFAULT_CONFIG_FILE = "loraflow.toml"

# Linear layers vLLM can attach LoRA to on Llama-family models. Anything else
# (embeddings, lm_head, norms) is refused at register time, not on a request.
VLLM_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RegistrySettings(BaseModel):
    max_lora_rank: int = Field(64, ge=1, description="Refuse adapters whose rank is above this.")
    supported_target_modules: list[str] = Field(
        default_factory=lambda: list(VLLM_LORA_MODULES),
        description="Module names the serving engine can apply LoRA to.",
    )


class TrainerSettings(BaseModel):
    base_model: str | None = Field(None, description="Default base model for data and train commands.")
    max_length: int = Field(1024, ge=8, description="Longest example, in tokens, after the chat template.")
    system_prompt: str | None = Field(None, description="Put into every example that has no system message.")


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    engine_urls: list[str] = Field(default_factory=list, description="Running vLLM replicas (private URLs).")
    base_model: str | None = Field(None, description="Base model for a supervised engine.")
    served_model_name: str | None = Field(
        None, description="Model id clients use for the base; default its path."
    )
    max_loras: int = Field(4, ge=1, description="Adapters in one batch (vLLM --max-loras).")
    max_cpu_loras: int = Field(8, ge=1, description="Adapters resident per replica (vLLM --max-cpu-loras).")
    max_lora_rank: int = Field(64, ge=1, description="vLLM --max-lora-rank.")
    max_model_len: int = Field(2048, ge=16)
    auth: bool = Field(False, description="Require API keys (loraflow keys create).")
    max_concurrency: int = Field(64, ge=1, description="In-flight requests before 429.")
    poll_interval_s: float = Field(0.2, gt=0, description="How often the registry revision is checked.")
    adapter_cache: Path | None = Field(
        None, description="Where adapter files are fetched; default $home/cache."
    )
    engine_timeout_s: float = Field(120.0, gt=0)
    retry_after_s: int = Field(5, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORAFLOW_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    home: Path = Field(Path(".loraflow"), description="Data directory.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the registry; default SQLite at $home/registry.db."
    )
    artifact_uri: str | None = Field(
        None, description="fsspec URI of the artifact store; default $home/artifacts."
    )
    default_adapter: str | None = Field(
        None, description="Adapter name used when a command is given only a version."
    )
    user: str | None = Field(None, description="Recorded as created_by / actor; default $USER.")
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get(CONFIG_FILE_ENV, DEFAULT_CONFIG_FILE))
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'registry.db').resolve()}"

    @property
    def resolved_artifact_uri(self) -> str:
        if self.artifact_uri:
            return self.artifact_uri
        return str((self.home / "artifacts").resolve())

    @property
    def actor(self) -> str:
        if self.user:
            return self.user
        try:
            return getpass.getuser()
        except (KeyError, OSError):
            return "unknown"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the config file and environment; keyword overrides win."""
    return Settings(**overrides)  # type: ignore[arg-type]
