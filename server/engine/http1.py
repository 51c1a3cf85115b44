"""A lean keep-alive HTTP/1.1 client for the gateway's hot path: completion calls to one engine.

Why not httpx here: under the null engine, py-spy put most of the gateway's CPU per proxied
request in httpcore and anyio (bench/README.md, gateway_overhead). httpcore's pool walks every
pooled connection on each request added and removed and polls each idle socket; the request
head and body are two socket writes, each behind a cancel scope; and anyio and sniffio look the
running loop up many times per request, which on Python 3.11 is a ``getpid`` system call each.

This client does one thing: POST a body to one ``http://`` (or ``https://``) origin, and hand
back the status and the body, whole or as it arrives. A request is one ``transport.write``; the
response is parsed by httptools (uvicorn's parser) inside an ``asyncio.Protocol``; idle
connections sit on a stack, most recent on top. What it keeps from httpx's behaviour:

- a read timeout between two pieces of the response, and a connect timeout;
- an idle connection is dropped after ``idle_s``, below the 5 s after which uvicorn (vLLM's
  server) closes it, so a request rarely lands on a connection the server is closing; when one
  does (the connection ends within ``_STALE_RACE_S`` of the request, before any byte of the
  answer), the request is sent again, once, on a new connection;
- a response not read to its end closes its connection rather than returning it to the pool;
- at most ``max_connections`` requests at once (httpx's limit was the same 256); more wait;
- 1xx answers are skipped, a body without Content-Length or chunking ends with the connection,
  and bytes nobody asked for (on an idle connection, or after the answer in the same read) close it.

Admin calls (adapter loads, health, model lists) stay on httpx: they are rare, and its
features cost nothing there.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024  # buffered response bytes past which the socket stops being read
# A reused connection that ends this soon after the request went out, with no byte of answer, is
# one the server closed while idle (the request crossed its FIN): the request is sent again.
_STALE_RACE_S = 0.25


class HttpError(Exception):
    """The request got no complete HTTP answer."""


class ConnectFailed(HttpError):
    """No connection could be opened: refused, unreachable, or the connect timed out."""


class ConnectionLost(HttpError):
    """The connection closed or broke before the answer ended."""


class ReadTimeout(HttpError):
    """The server sent nothing for longer than the read timeout."""


class ProtocolError(HttpError):
    """The server's bytes are not a valid HTTP/1.1 response."""


class _Connection(asyncio.Protocol):
    """One TCP connection; it carries one request at a time."""

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.active = False  # a request is out and its answer not yet handed back
        self.sent_at = 0.0
        self.status = 0
        self.headers_done = False
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: else the body ends when the connection does
        self.informational = False  # inside a 1xx answer, which a final answer follows
        self.complete = False
        self.answered = False  # any byte of the response arrived
        self.error: HttpError | None = None
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:  # nobody asked: they would be taken for the next answer
            self._fail(ProtocolError("the server sent bytes nobody asked for"))
            self.close()
            return
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # raised by a callback of ours
            self._fail(exc.__context__ if isinstance(exc.__context__, HttpError) else ProtocolError(str(exc)))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.active and self.headers_done and not self.complete and not self.framed and exc is None:
            self.complete, self.keep_alive = True, False  # a body delimited by the end of the connection
            self._wake()
        elif not self.complete:
            self._fail(
                ConnectionLost(f"connection closed: {exc}" if exc else "connection closed by the server")
            )
        self._pool._forget(self)
        self._transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer in the same read as the end of ours: nobody asked for it, and the
            # parser would add its body to ours. Raised here, feed_data stops and the connection closes.
            raise ProtocolError("the server sent bytes nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self.informational = True  # 100 Continue and the like: the answer is still to come
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()  # the parser forgets it once the body ends
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational, self.framed = False, False
            return
        self.complete = True
        self._wake()

    # used by the pool and Response
    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and self.error is None

    def send(self, data: bytes) -> None:
        assert self._transport is not None and not self.active and not self._chunks
        self.active, self.sent_at = True, time.monotonic()
        self.status, self.headers_done, self.complete, self.answered = 0, False, False, False
        self.framed, self.informational = False, False
        self._transport.write(data)

    async def wait(self) -> None:
        """Until the parser has something new, the connection failed, or the read timeout passed."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._pool.read_timeout_s, self._expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> bytes | None:
        """The oldest unread piece of the body, or None when none has arrived."""
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= _HIGH_WATER // 4 and self._transport is not None:
            self._transport.resume_reading()
            self._paused = False
        return chunk

    def reusable(self) -> bool:
        """The answer was read to its end and the server keeps the connection open."""
        return self.complete and not self._chunks and self.usable and self.keep_alive

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: HttpError) -> None:
        if self.error is None:
            self.error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(ReadTimeout(f"no data from the server for {self._pool.read_timeout_s:g} s"))


class Response:
    """The status of an answer, and its body to read once: whole (``read``) or as it comes
    (``chunks``). ``aclose`` (always call it) returns a finished connection to the pool."""

    def __init__(self, conn: _Connection, pool: Http1Pool) -> None:
        self._conn = conn
        self._pool = pool
        self.status = conn.status
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            chunk = conn.take()
            if chunk is not None:
                yield chunk
            elif conn.complete:
                return
            else:
                await conn.wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._conn.reusable():
            self._pool._release(self._conn)
        else:
            self._conn.close()  # unread or broken: its remaining bytes would belong to no request
        self._pool._slots.release()


class Http1Pool:
    """Keep-alive connections to one origin, and POST over them."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        idle_s: float = 4.0,
        max_idle: int = 64,
        max_connections: int = 256,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.rpartition("@")[2].encode("idna")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle_s = idle_s
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)  # requests in flight, each on its own connection
        self._closed = False

    async def post(self, path: str, body: bytes, content_type: bytes = b"application/json") -> Response:
        """Send the request; return once the answer's status and headers are in."""
        data = b"".join(
            (
                b"POST ",
                (self._prefix + path).encode(),
                b" HTTP/1.1\r\nHost: ",
                self._host_header,
                b"\r\nContent-Type: ",
                content_type,
                b"\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        await self._slots.acquire()
        try:
            conn, reused = await self._acquire()
            while True:
                conn.send(data)
                try:
                    while not conn.headers_done:
                        await conn.wait()
                except ConnectionLost:
                    if not reused or conn.answered or time.monotonic() - conn.sent_at > _STALE_RACE_S:
                        raise
                    # A kept-alive connection the server closed as the request went out; later
                    # than that, the server may have acted on the request, which is not resent.
                    conn, reused = await self._connect(), False
                    continue
                except BaseException:
                    conn.close()
                    raise
                return Response(conn, self)
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def _acquire(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable and now - conn.idle_since < self.idle_s:
                return conn, True
            conn.close()
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port, ssl=self._ssl
                )
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting timed out after {self.connect_timeout_s:g} s") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc.strerror or exc}") from exc
        return conn

    def _release(self, conn: _Connection) -> None:
        conn.active = False
        if self._closed or len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        """A connection closed; if it was idle, it leaves the pool."""
        if conn in self._idle:
            self._idle.remove(conn)
