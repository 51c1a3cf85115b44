"""Reading a JSON request body: one parser for every endpoint that takes one.

Every body that is not a JSON object is a 400 in OpenAI's shape with ``param`` = ``body``,
never a 500: bytes that are not JSON, nor UTF-8 (or the UTF-16/32 that JSON allows); an
empty body; a list, string, number or null; nesting deeper than the parser can follow;
``NaN`` and ``Infinity`` (Python's extension, which the traffic store would write and other
JSON readers refuse); and a lone UTF-16 surrogate (``"\\ud800"``), which is valid JSON
text but no Unicode string: the engine's pydantic refuses it, and the traffic store could
not encode it (a batch of other requests' records would be dropped with it). A body past
``server.max_body_bytes`` is a 413 (:func:`read_capped`), never read whole.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, NoReturn

from starlette.requests import Request

from loraflow.registry.errors import InvalidArgumentError, RequestTimeoutError, RequestTooLargeError

# A \uD800-\uDFFF escape: a lone surrogate, or one half of a pair (checked after parsing).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


async def read_capped(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request's body, refused with :class:`RequestTooLargeError` from its ``Content-Length``
    before a byte is read, or as soon as what arrives passes ``limit`` (a chunked body has no
    length): a client cannot make the gateway buffer more than ``limit`` bytes. A body not
    whole within ``timeout_s`` is a :class:`RequestTimeoutError` (408)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request, limit)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout_s:g} s (server.body_timeout_s)", param="body"
        ) from None


async def _read(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(
            f"the request body is {int(declared)} bytes; the limit is {limit} (server.max_body_bytes)",
            param="body",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(
                f"the request body is over {limit} bytes (server.max_body_bytes)", param="body"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(raw: bytes) -> dict[str, Any]:
    """The body as a dict, or :class:`InvalidArgumentError` (``param="body"``) saying why not."""
    try:
        # Decoded strictly first: json.loads(bytes) would let an encoded surrogate through
        # (it decodes with surrogatepass), which the escape check below cannot see.
        text = raw.decode(json.detect_encoding(raw))
        data = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidArgumentError(f"the request body is not valid JSON ({exc})", param="body") from None
    except RecursionError:
        raise InvalidArgumentError("the request body is nested too deeply", param="body") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"the request body must be a JSON object, not {_kind(data)}", param="body")
    if _SURROGATE_ESCAPE.search(text):  # rare: only then is the whole value encoded once more
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidArgumentError(
                "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                "which is not a Unicode character",
                param="body",
            ) from None
    return data


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"
