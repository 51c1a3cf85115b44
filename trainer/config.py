"""The training run's configuration: one typed object, from a YAML/TOML file plus command-line overrides."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraflow.registry.errors import InvalidArgumentError, first_error


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="Adapter name; the run registers its next version.")
    base: str = Field(description="Base model: local folder or Hugging Face id.")
    data: str = Field(description="Registered dataset: NAME or NAME@vN.")
    task: str | None = None

    qlora: bool = Field(False, description="Load the base in 4-bit NF4 with double quantization.")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False

    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int | None = Field(None, ge=8, description="Default: trainer.max_length from settings.")
    system_prompt: str | None = Field(None, description="Default: trainer.system_prompt from settings.")
    seed: int = 0
    init_from: str | None = Field(
        None,
        description="Start from this registered version's adapter weights (NAME@vN or NAME:ALIAS) instead "
        "of a new adapter: continued training. Its rank and alpha must equal r and alpha.",
    )
    self_replay: int = Field(
        0,
        ge=0,
        description="Mix this many general prompts, answered by the base model itself (greedy), into the "
        "training split, against forgetting (loraflow.trainer.replay; none is in the regression suite).",
    )

    eval_steps: int = Field(20, ge=1, description="Evaluate on the validation split every N steps.")
    early_stopping_patience: int = Field(
        3, ge=1, description="Evaluations without improvement before stopping."
    )
    logging_steps: int = Field(5, ge=1)
    eval_generations: int = Field(16, ge=0, description="Held-out prompts generated for the eval report.")
    max_new_tokens: int = Field(64, ge=1)
    output_dir: Path | None = Field(None, description="Checkpoints; default $LORAFLOW_HOME/runs/<adapter>.")

    @field_validator("target_modules")
    @classmethod
    def _no_empty_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return value


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidArgumentError(f"no such config file: {path}", param="config")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read config file {path}: {exc}", param="config") from None
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(exc, "problem", None) or type(exc).__name__
                raise InvalidArgumentError(
                    f"config file {path} is not valid YAML{where}: {problem}", param="config"
                ) from None
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise InvalidArgumentError(
                f"config file {path} must be .yaml, .yml, .toml or .json", param="config"
            )
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise InvalidArgumentError(f"config file {path} does not parse: {exc}", param="config") from exc
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"config file {path} must hold a mapping of settings", param="config")
    return data.get("train", data) if isinstance(data.get("train"), dict) else data


def build_config(file: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """File values, then every override that was given (not None)."""
    data = read_config_file(file) if file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        where, message = first_error(exc.errors(), default_field="config")
        raise InvalidArgumentError(f"training config: {where}: {message}", param=where) from exc
