"""Slow and stalled clients against a real uvicorn server running the gateway: each holds a
connection or a slot for a bounded time (server.header_timeout_s, body_timeout_s,
send_timeout_s), never for ever."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from loraflow.registry.keys import create_key
from tests.fake_vllm import FakeVLLM, Setup, served, wait
from tests.fake_vllm import gateway_setup as gateway_setup

pytestmark = pytest.mark.unit

DEADLINE_S = 1.0


@contextmanager
def _served(s: Setup, engine: FakeVLLM, **server: Any) -> Iterator[tuple[str, int, Any]]:
    deadlines = {"header_timeout_s": DEADLINE_S, "body_timeout_s": DEADLINE_S, "send_timeout_s": DEADLINE_S}
    with served(s, engine, **deadlines, **server) as gateway:
        yield gateway.url, gateway.port, gateway.app


def _closed_within(sock: socket.socket, seconds: float, *, drip: bytes = b"") -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``seconds`` while the client sends ``drip``
    every 0.2 s (nothing if empty); and what the server sent before closing."""
    received = b""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            chunk = None
        except ConnectionResetError:
            return True, received
        if chunk == b"":
            return True, received
        if chunk:
            received += chunk
        if drip:
            try:
                sock.sendall(drip)
            except (BrokenPipeError, ConnectionResetError):
                return True, received
    return False, received


def test_a_client_that_never_finishes_its_head_is_closed(gateway_setup: Setup) -> None:
    engine = FakeVLLM("http://replica-0", str(gateway_setup.base))
    with _served(gateway_setup, engine) as (_, port, _app):
        with socket.create_connection(("127.0.0.1", port)) as silent:
            assert _closed_within(silent, DEADLINE_S + 3)[0]
        with socket.create_connection(("127.0.0.1", port)) as slowloris:
            slowloris.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n")
            assert _closed_within(slowloris, DEADLINE_S + 3, drip=b"X")[0]  # one header byte at a time


def test_an_unfinished_body_is_a_408_and_without_a_key_a_401_then_closed(gateway_setup: Setup) -> None:
    engine = FakeVLLM("http://replica-0", str(gateway_setup.base))
    key, _ = create_key(gateway_setup.registry, "tenant", ["support"])
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n{auth}\r\n"
    )
    with _served(gateway_setup, engine, auth=True) as (url, port, _app):
        wait(
            lambda: (
                httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
            ),
            "the keys",
        )
        with socket.create_connection(("127.0.0.1", port)) as keyed:
            keyed.sendall(head.format(auth=f"Authorization: Bearer {key}\r\n").encode() + b'{"model": "s')
            closed, answer = _closed_within(keyed, DEADLINE_S + 5, drip=b" ")
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"body_timeout_s" in answer
        with socket.create_connection(("127.0.0.1", port)) as anonymous:
            anonymous.sendall(head.format(auth="").encode() + b'{"model": "s')
            closed, answer = _closed_within(anonymous, DEADLINE_S + 5, drip=b" ")
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]  # at once, from the headers
            assert closed  # and the body it still drips is not waited for


def test_a_stream_whose_client_stops_reading_is_cut_off_and_frees_its_slot(gateway_setup: Setup) -> None:
    engine = FakeVLLM("http://replica-0", str(gateway_setup.base))
    engine.answer = lambda body: " ".join(["x" * 20_000] * 1_500)  # 30 MB: more than any socket buffers
    with _served(gateway_setup, engine, max_concurrency=1) as (url, port, app):
        body = b'{"model": "support", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            gateway = app.state.gateway
            wait(lambda: gateway.in_flight == 1, "the stream to start")
            started = time.monotonic()
            wait(
                lambda: gateway.in_flight == 0, "the stalled stream to be cut off", timeout_s=DEADLINE_S + 20
            )
            assert time.monotonic() - started < DEADLINE_S + 20
        engine.answer = None
        ok = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "support", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert ok.status_code == 200  # the one slot is free again


def test_an_oversized_body_or_one_without_a_key_is_answered_and_its_connection_closed(
    gateway_setup: Setup,
) -> None:
    engine = FakeVLLM("http://replica-0", str(gateway_setup.base))
    with _served(gateway_setup, engine, auth=True) as (_, port, _app):
        for head in (
            "Content-Length: 31457280\r\n",  # 30 MiB, past max_body_bytes: 413 from the header
            "Transfer-Encoding: chunked\r\n",  # no key: 401 before a byte of the body is read
        ):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\n{head}\r\n".encode())
                closed, answer = _closed_within(sock, 3, drip=b"x" * 65536)
                assert answer.split(b"\r\n", 1)[0] in (
                    b"HTTP/1.1 413 Request Entity Too Large",
                    b"HTTP/1.1 401 Unauthorized",
                )
                assert b"connection: close" in answer.lower() and closed  # not read and thrown away
