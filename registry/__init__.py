"""The adapter registry: immutable adapter versions, movable aliases, lineage, artifacts."""
