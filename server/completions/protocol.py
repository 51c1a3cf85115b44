"""Wire types of /v1/completions: the ``openai`` package's, described and never re-validated."""

from __future__ import annotations

from openai.types import Completion
from openai.types.completion_create_params import CompletionCreateParamsBase

CompletionRequest = CompletionCreateParamsBase

__all__ = ["Completion", "CompletionRequest"]
