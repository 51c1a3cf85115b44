"""The engine supervisor with real processes: flags from settings, fail fast, restart after healthy.

vLLM itself is started by the e2e tier (and by `loraflow serve` in test_serve_cli). Here a small
stand-in program plays an engine that starts, fails or crashes on cue, so each rule is exercised
in seconds.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from loraflow.registry.settings import ServerSettings, Settings
from loraflow.server.engine.supervisor import EngineProcess, EngineStartError

pytestmark = pytest.mark.integration

STAND_IN = """
import http.server, os, subprocess, sys, threading, time
port, mode, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3]
print("stand-in engine starting", flush=True)
if mode == "exit":
    for i in range(40):
        print(f"loading line {i}", flush=True)
    print("ValueError: max_model_len (4096) is greater than max_position_embeddings (512)", flush=True)
    sys.exit(1)
if mode == "hang":
    time.sleep(600)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("healthy", flush=True)
runs = open(marker, "a+"); runs.write("run\\n"); runs.close()
if mode == "crash-once" and open(marker).read().count("run") == 1:
    # Like vLLM's EngineCore: a child in the engine's process group that outlives a crash.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(marker + ".child", "w").write(str(child.pid))
    while not os.path.exists(marker + ".crash"):  # the test's cue: the supervisor saw it healthy
        time.sleep(0.01)
    print("Fatal Python error: Segmentation fault", flush=True)
    sys.exit(139)
time.sleep(600)
"""


def _engine(tmp_path: Path, mode: str, **settings: object) -> EngineProcess:
    process = EngineProcess(
        Settings(home=tmp_path / "home", server=ServerSettings(**settings)),  # type: ignore[arg-type]
        model="/models/tiny",
        log_file=tmp_path / "engine.log",
        device="cpu",
    )
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    # The supervisor under test is real; only the program it supervises is a stand-in.
    process.command = [sys.executable, str(script), str(process.port), mode, str(tmp_path / "runs")]
    return process


def test_an_engine_that_exits_before_it_is_healthy_fails_fast_with_its_log(tmp_path: Path) -> None:
    # Fast: on the exit itself. A supervisor that waited for the start timeout instead would hang
    # here until the test's deadline (an hour's timeout, so no clock decides which it was).
    process = _engine(tmp_path, "exit", engine_start_timeout_s=3600)

    async def run() -> None:
        await asyncio.wait_for(process.start(), timeout=300)

    with pytest.raises(EngineStartError) as info:
        asyncio.run(run())
    message = info.value.message
    assert "exited with code 1 before it became healthy" in message
    assert "max_model_len (4096) is greater than max_position_embeddings (512)" in message
    assert "loading line 39" in message and "loading line 5\n" not in message  # the tail, not the whole log
    assert process.restarts == 0


def test_an_engine_that_never_gets_healthy_is_stopped_after_the_start_timeout(tmp_path: Path) -> None:
    process = _engine(tmp_path, "hang", engine_start_timeout_s=2)

    async def run() -> None:
        await process.start()

    with pytest.raises(EngineStartError, match=r"server.engine_start_timeout_s"):
        asyncio.run(run())
    assert process.process is not None and process.process.returncode is not None  # killed, not left behind


def test_an_engine_that_crashes_after_being_healthy_is_restarted(tmp_path: Path) -> None:
    process = _engine(tmp_path, "crash-once")

    async def run() -> int:
        await process.start()
        assert process.process is not None and process.process.returncode is None  # running
        (tmp_path / "runs.crash").touch()  # healthy, now it crashes
        deadline = time.monotonic() + 30
        while process.restarts == 0 or not await _healthy(process.url):
            assert time.monotonic() < deadline, "the engine was not restarted"
            await asyncio.sleep(0.1)
        pid = process.process.pid if process.process else -1
        await process.stop()
        return pid

    pid = asyncio.run(run())
    assert process.restarts == 1 and pid > 0
    orphan = int((tmp_path / "runs.child").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(orphan, 0)  # the crashed engine's child was stopped with it
    assert (tmp_path / "runs").read_text().count("run") == 2
    log = (tmp_path / "engine.log").read_text()
    assert "Segmentation fault" in log and log.count("stand-in engine starting") == 2
    assert process.process is not None and process.process.returncode is not None


async def _healthy(url: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{url}/health", timeout=1)).status_code == 200
    except httpx.HTTPError:
        return False
