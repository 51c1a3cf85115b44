"""`loraflow serve --workers 2` as a user runs it, over the session's running vLLM engine.

Two gateway processes share the port; whichever answers ``/metrics`` answers for both: the
request counters are summed, and each worker's replica view is there under its ``worker``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loraflow.server.embedded import wait_until_ok
from loraflow.server.engine.supervisor import free_port
from tests.e2e.conftest import Assets
from tests.factories import FORCE

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
REQUESTS = 12


def requests_counted(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('loraflow_requests_total{adapter="support"')
    )


def test_two_workers_share_the_port_and_answer_metrics_for_both(
    assets: Assets, artifact_uri: str, engine_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "LORAFLOW_HOME": str(tmp_path / "home"), "LORAFLOW_ARTIFACT_URI": artifact_uri}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert (
        cli(
            "adapters", "register", "support", str(assets.adapters["a1"]), "--base", str(assets.base)
        ).returncode
        == 0
    )
    assert cli("adapters", "promote", "support", "v1", *FORCE).returncode == 0
    serve = ["loraflow", "serve", "--base-model", str(assets.base), "--model-name", "tiny"]

    refused = cli(*serve, "--workers", "2", "--port", str(free_port()))  # no running replica named
    assert refused.returncode == 2 and "--workers" in refused.stderr, refused.stderr
    # A worker that cannot start stops them all, once, rather than being restarted: here its
    # gateway cannot be built (the registry is unreachable), or its start-up fails (a traffic
    # setting the writer refuses).
    for setting, value in (
        ("LORAFLOW_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/none"),
        ("LORAFLOW_TRAFFIC__PERSON_NAMES", "true"),
    ):
        command = [str(BIN / serve[0]), *serve[1:], "--engine-url", engine_url, "--workers", "2"]
        failed = subprocess.run(
            [*command, "--port", str(free_port())],
            env={**env, setting: value},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        output = failed.stdout + failed.stderr
        assert failed.returncode == 10 and "a gateway worker failed to start" in output, output[-3000:]
        restarts = max(output.count("Started server process"), output.count("this worker cannot start"))
        assert restarts <= 2, output[-3000:]  # not a restart loop (run's timeout bounds a hang)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                str(BIN / serve[0]),
                *serve[1:],
                "--engine-url",
                engine_url,
                "--workers",
                "2",
                "--port",
                str(port),
            ],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until_ok(f"{url}/ready", 180, alive=lambda: process.poll() is None), log.read_text()[
            -3000:
        ]
        deadline = time.monotonic() + 120  # /ready answered by one; the other may still be starting
        while log.read_text().count("Application startup complete") < 2:
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        for i in range(REQUESTS):  # a connection each: the kernel hands them to either worker
            for _ in range(50):  # a worker answers 503 until its first routing snapshot is in
                r = httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "support", "prompt": f"hi {i}", "max_tokens": 2},
                    timeout=60,
                )
                if r.status_code != 503:
                    break
                assert r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"], r.text
                time.sleep(0.1)
            assert r.status_code == 200, r.text
            assert r.headers["x-loraflow-model"] == "support@v1"
        workers = set(re.findall(r"Started server process \[(\d+)\]", log.read_text()))
        assert len(workers) == 2, log.read_text()[-3000:]
        up_pattern = re.compile(r'^loraflow_replica_up\{replica="[^"]+",worker="(\d+)"\} 1\.0$', re.M)
        # Each worker publishes its view every second, so a scrape answered by the other worker
        # shows a worker's first routing snapshot up to a period late. Once both are in, every
        # scrape, whichever worker answers it (a new connection each), must show both.
        deadline, good = time.monotonic() + 30, 0
        while good < 6:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            ok = set(up_pattern.findall(text)) == workers
            good = good + 1 if ok else 0
            assert ok or time.monotonic() < deadline, text
            if ok:
                assert requests_counted(text) == REQUESTS, text
            else:
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()[-3000:]
    assert log.read_text().count("Application shutdown complete") == 2
