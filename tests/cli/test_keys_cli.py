"""`loraflow keys`: the key is printed once, only its hash is stored, revoke is recorded."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

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
    stored = reg.api_keys()[0]
    assert stored.key_hash == hash_key(key)
    reg.close()

    assert runner.invoke(app, ["keys", "create", "billing-team"]).exit_code == 4  # name taken
    assert runner.invoke(app, ["keys", "revoke", "billing-team"]).exit_code == 0
    again = runner.invoke(app, ["keys", "revoke", "billing-team"])
    assert again.exit_code == 4 and "already revoked" in again.output
    assert runner.invoke(app, ["keys", "revoke", "nobody"]).exit_code == 3
    assert json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)[0]["revoked_at"] is not None


def _secret_dir(root: Path, keys: dict[str, str]) -> Path:
    """A folder laid out as the kubelet mounts a Secret: files behind ..data links."""
    data = root / "..2026_11_24_06_00_00.123"
    data.mkdir(parents=True)
    for name, key in keys.items():
        (data / name).write_text(key + "\n")
        (root / name).symlink_to(Path("..data") / name)
    (root / "..data").symlink_to(data.name)
    return root


def test_import_records_keys_by_hash_and_is_idempotent(tmp_path: Path) -> None:
    ops, app_key = secrets.token_hex(32), secrets.token_hex(32)
    folder = _secret_dir(tmp_path / "keys", {"ops": ops, "web-app": app_key})
    first = runner.invoke(app, ["keys", "import", str(folder), "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {"ops": "created", "web-app": "created"}
    again = runner.invoke(app, ["keys", "import", str(folder), "--json"])
    assert json.loads(again.stdout) == {"ops": "unchanged", "web-app": "unchanged"}
    reg = Registry.open(load_settings())
    stored = {k.name: k.key_hash for k in reg.api_keys()}
    reg.close()
    assert stored == {"ops": hash_key(ops), "web-app": hash_key(app_key)}


@pytest.mark.parametrize(
    ("keys", "code", "names"),
    [
        (
            {"ops": "other-" + "x" * 40, "new": secrets.token_hex(32)},
            4,
            "'ops' is recorded with a different key",
        ),
        ({"short": "lf-123", "new": secrets.token_hex(32)}, 2, "'short' is not a usable key"),
        ({"copy": "SAME", "new": secrets.token_hex(32)}, 4, "'copy' is the key recorded as 'ops'"),
    ],
)
def test_import_refuses_a_bad_entry_and_changes_nothing(
    tmp_path: Path, keys: dict[str, str], code: int, names: str
) -> None:
    ops = secrets.token_hex(32)
    assert (
        runner.invoke(app, ["keys", "import", str(_secret_dir(tmp_path / "a", {"ops": ops}))]).exit_code == 0
    )
    keys = {k: ops if v == "SAME" else v for k, v in keys.items()}
    result = runner.invoke(app, ["keys", "import", str(_secret_dir(tmp_path / "b", keys))])
    assert result.exit_code == code, result.output
    assert names in result.output
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    assert [k["name"] for k in listed] == ["ops"], "a refused import must record nothing"


def test_import_of_an_empty_or_missing_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert runner.invoke(app, ["keys", "import", str(tmp_path / "empty")]).exit_code == 2
    assert runner.invoke(app, ["keys", "import", str(tmp_path / "missing")]).exit_code == 2


def test_scopes_are_chosen_at_creation_and_a_bad_one_names_itself(tmp_path: Path) -> None:
    bad = runner.invoke(app, ["keys", "create", "ci", "--scope", "admin"])
    assert bad.exit_code == 2 and "unknown scope 'admin'" in bad.output and "versions" in bad.output
    assert json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout) == []  # nothing written
    made = runner.invoke(app, ["keys", "create", "ci", "--scope", "versions", "--scope", "base", "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["scopes"] == ["base", "versions"]
    assert json.loads(runner.invoke(app, ["keys", "create", "plain", "--json"]).stdout)["scopes"] == []
    folder = _secret_dir(tmp_path / "keys", {"reviewer": secrets.token_hex(32)})
    assert runner.invoke(app, ["keys", "import", str(folder), "--scope", "review"]).exit_code == 0
    listed = {k["name"]: k for k in json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)}
    assert listed["reviewer"]["scopes"] == ["review"] and not listed["reviewer"]["scopes_migrated"]
    table = runner.invoke(app, ["keys", "list"], env={"COLUMNS": "200"})
    assert "base, versions" in table.stdout and " *" not in table.stdout  # nothing migrated here


def test_limits_are_set_on_the_key_and_a_bad_one_is_refused() -> None:
    made = runner.invoke(app, ["keys", "create", "ci", "--rpm", "600", "--max-concurrency", "4", "--json"])
    assert made.exit_code == 0, made.output
    record = json.loads(made.stdout)
    assert (record["rpm"], record["tpm"], record["max_concurrency"]) == (600, None, 4)
    bad = runner.invoke(app, ["keys", "create", "ci2", "--rpm", "0"])
    assert bad.exit_code == 2 and "--rpm" in bad.output
    assert "600/-/4" in runner.invoke(app, ["keys", "list"], env={"COLUMNS": "200"}).stdout
