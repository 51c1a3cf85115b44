"""The `loraflow` and `adapters` command lines."""
