"""The gateway's lean HTTP/1.1 client against a real local server (asyncio streams, loopback).

Each test's server answers by path, and counts the connections it accepted, so reuse is seen
from the server's side rather than taken from the client's word. Every test runs on asyncio's
own loop and on uvloop, the loop `loraflow serve` runs (their transports differ).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from loraflow.server.engine import http1
from loraflow.server.engine.http1 import ConnectFailed, ConnectionLost, Http1Pool, ReadTimeout
from loraflow.server.engine.protocol import EngineDown, EngineFailure, EngineRequestError
from loraflow.server.engine.vllm_http import VLLMHttpEngine

pytestmark = pytest.mark.unit

Handler = Callable[[bytes, asyncio.StreamWriter, int], Awaitable[bool]]
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """``asyncio.run`` on the loop the test is parametrized with."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run_on_loop(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    return run_on_loop


class Server:
    """Reads one request at a time per connection and passes it to ``handle(body, writer,
    request_number_on_this_connection)``, which answers and returns whether to keep reading."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.connections = 0
        self.closed = 0  # connections that ended, whichever side ended them
        self.paths: list[str] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                self.paths.append(lines[0].split(" ")[1])
                length = next(
                    int(v) for k, _, v in (x.partition(": ") for x in lines) if k.lower() == "content-length"
                )
                body = await reader.readexactly(length)
                n += 1
                if not await self.handle(body, writer, n):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


def answer(status: int, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


async def ask(pool: Http1Pool, times: int) -> list[tuple[int, bytes]]:
    """``times`` requests in turn, each answer read whole and its connection handed back."""
    got = []
    for _ in range(times):
        response = await pool.post("/x", b"{}")
        got.append((response.status, await response.read()))
        await response.aclose()
    return got


async def until(done: Callable[[], bool], what: str, deadline_s: float = 30.0) -> None:
    """Poll ``done`` against a deadline (the deadline catches a hang; it measures nothing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not done():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def never() -> None:
    """A server that has gone quiet: it answers nothing until the test ends (and cancels it)."""
    await asyncio.Event().wait()


class Clock:
    """The pool's clock (``http1.time``), moved by the test; the event loop keeps its own."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def echo(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
    writer.write(answer(200, {"got": json.loads(body), "n": n}))
    return True


def test_keeps_the_connection_alive_and_prefixes_the_url_path(run: Run) -> None:
    async def main() -> list[Any]:
        server = Server(echo)
        async with server as url:
            pool = Http1Pool(url + "/engine/")
            got = []
            for i in range(3):
                response = await pool.post("/v1/chat/completions", json.dumps({"i": i}).encode())
                got.append((response.status, json.loads(await response.read())))
                await response.aclose()
            await pool.aclose()
        assert server.connections == 1
        assert server.paths == ["/engine/v1/chat/completions"] * 3
        return got

    assert run(main()) == [(200, {"got": {"i": i}, "n": i + 1}) for i in range(3)]


def test_streams_chunks_as_the_server_sends_them(run: Run) -> None:
    sent_last = asyncio.Event()
    client_has_one = asyncio.Event()

    async def chunked(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: end\n"):
            if piece == b"data: end\n":
                # The last piece waits for the client to hold the first (on the first stream); a
                # client that held chunks back until the end never would, and after the deadline
                # the server sends the rest anyway and the test fails on what the client saw.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client_has_one.wait(), 30)
                sent_last.set()
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    async def main() -> tuple[list[bytes], bool, int]:
        server = Server(chunked)
        async with server as url:
            pool = Http1Pool(url)
            response = await pool.post("/s", b"{}")
            chunks, last_was_pending = [], False
            async for chunk in response.chunks():
                if not chunks:
                    last_was_pending = not sent_last.is_set()
                    client_has_one.set()
                chunks.append(chunk)
            await response.aclose()
            second = await pool.post("/s", b"{}")  # the finished stream's connection is reused
            await second.read()
            await second.aclose()
            await pool.aclose()
        return chunks, last_was_pending, server.connections

    chunks, first_came_early, connections = run(main())
    assert b"".join(chunks) == b"data: 1\n\ndata: 2\n\ndata: end\n"
    assert first_came_early  # the first event was handed over before the server wrote the last
    assert connections == 1


def test_a_kept_alive_connection_closed_by_the_server_is_retried_once_on_a_new_one(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close comes within the window in which it counts as crossing the request (whatever the
    # machine's load: the window is widened here; the test below is the other side of it).
    monkeypatch.setattr(http1, "_STALE_RACE_S", 3600.0)

    async def drop_second(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 2:
            return False  # closes without a byte of answer, as a server timing out keep-alive does
        writer.write(answer(200, {"n": n}))
        return True

    async def main() -> tuple[list[Any], int]:
        server = Server(drop_second)
        async with server as url:
            pool = Http1Pool(url)
            got = [json.loads(body) for _, body in await ask(pool, 2)]
            await pool.aclose()
        return got, server.connections

    got, connections = run(main())
    assert got == [{"n": 1}, {"n": 1}]  # the second request was answered on a second connection
    assert connections == 2


def test_a_new_connection_closed_without_an_answer_is_connection_lost_not_retried(run: Run) -> None:
    async def drop(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        return False

    async def main() -> int:
        server = Server(drop)
        async with server as url:
            pool = Http1Pool(url)
            with pytest.raises(ConnectionLost):
                await pool.post("/x", b"{}")
            await pool.aclose()
        return server.connections

    assert run(main()) == 1


def test_a_connection_broken_mid_body_is_connection_lost(run: Run) -> None:
    async def half(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"partial":')
        await writer.drain()
        return False

    async def main() -> None:
        async with Server(half) as url:
            pool = Http1Pool(url)
            response = await pool.post("/x", b"{}")
            with pytest.raises(ConnectionLost):
                await response.read()
            await response.aclose()
            await pool.aclose()

    run(main())


def test_silence_past_the_read_timeout_is_a_read_timeout(run: Run) -> None:
    async def silent(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        await never()
        return False

    async def main() -> None:
        async with Server(silent) as url:
            pool = Http1Pool(url, read_timeout_s=0.2)
            with pytest.raises(ReadTimeout):
                await pool.post("/x", b"{}")
            await pool.aclose()

    run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_connection_is_connect_failed(run: Run) -> None:
    async def main() -> None:
        pool = Http1Pool(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ConnectFailed):
            await pool.post("/x", b"{}")

    run(main())


def test_an_unread_answer_closes_its_connection_and_idle_ones_expire(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(http1, "time", clock)

    async def main() -> list[int]:
        server = Server(echo)
        seen = []
        async with server as url:
            pool = Http1Pool(url, idle_s=4.0)
            response = await pool.post("/x", b"{}")
            await response.aclose()  # not read: may not be reused
            await ask(pool, 1)  # read: pooled, until it has been idle 4 s
            seen.append(server.connections)
            clock.now += 3.9
            await ask(pool, 1)  # idle 3.9 s: reused
            seen.append(server.connections)
            clock.now += 4.0
            await ask(pool, 1)  # idle 4 s: dropped, and a new connection made
            seen.append(server.connections)
            await pool.aclose()
        return seen

    assert run(main()) == [2, 2, 3]


def test_the_engine_maps_transport_failures_to_whose_fault_they_are(run: Run) -> None:
    async def by_path(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        request = json.loads(body)
        if request["case"] == "bad":
            writer.write(answer(400, {"error": {"message": "bad temperature", "param": "body.temperature"}}))
        elif request["case"] == "crash":
            writer.write(answer(500, {"error": {"message": "CUDA out of memory"}}))
        elif request["case"] == "slow":
            await never()
        return request["case"] != "slow"

    async def main() -> None:
        async with Server(by_path) as url:
            engine = VLLMHttpEngine(url, timeout_s=0.2)
            with pytest.raises(EngineRequestError) as bad:
                await engine.post_json("/v1/completions", {"case": "bad"})
            assert (bad.value.status, bad.value.param) == (400, "temperature")
            with pytest.raises(EngineFailure) as crash:
                await engine.post_json("/v1/completions", {"case": "crash"})
            assert not isinstance(crash.value, EngineDown)
            with pytest.raises(EngineFailure) as slow:
                await engine.post_json("/v1/completions", {"case": "slow"})
            assert not isinstance(slow.value, EngineDown)  # slow is not gone: stays in the routing
            await engine.aclose()
        down = VLLMHttpEngine(f"http://127.0.0.1:{free_port()}")
        with pytest.raises(EngineDown):
            await down.post_json("/v1/completions", {"case": "any"})
        with pytest.raises(EngineDown):
            async for _ in down.stream("/v1/completions", {"case": "any"}):
                pass
        await down.aclose()

    run(main())


def test_informational_answers_are_skipped_and_connection_close_is_honoured(run: Run) -> None:
    async def continue_then_close(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        return True  # the client must not reuse it anyway

    async def main() -> tuple[list[tuple[int, bytes]], int]:
        server = Server(continue_then_close)
        async with server as url:
            pool = Http1Pool(url)
            got = await ask(pool, 2)
            await pool.aclose()
        return got, server.connections

    assert run(main()) == ([(200, b"ok"), (200, b"ok")], 2)


def test_a_body_without_length_ends_with_the_connection(run: Run) -> None:
    async def unframed(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        return False

    async def main() -> bytes:
        async with Server(unframed) as url:
            pool = Http1Pool(url)
            response = await pool.post("/x", b"{}")
            body = await response.read()
            await response.aclose()
            await pool.aclose()
        return body

    assert run(main()) == b"until the end"


def test_a_request_the_server_may_have_acted_on_is_not_sent_again(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close comes after the window in which it could only have crossed the request (narrowed
    # to nothing here, so no sleep has to outlast it): the server may have acted on the request.
    monkeypatch.setattr(http1, "_STALE_RACE_S", 0.0)

    async def slow_drop(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 2:
            return False  # it read the request, then the connection dropped
        writer.write(answer(200, {"n": n}))
        return True

    async def main() -> int:
        server = Server(slow_drop)
        async with server as url:
            pool = Http1Pool(url)
            response = await pool.post("/x", b"{}")
            await response.read()
            await response.aclose()
            with pytest.raises(ConnectionLost):
                await pool.post("/x", b"{}")  # on the kept-alive connection
            await pool.aclose()
        return len(server.paths)

    assert run(main()) == 2  # received once each, never resent


def test_bytes_nobody_asked_for_close_the_connection(run: Run) -> None:
    handed_back = asyncio.Event()

    async def chatty(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(answer(200, {"n": n}))
        await writer.drain()
        if not handed_back.is_set():  # the first connection only
            await handed_back.wait()
            writer.write(answer(200, {"unasked": True}))  # after the answer, on a now idle connection
        return True

    async def main() -> tuple[list[Any], int]:
        server = Server(chatty)
        async with server as url:
            pool = Http1Pool(url)
            (first,) = await ask(pool, 1)
            handed_back.set()  # the connection is idle in the pool: now the unasked bytes come
            await until(lambda: server.closed == 1, "the client to close the connection")
            (second,) = await ask(pool, 1)
            await pool.aclose()
        return [json.loads(first[1]), json.loads(second[1])], server.connections

    assert run(main()) == ([{"n": 1}, {"n": 1}], 2)  # the second answer came on a new connection


def test_bytes_after_the_answer_in_the_same_read_are_not_taken_into_it(run: Run) -> None:
    """A second answer written with ours, in one write: our body stays ours, and the connection
    that carried the stray bytes is closed, not reused."""
    stray = 0

    async def chatty(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        nonlocal stray
        if stray == 0:  # the first connection's first answer carries another behind it
            stray += 1
            writer.write(answer(200, {"n": n}) + answer(200, {"unasked": True}))
        else:
            writer.write(answer(200, {"n": n}))
        await writer.drain()
        return True

    async def main() -> tuple[list[Any], int]:
        server = Server(chatty)
        async with server as url:
            pool = Http1Pool(url)
            first, second = await ask(pool, 2)
            await pool.aclose()
        return [first[0], json.loads(first[1]), json.loads(second[1])], server.connections

    assert run(main()) == ([200, {"n": 1}, {"n": 1}], 2)


def test_requests_past_max_connections_wait_for_a_slot(run: Run) -> None:
    in_flight, most = 0, 0
    gate = asyncio.Event()

    async def held(body: bytes, writer: asyncio.StreamWriter, n: int) -> bool:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await gate.wait()  # every request is held until the test has seen who got through
        in_flight -= 1
        writer.write(answer(200, {}))
        return True

    async def main() -> None:
        server = Server(held)
        async with server as url:
            pool = Http1Pool(url, max_connections=2)

            async def one() -> int:
                response = await pool.post("/x", b"{}")
                await response.read()
                await response.aclose()
                return response.status

            requests = asyncio.gather(*(one() for _ in range(6)))
            await until(lambda: in_flight == 2, "two requests at the server")
            for _ in range(200):  # every other request gets its turns of the loop to connect
                await asyncio.sleep(0)
            assert (in_flight, server.connections) == (2, 2)  # the other four wait for a slot
            gate.set()
            assert await requests == [200] * 6
            await pool.aclose()

    run(main())
    assert most == 2
