"""Datasets in, LoRA/QLoRA adapters out (see docs/architecture.md)."""
