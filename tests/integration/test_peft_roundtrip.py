"""A real PEFT adapter on the tiny local Llama: registered, fetched, and loaded back with PEFT."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loraflow.registry.errors import InvalidAdapterError
from loraflow.registry.refs import Ref
from loraflow.registry.service import Registry
from loraflow.registry.settings import RegistrySettings, Settings
from tests.factories import FORCED

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraflow.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = Registry.open(Settings(home=tmp_path / "home"))
    yield r
    r.close()


def test_registered_adapter_loads_with_peft_and_behaves_the_same(
    reg: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.trainer.tiny import random_lora_adapter

    src = random_lora_adapter(tiny_base, tmp_path / "adapter", r=8, seed=3)
    v1 = reg.register("tiny", src, base_model=str(tiny_base))
    assert v1.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    reg.promote("tiny", 1, force=True, reason=FORCED)
    fetched = reg.fetch(reg.resolve(Ref("tiny")), tmp_path / "fetched")

    ids = torch.tensor([[1, 5, 9, 42, 7]])
    outputs = []
    for path in (src, fetched):
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, path).eval()
        with torch.no_grad():
            outputs.append(model(ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, outputs[0])


def test_real_dora_and_embedding_adapters_are_refused(tiny_base: Path, tmp_path: Path) -> None:
    from loraflow.registry.adapter_files import inspect_adapter
    from loraflow.trainer.tiny import random_lora_adapter

    dora = random_lora_adapter(tiny_base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    with pytest.raises(InvalidAdapterError) as info:
        inspect_adapter(dora, settings=RegistrySettings())
    assert info.value.param == "use_dora"
    # PEFT warns that it saves the whole embedding layers too; those are what vLLM cannot serve.
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        emb = random_lora_adapter(tiny_base, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(InvalidAdapterError) as info:
        inspect_adapter(emb, settings=RegistrySettings())
    assert "embed_tokens" in info.value.message
