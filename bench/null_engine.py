"""A vLLM replica that answers at once: the HTTP surface the gateway uses, with no model behind it.

It holds any adapter it is asked for (as the loraflow resolver would), and answers every chat
completion with a fixed reply (but for a reference number), streamed or not, one word a token.
With vLLM's ``ignore_eos`` it answers exactly ``max_tokens`` tokens, the reply's words over
again, as vLLM would.
``bench/traffic_logging.py`` puts a gateway in front of it to measure the gateway's *own*
cost, which a real engine's generation time would hide.

    python bench/null_engine.py --port 8001 --base-model /path/to/base
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = (
    "I am sorry to hear that your order arrived damaged. I have opened refund request {ref} for it, "
    "and you will receive a confirmation within two business days. Is there anything else I can do?"
)


def make_app(base: str) -> Starlette:
    loaded: set[str] = set()
    served = iter(range(10**12))

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def models(_: Request) -> JSONResponse:
        data = [{"id": base, "parent": None}] + [{"id": name, "parent": base} for name in sorted(loaded)]
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(request: Request) -> JSONResponse:
        model = (await request.json())["model"]
        if model != base:
            loaded.add(model)
        return JSONResponse({"tokens": [1], "count": 1, "max_model_len": 512})

    async def unload(request: Request) -> Response:
        loaded.discard((await request.json())["lora_name"])
        return Response("ok")

    async def chat(request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        model = body["model"]
        if model != base:
            loaded.add(model)
        words = REPLY.format(ref=f"RF-{next(served):07d}").split(" ")  # every reply its own
        if body.get("ignore_eos") and body.get("max_tokens"):
            words = [words[i % len(words)] for i in range(int(body["max_tokens"]))]
        reply = " ".join(words)
        usage = {"prompt_tokens": 48, "completion_tokens": len(words), "total_tokens": 48 + len(words)}
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "chatcmpl-null",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )

        async def events() -> AsyncIterator[bytes]:
            for i, word in enumerate(words):
                delta = {"content": word if i == 0 else " " + word}
                chunk = {
                    "id": "chatcmpl-null",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            last = {
                "id": "chatcmpl-null",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": usage,
            }
            yield b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-model", required=True, help="The id it serves the base model under.")
    args = parser.parse_args()
    uvicorn.run(make_app(args.base_model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
