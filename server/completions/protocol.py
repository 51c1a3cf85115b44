"""Wire types of /v1/completions: the ``openai`` package's, described and never re-validated."""

from __future__ import annotations

from openai.types import Completion
from openai.types.completion_create_params import CompletionCreateParamsBase

CompletionRequest = CompletionCreateParamsBase

# Every field of OpenAI's request (``stream`` is declared by the streaming variants): the fields
# the gateway forwards, with the vLLM extras ``server.engine_extra_fields`` allows.
FIELDS = frozenset(CompletionRequest.__required_keys__ | CompletionRequest.__optional_keys__ | {"stream"})

__all__ = ["FIELDS", "Completion", "CompletionRequest"]
