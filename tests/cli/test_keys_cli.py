"""`loraflow keys`: the key is printed once, only its hash is stored, revoke is recorded."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from loraflow.registry.keys import hash_key
from loraflow.registry.service import Registry
from loraflow.registry.settings import load_settings

pytestmark = pytest.mark.unit
runner = CliRunner()


def test_create_list_revoke() -> None:
    result = runner.invoke(app, ["keys", "create", "billing-team", "--adapter", "billing"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("lf-") and len(key) > 30
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    assert listed[0]["name"] == "billing-team" and listed[0]["adapters"] == ["billing"]
    assert key not in json.dumps(listed) and "key_hash" not in listed[0]
    reg = Registry.open(load_settings())
    stored = reg.store.list_api_keys()[0]
    assert stored.key_hash == hash_key(key)
    reg.close()

    assert runner.invoke(app, ["keys", "create", "billing-team"]).exit_code == 4  # name taken
    assert runner.invoke(app, ["keys", "revoke", "billing-team"]).exit_code == 0
    again = runner.invoke(app, ["keys", "revoke", "billing-team"])
    assert again.exit_code == 4 and "already revoked" in again.output
    assert runner.invoke(app, ["keys", "revoke", "nobody"]).exit_code == 3
    assert json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)[0]["revoked_at"] is not None
