"""`loraflow serve` as a user runs it: a subprocess that supervises a real vLLM engine.

The base has a 512-token context (vLLM derives max_model_len from it; nothing is
hard-coded). The supervised engine is killed while a stream is open and a cold version is
loading, and restarted; then the server is stopped with SIGTERM while a stream is open.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
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
    # An artifact store of its own, on disk: the test holds a version's weights back (a FIFO).
    env = {
        **os.environ,
        "LORAFLOW_HOME": str(root / "home"),
        "LORAFLOW_ARTIFACT_URI": str(root / "artifacts"),
    }
    base = root / "tiny-512"

    def run(*args: str) -> None:
        done = subprocess.run(
            [str(BIN / args[0]), *args[1:]], env=env, cwd=root, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr

    run("loraflow", "dev", "tiny-model", str(base), "--max-position-embeddings", "512")
    for seed in (1, 2):
        adapter = random_lora_adapter(base, root / f"a{seed}", r=8, seed=seed)
        run("adapters", "register", "support", str(adapter), "--base", str(base))
    run("adapters", "promote", "support", "v1", *FORCE)
    assert json.loads((base / "config.json").read_text())["max_position_embeddings"] == 512
    yield {"root": root, "base": base, "home": root / "home", "artifacts": root / "artifacts"}


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
                    "LORAFLOW_ARTIFACT_URI": str(ctx["artifacts"]),
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


def _open_once_read(fifo: Path, timeout_s: float) -> int:
    """A write end of ``fifo``, once a reader has opened it (the engine fetching those weights)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_engine_death_mid_stream_and_mid_load_then_sigterm_drains_a_stream(
    short_context: dict[str, Path],
) -> None:
    """The supervised engine is killed while a stream is open and a cold version is loading: the
    stream ends with an error event, the load is a 503 with Retry-After (never a bare 500), the
    engine is restarted, and serving resumes with the same outputs. Then SIGTERM while a stream is
    open: it drains, and the engine stops with the gateway."""
    port = free_port()
    server = Serve(short_context, port)
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    chat |= {"temperature": 0}
    try:
        if not wait_until_ok(f"{url}/ready", 240, alive=lambda: server.process.poll() is None):
            raise AssertionError(f"serve did not become ready:\n{server.output()[-3000:]}")
        first = re.search(r"engine starting \(pid (\d+)\) on (\S+?);", server.output())
        assert first is not None, server.output()[-3000:]
        engine_pid, replica = int(first.group(1)), first.group(2)
        with httpx.Client(base_url=url, timeout=60) as http:
            before = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]

            # support@v2's weights are held back: the engine's fetch of them blocks until released.
            reg = Registry.open(
                Settings(home=short_context["home"], artifact_uri=str(short_context["artifacts"]))
            )
            try:
                digest = reg.get_version("support", 2).digest
            finally:
                reg.close()
            (weights,) = short_context["artifacts"].rglob(f"{digest}/adapter_model.safetensors")
            held = weights.read_bytes()
            weights.unlink()
            os.mkfifo(weights)
            with (
                ThreadPoolExecutor(1) as pool,
                openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as client,
            ):
                cold = pool.submit(
                    httpx.post, f"{url}/v1/chat/completions", json={**chat, "model": "support@v2"}, timeout=60
                )
                writer = _open_once_read(weights, 60)  # the engine is loading support@v2 now
                try:
                    stream = client.completions.create(
                        model="support",
                        prompt="x",
                        max_tokens=450,
                        temperature=0,
                        stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    assert next(iter(stream)).model == "support@v1"
                    os.killpg(engine_pid, signal.SIGKILL)  # the engine, mid-stream and mid-load
                    r = cold.result(60)
                finally:
                    os.close(writer)
                assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
                assert _error(r)["code"] == "engine_unavailable"
                with pytest.raises(openai.APIError, match="mid-stream"):
                    list(stream)  # the open stream ended with an error event, not a truncated body
            staged = weights.with_name("restored")
            staged.write_bytes(held)
            staged.replace(weights)  # the FIFO gives way to the real file

            statuses: list[int] = []
            deadline = time.monotonic() + 240
            while True:
                response = http.post("/v1/chat/completions", json=chat)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    break
                assert response.status_code == 503 and response.headers.get("retry-after"), response.text
                assert time.monotonic() < deadline, "the restarted engine did not serve"
                time.sleep(0.5)
            assert response.json()["choices"][0]["message"]["content"] == before
            assert 503 in statuses
            assert http.get("/ready").json() == {"status": "ready"}
            # No stale routing: the restarted engine's residency was re-learned, and v2 loads on demand.
            again = http.post("/v1/chat/completions", json={**chat, "model": "support@v2"})
            assert again.status_code == 200 and again.headers["x-loraflow-model"] == "support@v2", again.text
            metrics = http.get("/metrics").text
            assert (
                f'loraflow_resident_versions{{adapter="support",replica="{replica}",version="v1"}} 1.0'
                in metrics
            )
            assert f'loraflow_engine_failures_total{{phase="mid_stream",replica="{replica}"}} 1.0' in metrics
            assert f'loraflow_engine_restarts_total{{replica="{replica}"}} 1.0' in metrics

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
    pids = [int(p) for p in re.findall(r"engine starting \(pid (\d+)\)", output)]
    assert len(pids) == 2 and pids[0] == engine_pid, output[-3000:]  # started, and restarted once
    deadline = time.monotonic() + 10
    while _alive(pids[-1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids[-1])  # the supervised engine stopped with the gateway
    assert output.count("restarting in") == 1  # after the kill; the shutdown restarted nothing
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


def test_an_engine_that_cannot_start_fails_serve_with_its_log(short_context: dict[str, Path]) -> None:
    server = Serve(short_context, free_port(), LORAFLOW_SERVER__MAX_MODEL_LEN="4096")  # > the model's 512
    code = server.wait(240)
    output = server.output()
    assert code == 10, output[-3000:]
    # Failed fast: on the engine's exit, not on server.engine_start_timeout_s.
    assert "exited with code 1 before it became healthy" in output
    assert "greater than the derived max_model_len" in output  # vLLM's own reason, from its log
    assert "restarting" not in output
