"""Start-up stays light: the CLI imports its heavy libraries only in the commands that use them.

Each check runs a fresh interpreter (the test process has imported everything already) and
reads which modules it loaded: ``sys.modules`` after ``import loraflow.cli.main``, and for the
shipped entry point ``python -X importtime .venv/bin/loraflow ...``, whose stderr names every
module imported. How long start-up takes is measured in ``bench/startup.py``, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LORAFLOW = Path(sys.executable).parent / "loraflow"
# Libraries that cost a large part of a second each to import, and the loraflow modules that pull
# them in. None of them may load for `import loraflow.cli.main` or `loraflow --help`.
HEAVY = (
    "alembic",
    "sqlalchemy",
    "sqlmodel",
    "fsspec",
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "presidio_analyzer",
    "vllm",
    "uvicorn",
    "fastapi",
    "httpx",
    "openai",
    "pydantic",  # settings and registry models: loaded by the commands that read them
    "pydantic_settings",
    "loraflow.registry.service",
    "loraflow.registry.store",
    "loraflow.registry.db",
    "loraflow.registry.artifacts",
    "loraflow.registry.settings",
    "loraflow.trainer",
    "loraflow.server",
)


def _loaded(names: set[str]) -> list[str]:
    """The HEAVY entries among ``names`` (a package counts when it or any submodule loaded)."""
    return sorted(h for h in HEAVY if any(n == h or n.startswith(h + ".") for n in names))


def _imported_by(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the shipped `loraflow` with ``args`` under ``-X importtime``: its result, and every
    module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(LORAFLOW), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    names.discard("imported package")  # importtime's header line
    return done, names


def test_importing_the_cli_loads_no_heavy_module() -> None:
    code = "import json, sys\nimport loraflow.cli.main\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert "typer" in modules and "loraflow.cli.adapters" in modules  # the check sees imports
    assert _loaded(modules) == [], (
        "import these inside the command that uses them (or under TYPE_CHECKING), not at the top "
        "of a cli/ module or of a module cli/ imports at its top"
    )


def test_help_loads_no_heavy_module() -> None:
    done, modules = _imported_by("--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapters" in done.stdout
    assert "typer" in modules
    assert _loaded(modules) == []


def test_reading_a_registry_at_head_does_not_import_alembic() -> None:
    """`db upgrade` needs Alembic; `adapters list` on a database already at head does not."""
    upgraded, modules = _imported_by("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert "alembic" in modules  # the check sees Alembic when it is imported

    listed, modules = _imported_by("adapters", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "sqlalchemy" in modules
    assert "alembic" not in modules
    assert not {"torch", "transformers", "fsspec"} & modules


def test_the_head_read_from_the_migration_files_is_alembics() -> None:
    from loraflow.registry import db

    assert db.head_from_files() is not None
    assert db.head_from_files() == db.head_revision()


def test_a_database_behind_head_is_still_upgraded(tmp_path: Path) -> None:
    """The plain-SQL shortcut only skips Alembic at head: a database stamped older is upgraded."""
    from loraflow.registry import db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        db.upgrade(engine, "0001")
        assert db.stamped_revision(engine) == "0001"
        db.ensure_schema(engine)
        assert db.stamped_revision(engine) == db.head_revision()
    finally:
        engine.dispose()
