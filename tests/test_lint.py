"""ruff and mypy, as configured in pyproject.toml, stay clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("args", [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]])
def test_clean(args: list[str]) -> None:
    if args[0] == "mypy":
        view = ROOT / "build" / "typecheck" / "loraflow"
        assert all(
            (view / pkg / "__init__.py").is_file() for pkg in ("cli", "registry", "server", "trainer")
        ), f"mypy reads the loraflow namespace through {view}; run `bash .ci/setup` to create it"
    done = subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
