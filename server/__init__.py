"""The OpenAI-compatible gateway in front of vLLM multi-LoRA engines (see docs/architecture.md)."""
