"""The gateway's HTTP server: one uvicorn configuration for `serve`, its workers and the embedded
gateway, with the deadlines uvicorn itself does not keep.

A client gets three deadlines, so that a slow or stalled one holds a connection or a slot for
a bounded time, never for ever (slowloris):

* ``server.header_timeout_s``: to send a request's head (request line and headers), counted
  from the connection or the end of the previous response. uvicorn closes an idle kept-alive
  connection, but a client that sends one byte of a head now and then resets that timer, and
  nothing bounds the first request's head. :class:`DeadlineProtocol` closes the connection.
  It also closes a connection whose request body is still arriving after its response went
  out (a 401 or 413 answered without reading the body).
* ``server.body_timeout_s``: to send the body, once the head is in: a 408
  (:func:`~loraflow.server.body.read_capped`).
* ``server.send_timeout_s``: to take each piece of an answer. A client that stops reading a
  stream is cut off and its slot freed (:class:`TimedStreamingResponse`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import uvicorn
from starlette.responses import StreamingResponse
from starlette.types import Message, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from loraflow.registry.settings import ServerSettings

log = logging.getLogger("loraflow.gateway")


class GatewayConfig(uvicorn.Config):
    """uvicorn's configuration plus the head deadline, which the protocol reads from it (a
    configuration is pickled to each worker process, so the deadline travels with it)."""

    def __init__(self, app: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, http=DeadlineProtocol, **kwargs)
        self.header_timeout_s = header_timeout_s


def server_config(app: Any, settings: ServerSettings, **kwargs: Any) -> GatewayConfig:
    """The one uvicorn configuration of a gateway: its deadlines and its shutdown budget."""
    return GatewayConfig(
        app,
        header_timeout_s=settings.header_timeout_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        **kwargs,
    )


class DeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol (httptools, or h11 without it), closing a connection that has
    not sent a whole request head within ``header_timeout_s``."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving():
            self._disarm()
        else:
            self._arm()  # bytes of a head, or of a body nobody reads: the deadline keeps running

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._serving():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _serving(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _arm(self) -> None:
        if self._deadline is None and self.transport is not None:
            timeout = float(getattr(self.config, "header_timeout_s", 0) or 0)
            if timeout > 0:
                self._deadline = self.loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self._serving() and not self.transport.is_closing():
            log.info(
                "closed a connection that sent no complete request head in time (server.header_timeout_s)"
            )
            self.transport.close()


class TimedStreamingResponse(StreamingResponse):
    """A stream whose client must take each event within ``send_timeout_s``; one that stops
    reading is cut off, and the stream's generator is closed, which frees its slot."""

    def __init__(self, *args: Any, send_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send: Send) -> None:
        async def timed(message: Message) -> None:
            with anyio.fail_after(self.send_timeout_s):
                await send(message)

        try:
            await super().stream_response(timed)
        except TimeoutError:
            # Returning with the response unfinished makes uvicorn close the connection.
            log.warning(
                "cut off a client that took no stream data for %.0f s (server.send_timeout_s)",
                self.send_timeout_s,
            )
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # the relay's finally: its slot and the engine's stream are released
