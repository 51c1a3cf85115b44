"""A client that closes its connection before its request body has arrived, against a real uvicorn
server running the gateway: the gateway logs one line and counts nginx's 499, not an unexpected
error with a traceback and a 500; and it goes on serving."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.fake_vllm import FakeVLLM, Served, Setup, served, wait
from tests.fake_vllm import gateway_setup as gateway_setup

pytestmark = pytest.mark.unit

PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/feedback")


@pytest.fixture(name="served")
def served_gateway(gateway_setup: Setup) -> Iterator[Served]:
    with served(gateway_setup, FakeVLLM("http://replica-0", str(gateway_setup.base))) as gateway:
        yield gateway


def _leave_mid_body(port: int, path: str) -> None:
    """Promise 1000 bytes, send 14, and close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
            + b'{"model": "sup'
        )


def _requests(url: str) -> dict[str, float]:
    """loraflow_requests_total by (endpoint, status)."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("loraflow_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            endpoint = labels.split('endpoint="', 1)[1].split('"', 1)[0]
            status = labels.split('status="', 1)[1].split('"', 1)[0]
            counts[f"{endpoint} {status}"] = counts.get(f"{endpoint} {status}", 0) + float(value)
    return counts


def test_a_client_that_leaves_mid_body_is_a_499_in_one_log_line_not_a_500_with_a_traceback(
    served: Served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="loraflow")
    for path in PATHS:
        _leave_mid_body(served.port, path)
    # The log line is the signal that each one was handled: no sleeping on a guess.
    wait(
        lambda: sum("client closed the connection" in r.getMessage() for r in caplog.records) == len(PATHS),
        "three disconnects handled",
        timeout_s=30,
    )
    counts = _requests(served.url)
    assert counts == {"/v1/completions 499": 1, "/v1/chat/completions 499": 1}  # feedback is not counted
    lines = [r for r in caplog.records if "client closed the connection" in r.getMessage()]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in lines)
    assert {p for p in PATHS if any(p in r.getMessage() for r in lines)} == set(PATHS)
    assert not [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    # uvicorn logs what escapes the app ("Exception in ASGI application") to stderr itself
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "support", "prompt": "hi"}, timeout=30)
    assert r.status_code == 200, r.text  # and the gateway goes on serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err[-3000:]
