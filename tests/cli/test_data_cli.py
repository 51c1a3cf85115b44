"""`loraflow data validate` checks structure without a base model; token lengths need one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app

pytestmark = pytest.mark.unit
runner = CliRunner()


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_validate_without_a_base_checks_structure(tmp_path: Path) -> None:
    bad = _write(
        tmp_path / "bad.jsonl",
        [
            json.dumps({"prompt": "hi", "completion": "there"}),
            "{not json",
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            json.dumps({"instruction": "do it"}),
        ],
    )
    result = runner.invoke(app, ["data", "validate", str(bad)])
    assert result.exit_code == 2, result.output
    numbered = [line for line in result.output.splitlines() if line.startswith(str(bad))]
    assert [int(line.split(":")[1]) for line in numbered] == [2, 3, 4]
    assert "invalid JSON" in numbered[0] and "bad role order" in numbered[1]
    assert "missing field 'output'" in numbered[2]
    assert "token lengths not checked: pass --base" in result.output

    good = _write(tmp_path / "good.jsonl", [json.dumps({"prompt": "hi", "completion": "there"})] * 3)
    result = runner.invoke(app, ["data", "validate", str(good), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["examples"] == 3 and summary["token_lengths_checked"] is False


def test_prepare_still_needs_a_base(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.jsonl", [json.dumps({"prompt": "hi", "completion": "there"})])
    result = runner.invoke(app, ["data", "prepare", str(good), "--name", "d"])
    assert result.exit_code == 2 and "pass --base-model or set trainer.base_model" in result.output
