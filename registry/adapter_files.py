"""Checks on PEFT LoRA adapter files, run before anything is stored.

The unit the registry stores and the engine loads is PEFT's file contract:
``adapter_config.json`` plus ``adapter_model.safetensors``. Anything the
serving engine could not load is refused here, at register time, with a
message that names what to change, rather than on a user's request later.
The safetensors header is read directly (8-byte length + JSON), so no
tensor library is needed.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.registry.errors import InvalidAdapterError, InvalidArgumentError
from loraflow.registry.settings import RegistrySettings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_HEADER = 100 * 1024 * 1024

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<module>[^.]+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class AdapterFacts:
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    base_model_name_or_path: str | None
    config: dict[str, Any]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise InvalidAdapterError(f"{path.name} is not a safetensors file (too short)", param=path.name)
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise InvalidAdapterError(f"{path.name} is not a safetensors file (bad header)", param=path.name)
        try:
            header: dict[str, Any] = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidAdapterError(
                f"{path.name} is not a safetensors file (header is not JSON)", param=path.name
            ) from exc
    header.pop("__metadata__", None)
    return header


def _expected_shapes(base: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able linear layer of a Llama-family base."""
    hidden = base.get("hidden_size")
    heads = base.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int):
        return {}
    kv_heads = base.get("num_key_value_heads") or heads
    head_dim = base.get("head_dim") or hidden // heads
    inter = base.get("intermediate_size")
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    if isinstance(inter, int):
        shapes |= {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return shapes


# LoRA variants vLLM refuses to load (vllm/lora/peft_helper.py::_validate_features).
_SERVABLE_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


def _refuse_unservable_features(config: dict[str, Any]) -> None:
    if config.get("lora_bias"):
        raise InvalidAdapterError("vLLM cannot serve LoRA bias (lora_bias=true)", param="lora_bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _SERVABLE_INITS:
        raise InvalidAdapterError(
            f"init_lora_weights={init!r} changes the base weights, which vLLM cannot serve; convert it to "
            "a plain LoRA with PEFT's path_initial_model_for_weight_conversion",
            param="init_lora_weights",
        )
    for field, what in (
        ("alora_invocation_tokens", "Activated LoRA"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(field):
            raise InvalidAdapterError(f"vLLM cannot serve {what} ({field})", param=field)


def inspect_adapter(
    src: Path, *, settings: RegistrySettings, base_config: dict[str, Any] | None = None
) -> AdapterFacts:
    """Validate a PEFT LoRA adapter folder and return what the registry records of it."""
    if not src.is_dir():
        raise InvalidArgumentError(f"adapter folder {str(src)!r} does not exist", param="dir")
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapterError(
            f"pickle weights are not accepted ({', '.join(pickles)}): they can run code when loaded. "
            "Re-save the adapter with save_pretrained(..., safe_serialization=True)",
            param=pickles[0],
        )
    for name in ADAPTER_FILES:
        if not (src / name).is_file():
            raise InvalidAdapterError(
                f"{src} has no {name}; a PEFT LoRA adapter needs {' and '.join(ADAPTER_FILES)}", param=name
            )
    try:
        config = json.loads((src / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidAdapterError(f"{CONFIG_FILE} is not valid JSON ({exc})", param=CONFIG_FILE) from exc
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{CONFIG_FILE} must be a JSON object", param=CONFIG_FILE)

    peft_type = str(config.get("peft_type", ""))
    if peft_type.upper() != "LORA":
        raise InvalidAdapterError(
            f"peft_type is {peft_type or 'missing'!r}; only LoRA adapters are accepted", param="peft_type"
        )
    if config.get("use_dora"):
        raise InvalidAdapterError(
            "DoRA adapters (use_dora=true) cannot be served by vLLM (vllm#6983); train with use_dora=False",
            param="use_dora",
        )
    if config.get("modules_to_save"):
        raise InvalidAdapterError(
            f"modules_to_save={config['modules_to_save']!r} cannot be served by vLLM (vllm#9280); "
            "train without modules_to_save",
            param="modules_to_save",
        )

    _refuse_unservable_features(config)

    header = read_safetensors_header(src / WEIGHTS_FILE)
    if not header:
        raise InvalidAdapterError(f"{WEIGHTS_FILE} holds no tensors", param=WEIGHTS_FILE)
    modules: set[str] = set()
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, meta in header.items():
        if "lora_magnitude_vector" in key:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE} holds DoRA magnitude vectors ({key}); vLLM cannot serve DoRA (vllm#6983)",
                param="use_dora",
            )
        match = _LORA_KEY.match(key)
        if not match:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE} holds a tensor that is not a LoRA A/B matrix: {key} "
                "(full weights from modules_to_save or embeddings cannot be served by vLLM)",
                param=WEIGHTS_FILE,
            )
        module = match["module"]
        modules.add(module)
        pairs.setdefault(f"{match['path']}.{module}", {})[match["ab"]] = list(meta.get("shape", []))

    unsupported = sorted(modules - set(settings.supported_target_modules))
    if unsupported:
        raise InvalidAdapterError(
            f"target modules {unsupported} are not supported by the serving engine; "
            f"supported: {sorted(settings.supported_target_modules)}",
            param="target_modules",
        )

    ranks: set[int] = set()
    expected = _expected_shapes(base_config or {})
    n_layers = (base_config or {}).get("num_hidden_layers")
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: {path} needs a 2-D lora_A and lora_B", param=WEIGHTS_FILE
            )
        (rank, in_features), (out_features, rank_b) = ab["A"], ab["B"]
        if rank != rank_b:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: {path} lora_A and lora_B disagree on rank", param=WEIGHTS_FILE
            )
        ranks.add(rank)
        module = path.rsplit(".", 1)[-1]
        if module in expected and (in_features, out_features) != expected[module]:
            raise InvalidAdapterError(
                f"adapter does not match the base model: {path} is {in_features}->{out_features}, "
                f"the base model's {module} is {expected[module][0]}->{expected[module][1]}",
                param="base",
            )
        layer = _LAYER.search(path)
        if isinstance(n_layers, int) and layer and int(layer.group(1)) >= n_layers:
            raise InvalidAdapterError(
                f"adapter does not match the base model: {path} is beyond its {n_layers} layers", param="base"
            )

    rank = max(ranks)
    if rank > settings.max_lora_rank:
        raise InvalidAdapterError(
            f"rank r={rank} is above the configured maximum {settings.max_lora_rank} "
            "(registry.max_lora_rank, which must not exceed the engine's --max-lora-rank)",
            param="r",
        )
    alpha = config.get("lora_alpha", rank)
    base_name = config.get("base_model_name_or_path")
    return AdapterFacts(
        rank=rank,
        alpha=float(alpha),
        target_modules=sorted(modules),
        size_bytes=sum((src / name).stat().st_size for name in ADAPTER_FILES),
        base_model_name_or_path=base_name if isinstance(base_name, str) and base_name else None,
        config=config,
    )
