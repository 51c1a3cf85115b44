"""The distribution installs one top-level package, `loraflow`, and every module imports through it.

The repository keeps its folders (cli/, registry/, server/, trainer/); setuptools maps
them to loraflow.cli, loraflow.registry, ... A stray `from server import …` would still
work inside the repository (pytest puts its root on sys.path), so the import check runs
in a subprocess from another directory, as an installed user would.
"""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel .`` builds from a clean copy of this checkout's sources: setuptools
    reuses a ``build/`` folder and never deletes from it, so a wheel built in place after a
    move would still carry the old modules, and hide a package missing from pyproject."""
    out = tmp_path_factory.mktemp("wheel")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
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
            str(out),
            ".",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("loraflow-*.whl")
    return built


def test_wheel_has_only_the_loraflow_package_and_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"loraflow", next(t for t in top if t.endswith(".dist-info"))}
    missing = [str(p) for p in _sources() if f"loraflow/{p.as_posix()}" not in names]
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {missing}"
    assert "loraflow/registry/migrations/script.py.mako" in names
    assert "loraflow/trainer/reports/templates/eval_report.html.j2" in names  # the eval report's page
    assert "loraflow/trainer/reports/templates/drift_report.html.j2" in names
    # The console's pages and assets: nothing is fetched from elsewhere when it opens.
    assert "loraflow/server/console/templates/review_item.html.j2" in names
    assert {"loraflow/server/console/static/console.css", "loraflow/server/console/static/console.js"} <= set(
        names
    )
    assert "loraflow/trainer/eval/regression/general.jsonl" in names  # the built-in regression suite
    entry_points = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
    assert "loraflow = loraflow.cli.main:main" in entry_points
    assert "adapters = loraflow.cli.adapters:main" in entry_points
    # vLLM finds the resolver through this entry point: without it, `loraflow engine` is plain vLLM.
    assert "[vllm.general_plugins]\nloraflow = loraflow.server.engine.plugin:register" in entry_points


def test_every_module_imports_from_the_installed_wheel_outside_the_repository(
    wheel: Path, tmp_path: Path
) -> None:
    """Installed from the wheel, not the editable checkout (whose finder maps whole folders, and so
    would hide a sub-package missing from pyproject's list), every module imports as
    ``loraflow.…`` and comes from the installed copy, with its package data beside it."""
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = [
        "loraflow." + ".".join(p.with_suffix("").parts).removesuffix(".__init__")
        for p in _sources()
        if p.parts[-2:] != ("migrations", "env.py") and "versions" not in p.parts
    ]
    script = (
        "import importlib, importlib.util, pathlib, sys\n"
        f"site = pathlib.Path({str(site)!r})\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    where = pathlib.Path(module.__file__).resolve()\n"
        "    assert where.is_relative_to(site), f'{name} imported from {where}, not the wheel'\n"
        f"clashes = [n for n in {list(FOLDERS)!r} if importlib.util.find_spec(n) is not None]\n"
        "assert not clashes, f'top-level packages installed: {clashes}'\n"
        "from loraflow.trainer.eval.regression_suite import SUITE_FILE\n"
        "from loraflow.trainer.reports.render import TEMPLATES\n"
        "assert SUITE_FILE.is_file() and (TEMPLATES / 'eval_report.html.j2').is_file()\n"
        # The console from the wheel, offline: its pages and assets come from the installed copy.
        "from fastapi.testclient import TestClient\n"
        "from loraflow.registry.service import Registry\n"
        "from loraflow.registry.settings import Settings\n"
        "from loraflow.server.console.app import build_console\n"
        "from loraflow.server.console.context import HERE\n"
        "assert HERE.resolve().is_relative_to(site)\n"
        "settings = Settings(home=pathlib.Path('home'))\n"
        "client = TestClient(build_console(settings, Registry.open(settings)))\n"
        "home = client.get('/')\n"
        "assert home.status_code == 200 and 'Adapters' in home.text, home.text\n"
        "assert 'http://' not in home.text and 'https://' not in home.text, 'the page links elsewhere'\n"
        "for asset in ('/static/console.css', '/static/console.js'):\n"
        "    assert client.get(asset).status_code == 200, asset\n"
        "print(len(sys.modules))\n"
    )
    env = os.environ | {"PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(modules) > 40
