"""Registrations and promotes from separate processes at once, on SQLite and on PostgreSQL.

Each worker is a real process running the real `adapters` CLI. The workers
import everything first and then wait on a start file, so the commands
themselves really race rather than being serialized by start-up time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from itertools import pairwise
from pathlib import Path

import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.factories import FORCE, FORCED, gate_report, make_adapter

# One tier: real processes racing. The `db_url` fixture runs them on SQLite and on PostgreSQL.
pytestmark = pytest.mark.integration

WORKERS = 6
# The CLI module imports its heavy parts inside each command: import them here, before the start
# line, so that start-up time cannot serialize the race.
HARNESS = """
import os, sys, time
import loraflow.registry.service
from loraflow.cli.adapters import app
ready, go = sys.argv[1], sys.argv[2]
open(ready, "x").close()
while not os.path.exists(go):
    time.sleep(0.002)
sys.argv = ["adapters", *sys.argv[3:]]
app()
"""


def race(tmp_path: Path, db_url: str, commands: list[list[str]]) -> list[tuple[int, str]]:
    env = {**os.environ, "LORAFLOW_HOME": str(tmp_path / "home"), "LORAFLOW_DATABASE_URL": db_url}
    barrier = tmp_path / f"race-{uuid.uuid4().hex[:8]}"
    barrier.mkdir()
    go, ready = barrier / "go", [barrier / f"ready-{i}" for i in range(len(commands))]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HARNESS, str(ready[i]), str(go), *cmd],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, cmd in enumerate(commands)
    ]
    # Every worker has imported everything and waits on the start line, then all start at once.
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        died = [p for p in procs if p.poll() is not None]
        if died or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            output = died[0].communicate()[0] if died else ""
            pytest.fail(f"a worker never reached the start line: {output[-2000:]}")
        time.sleep(0.01)
    go.touch()
    results = []
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        results.append((proc.returncode, output))
    return results


@pytest.fixture
def reg(db_url: str, tmp_path: Path) -> Registry:
    r = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    yield r
    r.close()


def test_concurrent_registrations_get_distinct_versions(
    reg: Registry, db_url: str, base_dir: Path, tmp_path: Path
) -> None:
    dirs = [make_adapter(tmp_path / f"a{i}", seed=100 + i) for i in range(WORKERS)]
    results = race(
        tmp_path, db_url, [["register", "racer", str(d), "--base", str(base_dir), "--json"] for d in dirs]
    )
    assert all(code == 0 for code, _ in results), results
    claimed = sorted(json.loads(out)["version"] for _, out in results)
    assert claimed == list(range(1, WORKERS + 1))
    info = reg.get("racer")
    assert [v.version for v in info.versions] == list(range(1, WORKERS + 1))
    assert len({v.digest for v in info.versions}) == WORKERS


def test_compare_and_swap_promotes_have_one_winner(
    reg: Registry, db_url: str, base_dir: Path, tmp_path: Path
) -> None:
    for i in range(WORKERS + 1):
        reg.register("racer", make_adapter(tmp_path / f"a{i}", seed=i), base_model=str(base_dir))
    reg.promote("racer", 1, force=True, reason=FORCED)
    results = race(
        tmp_path,
        db_url,
        [["promote", "racer", f"v{v}", "--expect", "v1", *FORCE] for v in range(2, WORKERS + 2)],
    )
    codes = sorted(code for code, _ in results)
    assert codes == [0] + [4] * (WORKERS - 1), results
    for code, output in results:
        if code == 4:
            assert "someone moved it first" in output
    moves = reg.history("racer").moves
    assert len(moves) == 2 and moves[1].from_version == 1
    assert reg.get("racer").aliases["production"] == moves[1].to_version


def test_concurrent_promotes_keep_alias_history_linear(
    reg: Registry, db_url: str, base_dir: Path, tmp_path: Path
) -> None:
    for i in range(WORKERS):
        reg.register("racer", make_adapter(tmp_path / f"a{i}", seed=i), base_model=str(base_dir))
    commands = [["promote", "racer", f"v{v}", *FORCE] for v in range(1, WORKERS + 1)]
    commands += [["promote", "racer", f"v{v}", "--alias", "staging"] for v in range(1, WORKERS + 1)]
    results = race(tmp_path, db_url, commands)
    assert all(code == 0 for code, _ in results), results
    history = reg.history("racer")
    for alias in ("production", "staging"):
        moves = [m for m in history.moves if m.alias == alias]
        assert len(moves) == WORKERS
        assert moves[0].from_version is None
        for earlier, later in pairwise(moves):
            assert later.from_version == earlier.to_version
            assert later.revision > earlier.revision
        assert reg.get("racer").aliases[alias] == moves[-1].to_version
    assert len({m.revision for m in history.moves}) == 2 * WORKERS  # one revision per move


def test_gated_first_promotions_have_one_winner(
    reg: Registry, db_url: str, base_dir: Path, tmp_path: Path
) -> None:
    """Gated promotes (no --force) racing to be an adapter's first production: every report was
    judged against no production, so exactly one may move the alias."""
    for v in range(1, WORKERS + 1):
        reg.register("racer", make_adapter(tmp_path / f"a{v}", seed=v), base_model=str(base_dir))
        reg.record_evaluation(
            "racer",
            v,
            dataset=None,
            split="test",
            split_digest="d" * 64,
            production_version=None,
            report=gate_report(v, production=None),
        )
    results = race(tmp_path, db_url, [["promote", "racer", f"v{v}"] for v in range(1, WORKERS + 1)])
    codes = sorted(code for code, _ in results)
    assert codes == [0] + [4] * (WORKERS - 1), results
    moves = reg.history("racer").moves
    assert len(moves) == 1 and moves[0].from_version is None, moves
    assert reg.get("racer").aliases == {"production": moves[0].to_version}
