"""`loraflow serve` as a user runs it: a subprocess that supervises a real vLLM engine.

The base has a 512-token context (vLLM derives max_model_len from it; nothing is
hard-coded), and the server is stopped with SIGTERM while a stream is open.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loraflow.server.embedded import wait_until_ok
from loraflow.server.engine.supervisor import free_port
from tests.factories import FORCE

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def short_context(artifact_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A 512-token base, built and registered with the CLI, with one promoted adapter. In the
    session's artifact store, where `serve`'s engine (its environment names it) fetches it from."""
    from loraflow.trainer.tiny import random_lora_adapter

    root = tmp_path_factory.mktemp("serve-cli")
    env = {**os.environ, "LORAFLOW_HOME": str(root / "home"), "LORAFLOW_ARTIFACT_URI": artifact_uri}
    base = root / "tiny-512"

    def run(*args: str) -> None:
        done = subprocess.run(
            [str(BIN / args[0]), *args[1:]], env=env, cwd=root, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr

    run("loraflow", "dev", "tiny-model", str(base), "--max-position-embeddings", "512")
    adapter = random_lora_adapter(base, root / "a1", r=8, seed=1)
    run("adapters", "register", "support", str(adapter), "--base", str(base))
    run("adapters", "promote", "support", "v1", *FORCE)
    assert json.loads((base / "config.json").read_text())["max_position_embeddings"] == 512
    yield {"root": root, "base": base, "home": root / "home"}


class Serve:
    """`loraflow serve` in a subprocess; its output goes to files (a full pipe would block it)."""

    def __init__(self, ctx: dict[str, Path], port: int, **env: str) -> None:
        self.log = ctx["root"] / f"serve-{port}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    *(str(BIN / "loraflow"), "serve", "--base-model", str(ctx["base"])),
                    *("--model-name", "tiny", "--port", str(port)),
                ],
                env={
                    **os.environ,
                    "LORAFLOW_HOME": str(ctx["home"]),
                    "LORAFLOW_SERVER__MAX_LORA_RANK": "16",
                    **env,
                },
                cwd=ctx["root"],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:  # a test that failed early: let serve stop its engine
                self.process.terminate()
                try:
                    self.process.wait(60)
                except subprocess.TimeoutExpired:
                    self.process.kill()  # its engine is left behind only if serve itself hangs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_drains_an_open_stream_on_a_short_context_model(short_context: dict[str, Path]) -> None:
    port = free_port()
    server = Serve(short_context, port)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_ok(f"{url}/ready", 240, alive=lambda: server.process.poll() is None):
            raise AssertionError(f"serve did not become ready:\n{server.output()[-3000:]}")
        body = {
            "model": "support",
            "prompt": "x",
            "max_tokens": 450,  # about 2 s on this CPU, nearly all of it after the SIGTERM
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGTERM)  # shutdown begins while the stream is open
            rest = [line for line in lines if line.startswith("data: ")]
    finally:
        code = server.wait(120)
    output = server.output()
    assert rest[-1] == "data: [DONE]"
    finals = [json.loads(line[6:]) for line in rest[:-1]]
    assert all(f["model"] == "support@v1" for f in finals)
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert code in (0, -signal.SIGTERM), output[-3000:]
    assert "Waiting for connections to close" in output  # the stream was still open at shutdown
    assert "leaked semaphore" not in output  # the traffic writer's queues were freed before the exit
    assert len(rest) > 100
    engine_pid = int(re.search(r"engine starting \(pid (\d+)\)", output).group(1))  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while _alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(engine_pid)  # the supervised engine stopped with the gateway
    assert "restarting" not in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_an_engine_that_cannot_start_fails_serve_with_its_log(short_context: dict[str, Path]) -> None:
    started = time.monotonic()
    server = Serve(short_context, free_port(), LORAFLOW_SERVER__MAX_MODEL_LEN="4096")  # > the model's 512
    code = server.wait(240)
    output = server.output()
    assert code == 10, output[-3000:]
    assert time.monotonic() - started < 120
    assert "exited with code 1 before it became healthy" in output
    assert "greater than the derived max_model_len" in output  # vLLM's own reason, from its log
    assert "restarting" not in output
