"""CI fails when a real component it needs cannot start, and a skipped tier is not a pass."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def _ci_checkout(
    tmp_path: Path,
    postgres: str,
    chromium: str = "echo /usr/bin/chromium",
    node: str = "echo /usr/bin/node",
    moto: str = 'touch "$(dirname "$0")/moto-checked"',
) -> Path:
    """.ci/run as committed, with stand-ins for what it calls: the database, browser, node, the moto
    check, setup and pytest."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    _stub(repo / ".ci" / "postgres", postgres)
    _stub(repo / ".ci" / "chromium", chromium)
    _stub(repo / ".ci" / "node", node)
    _stub(repo / ".ci" / "moto", moto)
    _stub(repo / ".ci" / "setup", f'touch "{tmp_path}/setup-ran"')
    _stub(
        repo / ".venv" / "bin" / "python",
        f'echo "$LORAFLOW_TEST_DATABASE_URL $LORAFLOW_TEST_REQUIRE_SERVICES $LORAFLOW_TEST_CHROMIUM $*" '
        f'> "{tmp_path}/pytest-ran"',
    )
    return repo


def test_ci_stops_when_postgresql_cannot_start(tmp_path: Path) -> None:
    repo = _ci_checkout(tmp_path, 'echo "initdb: could not create directory" >&2; exit 1')
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert not (tmp_path / "setup-ran").exists() and not (tmp_path / "pytest-ran").exists()

    repo = _ci_checkout(tmp_path / "silent", "exit 0")  # started nothing and said nothing
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "printed no URL" in done.stderr


def test_ci_stops_when_chromium_cannot_be_installed(tmp_path: Path) -> None:
    postgres = "echo postgresql://postgres@127.0.0.1:5/postgres"
    repo = _ci_checkout(tmp_path, postgres, chromium='echo "E: Unable to locate package" >&2; exit 100')
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and not (tmp_path / "pytest-ran").exists()
    repo = _ci_checkout(tmp_path / "silent", postgres, chromium="exit 0")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "printed no path" in done.stderr


def test_ci_stops_when_node_or_moto_cannot_start(tmp_path: Path) -> None:
    postgres = "echo postgresql://postgres@127.0.0.1:5/postgres"
    repo = _ci_checkout(tmp_path, postgres, node='echo "E: Unable to locate package npm" >&2; exit 100')
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and not (tmp_path / "pytest-ran").exists()
    assert not (tmp_path / "setup-ran").exists()
    repo = _ci_checkout(tmp_path / "silent", postgres, node="exit 0")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "printed no path" in done.stderr
    repo = _ci_checkout(tmp_path / "moto", postgres, moto='echo "moto did not start" >&2; exit 1')
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "moto did not start" in done.stderr
    assert not (tmp_path / "moto" / "pytest-ran").exists()


def test_the_moto_check_starts_a_real_server_and_fails_without_one(tmp_path: Path) -> None:
    check = ROOT / ".ci" / "moto"
    done = subprocess.run(["bash", str(check), sys.executable], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # An interpreter that cannot run moto (it exits at once): the check fails and says so.
    broken = tmp_path / "python"
    _stub(broken, f'if [ "$1" = -m ]; then exit 1; fi; exec "{sys.executable}" "$@"')
    done = subprocess.run(["bash", str(check), str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "did not start" in done.stderr


def test_ci_runs_the_readme_command_with_the_database_and_no_skips_allowed(tmp_path: Path) -> None:
    repo = _ci_checkout(tmp_path, "echo postgresql://postgres@127.0.0.1:5/postgres")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "setup-ran").exists()
    assert (repo / ".ci" / "moto-checked").exists()
    assert (tmp_path / "pytest-ran").read_text().split() == [
        "postgresql://postgres@127.0.0.1:5/postgres",
        "1",
        "/usr/bin/chromium",
        "-m",
        "pytest",
    ]
    readme = (ROOT / "README.md").read_text()
    assert "bash .ci/setup && .venv/bin/python -m pytest" in readme
    assert "bash .ci/setup && .venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_a_skipped_postgresql_tier_fails_under_ci(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LORAFLOW_TEST_DATABASE_URL"}
    env["LORAFLOW_TEST_REQUIRE_SERVICES"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/store/test_registry.py",
            "-k",
            "schema_upgrade_policy",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout[-2000:]
    assert "the PostgreSQL tier cannot be skipped" in done.stdout
    assert "1 passed" in done.stdout  # the SQLite half ran
