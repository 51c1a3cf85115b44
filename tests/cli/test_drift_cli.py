"""`loraflow drift` checks the adapter name before it loads the embedding model."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from loraflow.registry.service import Registry

pytestmark = pytest.mark.unit


def test_an_unknown_adapter_is_refused_before_the_embedding_model_loads(
    monkeypatch: pytest.MonkeyPatch, registry: Registry
) -> None:
    import loraflow.trainer.embed as embed

    class NoModel:
        def __init__(self, *_: object, **__: object) -> None:
            raise AssertionError("the embedding model was loaded for an adapter that does not exist")

    monkeypatch.setattr(embed, "Embedder", NoModel)
    # ``registry``: an existing registry without that adapter (a missing one is named, not created).
    for ref in ("ghost", "ghost@v2", "ghost:staging"):
        result = CliRunner().invoke(app, ["drift", ref, "--window", "1h"])
        assert result.exit_code == 3, result.output
        assert result.stderr.startswith("error: ") and "ghost" in result.stderr
    result = CliRunner().invoke(app, ["drift", "bad name!", "--window", "1h"])
    assert result.exit_code == 2, result.output
