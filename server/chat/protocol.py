"""Wire types of /v1/chat/completions: the ``openai`` package's, described and never re-validated."""

from __future__ import annotations

from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

ChatCompletionRequest = CompletionCreateParamsBase

__all__ = ["ChatCompletion", "ChatCompletionChunk", "ChatCompletionRequest"]
