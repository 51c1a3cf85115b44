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
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
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


# vLLM flags that loraflow sets from its own settings (or always sets itself). server.engine_args
# may not repeat them: two sources for one flag is how a deployment ends up running something else
# than its config says.
ENGINE_FLAG_SETTINGS: dict[str, str] = {
    "--model": "server.base_model (or --base-model)",
    "--served-model-name": "nothing: engines serve the base by its path or hub id; server.served_model_name "
    "(or --model-name) is the id clients use",
    "--host": "nothing: a supervised engine listens on 127.0.0.1 only",
    "--port": "nothing: a supervised engine gets a free private port",
    "--enable-lora": "nothing: it is always on",
    "--max-loras": "server.max_loras",
    "--max-cpu-loras": "server.max_cpu_loras",
    "--max-lora-rank": "server.max_lora_rank",
    "--max-model-len": "server.max_model_len",
    "--dtype": "server.dtype",
    "--gpu-memory-utilization": "server.gpu_memory_utilization",
    "--tensor-parallel-size": "server.tensor_parallel_size",
}

EngineDtype = Literal["auto", "bfloat16", "float16", "float32", "half", "float"]


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    engine_urls: list[str] = Field(default_factory=list, description="Running vLLM replicas (private URLs).")
    base_model: str | None = Field(None, description="Base model for a supervised engine.")
    served_model_name: str | None = Field(
        None, description="Model id clients use for the base; default its path."
    )
    auth: bool = Field(False, description="Require API keys (loraflow keys create).")
    max_concurrency: int = Field(64, ge=1, description="In-flight requests before 429.")
    poll_interval_s: float = Field(0.2, gt=0, description="How often the registry revision is checked.")
    engine_dns: str | None = Field(
        None,
        description="HOST:PORT resolved every dns_interval_s to find engine replicas, e.g. a Kubernetes "
        "headless Service. Replicas come and go without a restart. Excludes engine_urls.",
    )
    dns_interval_s: float = Field(5.0, gt=0, description="How often engine_dns is resolved again.")
    supervised_engines: int = Field(
        1,
        ge=1,
        description="Engines serve supervises when no engine URLs are given (on GPUs, one per "
        "tensor_parallel_size GPUs).",
    )
    adapter_replicas: int = Field(
        2,
        ge=1,
        description="Replicas each version lives on (its home set, by rendezvous hashing). Requests go to "
        "the least-loaded healthy home replica, elsewhere only if all are down or saturated.",
    )
    replica_max_in_flight: int = Field(
        32, ge=1, description="Requests in flight on one replica beyond which it counts as saturated."
    )
    max_adapter_loads: int | None = Field(
        None,
        ge=1,
        description="Adapter loads after which a supervised replica is drained and restarted: vLLM does "
        "not free an unloaded adapter's memory. Unset: never.",
    )
    drain_timeout_s: float = Field(
        300.0, gt=0, description="Longest a draining replica waits for its in-flight requests to finish."
    )
    engine_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest the gateway waits for an engine to send the next bytes of an answer "
        "(a stream may last longer in all).",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After on 429 and 503.")
    metrics_token: SecretStr | None = Field(
        None,
        description="If set, /metrics (which names the engines' private URLs) answers only "
        "'Authorization: Bearer <token>', e.g. Prometheus's bearer_token.",
    )

    # -- the engine: vLLM flags. An unset flag is not passed, so vLLM derives it from the model.
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="Where a supervised engine runs; auto looks for a GPU. The CPU-only defaults "
        "(dtype float32, a 1 GiB KV cache) apply only on cpu.",
    )
    max_loras: int = Field(4, ge=1, description="Adapters in one batch (vLLM --max-loras).")
    max_cpu_loras: int = Field(8, ge=1, description="Adapters resident per replica (vLLM --max-cpu-loras).")
    max_lora_rank: int = Field(64, ge=1, description="vLLM --max-lora-rank.")
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM --max-model-len; unset: the model's own context length."
    )
    dtype: EngineDtype | None = Field(None, description="vLLM --dtype; unset: vLLM's auto (float32 on cpu).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM --gpu-memory-utilization; unset: vLLM's default."
    )
    tensor_parallel_size: int | None = Field(None, ge=1, description="vLLM --tensor-parallel-size.")
    engine_args: list[str] = Field(
        default_factory=list,
        description="Any other vLLM flags, passed as given, e.g. ['--enforce-eager', '--swap-space', '8'].",
    )
    engine_start_timeout_s: float = Field(
        900.0, gt=0, description="How long a supervised engine may take to become healthy."
    )

    @field_validator("engine_args")
    @classmethod
    def _no_managed_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in ENGINE_FLAG_SETTINGS:
                raise ValueError(f"{flag} is set by loraflow; use {ENGINE_FLAG_SETTINGS[flag]} instead")
        return args

    @model_validator(mode="after")
    def _one_source_of_replicas(self) -> ServerSettings:
        if self.engine_dns and self.engine_urls:
            raise ValueError("set server.engine_urls or server.engine_dns, not both")
        if self.engine_dns is not None:
            host, sep, port = self.engine_dns.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"server.engine_dns must be HOST:PORT, not {self.engine_dns!r}")
        return self

    @model_validator(mode="after")
    def _cpu_loras_hold_a_batch(self) -> ServerSettings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras}): "
                "vLLM refuses to start otherwise"
            )
        return self


class EngineSettings(BaseModel):
    """What ``loraflow engine`` (vLLM plus the loraflow resolver plugin) needs on its own host."""

    cache_dir: Path | None = Field(
        None, description="Where the engine keeps verified adapter files; default $home/cache/engine."
    )
    cache_max_bytes: int = Field(
        10 * 2**30, ge=1, description="Bound on that cache; least recently used versions go first."
    )
    resolver: bool = Field(
        False,
        description="Set by loraflow engine in the engine's environment: register the resolver that "
        "fetches NAME@vN+DIGEST from the artifact store. A plain vLLM leaves it off.",
    )


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
    engine: EngineSettings = Field(default_factory=EngineSettings)

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
    def resolved_engine_cache(self) -> Path:
        return (self.engine.cache_dir or self.home / "cache" / "engine").resolve()

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
