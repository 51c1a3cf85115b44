"""Register-time refusals: everything the engine could not serve fails here, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.registry.adapter_files import inspect_adapter
from loraflow.registry.errors import InvalidAdapterError, InvalidArgumentError
from loraflow.registry.settings import RegistrySettings
from tests.factories import BASE_CONFIG, SHAPES, make_adapter

pytestmark = pytest.mark.unit
SETTINGS = RegistrySettings()


def test_good_adapter_facts(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a", r=16, modules=("q_proj", "v_proj", "down_proj"))
    facts = inspect_adapter(src, settings=SETTINGS, base_config=BASE_CONFIG)
    assert facts.rank == 16
    assert facts.alpha == 32.0
    assert facts.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert facts.size_bytes == sum(p.stat().st_size for p in src.iterdir())


def _refused(src: Path, param: str, words: str, base: dict | None = BASE_CONFIG) -> None:
    with pytest.raises(InvalidAdapterError) as info:
        inspect_adapter(src, settings=SETTINGS, base_config=base)
    assert info.value.param == param
    assert words in info.value.message


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        inspect_adapter(tmp_path / "nope", settings=SETTINGS)
    assert info.value.param == "dir"


def test_pickle_weights_refused(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _refused(src, "adapter_model.bin", "pickle weights are not accepted")


def test_pt_weights_refused_even_without_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (src / "weights.pt").write_bytes(b"x")
    _refused(src, "weights.pt", "pickle")


def test_missing_safetensors(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "adapter_model.safetensors").unlink()
    _refused(src, "adapter_model.safetensors", "has no adapter_model.safetensors")


def test_not_lora(tmp_path: Path) -> None:
    _refused(make_adapter(tmp_path / "a", config={"peft_type": "IA3"}), "peft_type", "only LoRA")


def test_dora_flag_refused(tmp_path: Path) -> None:
    _refused(make_adapter(tmp_path / "a", config={"use_dora": True}), "use_dora", "vllm#6983")


def test_dora_magnitude_tensor_refused(tmp_path: Path) -> None:
    src = make_adapter(
        tmp_path / "a",
        extra_tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": [128]},
    )
    _refused(src, "use_dora", "DoRA")


def test_modules_to_save_refused(tmp_path: Path) -> None:
    _refused(
        make_adapter(tmp_path / "a", config={"modules_to_save": ["lm_head"]}), "modules_to_save", "vllm#9280"
    )


def test_full_weight_tensor_refused(tmp_path: Path) -> None:
    src = make_adapter(
        tmp_path / "a", extra_tensors={"base_model.model.lm_head.modules_to_save.weight": [4, 4]}
    )
    _refused(src, "adapter_model.safetensors", "not a LoRA A/B matrix")


def test_rank_above_maximum(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a", r=128)
    _refused(src, "r", "r=128 is above the configured maximum 64")
    raised = RegistrySettings(max_lora_rank=128)
    assert inspect_adapter(src, settings=raised, base_config=BASE_CONFIG).rank == 128


def test_unsupported_target_module(tmp_path: Path) -> None:
    shapes = SHAPES | {"rotary_proj": (128, 128)}
    src = make_adapter(tmp_path / "a", modules=("q_proj", "rotary_proj"), shapes=shapes)
    _refused(src, "target_modules", "['rotary_proj'] are not supported")


@pytest.mark.parametrize(
    ("field", "value"),
    [("lora_bias", True), ("init_lora_weights", "pissa"), ("layer_replication", [[0, 1]])],
)
def test_other_unservable_features(tmp_path: Path, field: str, value: object) -> None:
    _refused(make_adapter(tmp_path / "a", config={field: value}), field, "vLLM cannot serve")


def test_shape_mismatch_with_base(tmp_path: Path) -> None:
    wider = SHAPES | {"q_proj": (256, 256)}
    _refused(make_adapter(tmp_path / "a", shapes=wider), "base", "does not match the base model")


def test_more_layers_than_base(tmp_path: Path) -> None:
    _refused(make_adapter(tmp_path / "a", layers=3), "base", "beyond its 2 layers")


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "adapter_model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    _refused(src, "adapter_model.safetensors", "not a safetensors file")


def test_config_not_json(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "adapter_config.json").write_text("{")
    _refused(src, "adapter_config.json", "not valid JSON")
