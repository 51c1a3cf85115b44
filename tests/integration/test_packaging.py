"""The distribution installs one top-level package, `loraflow`, and every module imports through it.

The repository keeps its folders (cli/, registry/, server/, trainer/); setuptools maps
them to loraflow.cli, loraflow.registry, ... A stray `from server import …` would still
work inside the repository (pytest puts its root on sys.path), so the import check runs
in a subprocess from another directory, as an installed user would.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("cli", "registry", "server", "trainer")


def _sources() -> list[Path]:
    return sorted(
        p.relative_to(ROOT)
        for folder in FOLDERS
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    )


def test_wheel_has_only_the_loraflow_package_and_every_module(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("loraflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"loraflow", next(t for t in top if t.endswith(".dist-info"))}
    missing = [str(p) for p in _sources() if f"loraflow/{p.as_posix()}" not in names]
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {missing}"
    assert "loraflow/registry/migrations/script.py.mako" in names
    assert "loraflow/trainer/reports/templates/eval_report.html.j2" in names  # the eval report's page
    assert "loraflow/trainer/reports/templates/drift_report.html.j2" in names
    assert "loraflow/trainer/eval/regression/general.jsonl" in names  # the built-in regression suite
    entry_points = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
    assert "loraflow = loraflow.cli.main:main" in entry_points
    assert "adapters = loraflow.cli.adapters:main" in entry_points
    # vLLM finds the resolver through this entry point: without it, `loraflow engine` is plain vLLM.
    assert "[vllm.general_plugins]\nloraflow = loraflow.server.engine.plugin:register" in entry_points


def test_every_module_imports_as_loraflow_from_outside_the_repository(tmp_path: Path) -> None:
    modules = [
        "loraflow." + ".".join(p.with_suffix("").parts).removesuffix(".__init__")
        for p in _sources()
        if p.parts[-2:] != ("migrations", "env.py") and "versions" not in p.parts
    ]
    script = (
        "import importlib, importlib.util, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"clashes = [n for n in {list(FOLDERS)!r} if importlib.util.find_spec(n) is not None]\n"
        "assert not clashes, f'top-level packages installed: {clashes}'\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(modules) > 40
