"""The installed console scripts, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import FORCE, make_adapter

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / script), *args],
        cwd=cwd,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_adapters_and_loraflow_scripts(isolated_env: Path, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a1", seed=1)
    done = run("adapters", "register", "support", str(src), "--base", str(base_dir), cwd=isolated_env)
    assert done.returncode == 0, done.stderr
    assert "registered support@v1" in done.stdout
    done = run("loraflow", "adapters", "promote", "support", "v1", *FORCE, cwd=isolated_env)
    assert done.returncode == 0, done.stderr
    done = run("adapters", "show", "support", "--json", cwd=isolated_env)
    assert json.loads(done.stdout)["aliases"] == {"production": 1}

    done = run("adapters", "promote", "support", "v1", "--expect", "v3", *FORCE, cwd=isolated_env)
    assert done.returncode == 4
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert done.stdout == ""

    done = run("adapters", "show", "ghost", cwd=isolated_env)
    assert done.returncode == 3 and "adapters: support" in done.stderr


def test_db_upgrade_and_current(isolated_env: Path) -> None:
    done = run("loraflow", "db", "upgrade", cwd=isolated_env)
    assert done.returncode == 0, done.stderr
    done = run("loraflow", "db", "current", cwd=isolated_env)
    from loraflow.registry.db import head_revision

    head = head_revision()
    assert head is not None and f"database: {head}" in done.stdout and f"code: {head}" in done.stdout
