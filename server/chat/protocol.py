"""Wire types of /v1/chat/completions: the ``openai`` package's, described and never re-validated."""

from __future__ import annotations

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

ChatCompletionRequest = CompletionCreateParamsBase

# Every field of OpenAI's request (``stream`` is declared by the streaming variants): the fields
# the gateway forwards, with the vLLM extras ``server.engine_extra_fields`` allows.
FIELDS = frozenset(
    ChatCompletionRequest.__required_keys__ | ChatCompletionRequest.__optional_keys__ | {"stream"}
)

__all__ = ["FIELDS", "ChatCompletion", "ChatCompletionChunk", "ChatCompletionRequest"]
