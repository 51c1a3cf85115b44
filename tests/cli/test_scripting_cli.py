"""What scripts rely on: `--json` on the commands a script calls, errors as JSON with the same exit
code, and the registered datasets made visible by `data list` and `data show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from tests.factories import FORCE, make_adapter, register_dataset

pytestmark = pytest.mark.unit
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_errors_are_json_on_stdout_with_the_same_exit_code(base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    assert invoke("adapters", "register", "support", str(src), "--base-model", str(base_dir))[0] == 0
    plain_code, plain_out, plain_err = invoke("adapters", "promote", "support@v9", *FORCE)
    code, stdout, stderr = invoke("adapters", "promote", "support@v9", *FORCE, "--json")
    assert code == plain_code == 3
    assert plain_out == "" and plain_err.startswith("error: ")
    assert stderr == ""
    error = json.loads(stdout)["error"]
    assert error == {
        "message": plain_err.removeprefix("error: ").strip(),
        "code": "not_found",
        "param": "version",
    }
    code, stdout, _ = invoke("adapters", "archive", "support", "--json")
    assert code == 2 and json.loads(stdout)["error"]["code"] == "invalid_argument"


def test_keys_create_and_revoke_json() -> None:
    code, stdout, _ = invoke("keys", "create", "ci-bot", "--json")
    assert code == 0
    created = json.loads(stdout)
    assert created["key"].startswith("lf-") and created["name"] == "ci-bot" and "key_hash" not in created
    code, stdout, _ = invoke("keys", "revoke", "ci-bot", "--json")
    assert code == 0
    revoked = json.loads(stdout)
    assert revoked["name"] == "ci-bot" and revoked["revoked_at"] is not None and "key_hash" not in revoked
    code, stdout, _ = invoke("keys", "revoke", "ci-bot", "--json")
    assert code == 4 and json.loads(stdout)["error"]["code"] == "conflict"


def test_db_current_json() -> None:
    assert invoke("db", "upgrade")[0] == 0
    code, stdout, _ = invoke("db", "current", "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["up_to_date"] is True and data["database"] == data["code"] and data["code"]


def _register_dataset(name: str, folder: Path) -> None:
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import load_settings

    reg = Registry.open(load_settings())
    try:
        register_dataset(
            reg,
            name,
            folder,
            marker=folder.name,
            counts={"train": 40, "val": 5, "test": 5},
            lineage={"kind": "file", "source": "/data/[red]tickets.jsonl", "fractions": {"val": 0.1}},
            profile={
                "tokens": {"min": 7, "max": 90},
                "format": {"json_share": 0.25},
                "embedding": {"model": "m", "dim": 4, "n": 40, "centroid": [0.0] * 4},
            },
        )
    finally:
        reg.close()


def test_data_list_and_show(tmp_path: Path) -> None:
    code, _, stderr = invoke("data", "list")  # it only reads: an empty home is not made a registry
    assert code == 3 and "no registry database at" in stderr
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import load_settings

    settings = load_settings()
    Registry.open(settings).close()
    code, stdout, _ = invoke("data", "list")
    assert code == 0 and f"no datasets registered in sqlite:///{settings.home.resolve()}" in stdout
    _register_dataset("tickets", tmp_path / "a")
    _register_dataset("tickets", tmp_path / "b")
    _register_dataset("faq", tmp_path / "c")
    code, stdout, _ = invoke("data", "list", "--json")
    assert code == 0
    assert [d["ref"] for d in json.loads(stdout)] == ["faq@v1", "tickets@v1", "tickets@v2"]
    code, stdout, _ = invoke("data", "list")
    assert code == 0 and "tickets" in stdout and "faq" in stdout
    code, stdout, _ = invoke("data", "show", "tickets")
    assert code == 0, stdout
    assert "tickets@v2" in stdout and "versions: v1, v2" in stdout
    assert "splits: train 40, val 5, test 5" in stdout
    assert "lineage source: /data/[red]tickets.jsonl" in stdout and "lineage fractions: val 0.1" in stdout
    assert "profile format: json_share 0.25" in stdout and "m (4 dims, n=40)" in stdout
    assert "{" not in stdout and "None" not in stdout
    data = json.loads(invoke("data", "show", "tickets@v1", "--json")[1])
    assert data["ref"] == "tickets@v1" and data["counts"]["train"] == 40 and data["versions"] == [1, 2]
    code, _, stderr = invoke("data", "show", "nope")
    assert code == 3 and "no dataset named 'nope'; datasets: faq, tickets" in stderr
    code, _, stderr = invoke("data", "show", "tickets@v9")
    assert code == 3 and "v9" in stderr


def test_data_prepare_json_keeps_stdout_pure_when_lines_are_bad(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    code, stdout, stderr = invoke("data", "prepare", str(data), "--name", "orders", "--json")
    assert code == 2
    assert json.loads(stdout)["error"]["param"] == "FILE"  # the whole of stdout is the JSON error
    assert f"{data}:2: " in stderr  # the bad line, by number, on stderr
