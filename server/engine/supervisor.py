"""Start, watch and restart one vLLM OpenAI server subprocess (multi-LoRA, runtime loading on)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from loraflow.registry.settings import ServerSettings

log = logging.getLogger("loraflow.engine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_command(settings: ServerSettings, *, model: str, served_name: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",  # the admin surface (runtime LoRA loading) stays private
        "--port",
        str(port),
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-model-len",
        str(settings.max_model_len),
        "--gpu-memory-utilization",
        "0.3",
        "--dtype",
        "float32",
        "--disable-log-stats",
    ]


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM reports usage statistics to its authors by default; an engine we run phones nobody.
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


class EngineProcess:
    """One supervised engine. ``url`` is stable across restarts (same port)."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        model: str,
        served_name: str,
        log_file: Path,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = vllm_command(settings, model=model, served_name=served_name, port=self.port)
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_file.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=engine_env(),
            start_new_session=True,
        )
        out.close()
        log.info("engine started (pid %s) on %s; log %s", self.process.pid, self.url, self.log_file)

    async def start(self) -> None:
        await self._spawn()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                return
            log.warning("engine exited with %s; restarting in %.0f s", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            self.restarts += 1
            await self._spawn()

    async def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
        if self.process and self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
