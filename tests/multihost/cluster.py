"""Processes for a many-host deployment on one machine: an S3 endpoint (moto in server mode),
`loraflow engine` replicas and `loraflow serve` gateways, each its own process with its own
home folder. They share nothing but what their environment names: the PostgreSQL registry
and the S3 bucket. Used by the multihost tests and by ``bench/hot_swap.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraflow.server.embedded import wait_until_ok
from loraflow.server.engine.supervisor import free_port, log_tail

LORAFLOW = str(Path(sys.executable).parent / "loraflow")
BUCKET = "loraflow-artifacts"


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        """SIGKILL the whole process group: the engine and its EngineCore die together, as a host would."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _spawn(cmd: list[str], env: dict[str, str], log: Path, url: str) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Proc(popen, url, log)


def wait_up(proc: Proc, path: str, timeout_s: float) -> Proc:
    if not wait_until_ok(f"{proc.url}{path}", timeout_s, alive=lambda: proc.popen.poll() is None):
        proc.stop()
        raise RuntimeError(f"{proc.url} did not come up (exit {proc.popen.poll()}):\n{log_tail(proc.log)}")
    return proc


@contextmanager
def s3_endpoint(root: Path) -> Iterator[dict[str, str]]:
    """moto's S3 on loopback with one bucket; yields the environment that points clients at it.
    Raises (never skips) if it cannot start: the tier needs it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        root / "moto.log",
        url,
    )
    try:
        wait_up(proc, "/moto-api/", 60)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,  # botocore (under s3fs) reads it for every client it makes
        }
        httpx.put(f"{url}/{BUCKET}").raise_for_status()
        yield env
    finally:
        proc.stop()


def start_engine(base: Path, home: Path, env: dict[str, str], *, port: int | None = None) -> Proc:
    """`loraflow engine` as an operator runs it on its own host (started, not yet healthy)."""
    port = port or free_port()
    return _spawn(
        [LORAFLOW, "engine", "--base-model", str(base), "--port", str(port)],
        {**env, "LORAFLOW_HOME": str(home)},
        home / "engine.log",
        f"http://127.0.0.1:{port}",
    )


def start_gateway(
    base: Path,
    home: Path,
    env: dict[str, str],
    *,
    engine_urls: list[str] | None = None,
    port: int | None = None,
    **server: object,
) -> Proc:
    """`loraflow serve` over the given replicas (none: it supervises its own), configured by environment."""
    port = port or free_port()
    cmd = [LORAFLOW, "serve", "--base-model", str(base), "--model-name", "tiny", "--port", str(port)]
    for url in engine_urls or []:
        cmd += ["--engine-url", url]
    settings = {f"LORAFLOW_SERVER__{k.upper()}": str(v) for k, v in server.items()}
    return _spawn(
        cmd, {**env, "LORAFLOW_HOME": str(home), **settings}, home / "gateway.log", f"http://127.0.0.1:{port}"
    )


def served_by(gateway: str, model: str, client: httpx.Client) -> str | None:
    """The version that answers ``model`` on ``gateway`` (its x-loraflow-model header), or None."""
    r = client.post(
        f"{gateway}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    return r.headers.get("x-loraflow-model") if r.status_code == 200 else None


def engine_models(engine: str) -> set[str]:
    data = httpx.get(f"{engine}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in data if m.get("parent")}


def until(predicate: object, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def steady_load(
    loops: list[tuple[str, list[str]]], statuses: list[int], failures: list[str] | None = None
) -> Iterator[None]:
    """One client thread per (gateway, models): non-streaming chat requests back to back, cycling
    through the models, each status appended to ``statuses`` and each failure's time, gateway and
    error to ``failures``, until the block ends."""
    stop = threading.Event()

    def run(gateway: str, models: list[str]) -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                for model in models:
                    r = http.post(
                        f"{gateway}/v1/chat/completions",
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 4,
                        },
                    )
                    statuses.append(r.status_code)
                    if r.status_code != 200 and failures is not None:
                        failures.append(f"{time.strftime('%H:%M:%S')} {gateway} {model}: {r.text[:300]}")

    threads = [threading.Thread(target=run, args=loop) for loop in loops]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()
