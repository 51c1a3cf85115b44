"""Shared fixtures.

Every test runs in its own working directory with LORAFLOW_* cleared and
LORAFLOW_HOME pointing into tmp, so no test can touch a developer's registry.

``db_url`` is parametrized over SQLite and PostgreSQL (MLflow's ``store``
fixture pattern). PostgreSQL runs when LORAFLOW_TEST_DATABASE_URL names a
server (``.ci/run`` starts one); each test gets a fresh database on it. Without
one those tests skip, unless LORAFLOW_TEST_REQUIRE_SERVICES is set (CI sets it),
in which case they fail: a skipped tier is not a pass.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.factories import make_base

if TYPE_CHECKING:
    from loraflow.registry.redact import Redactor

PG_ENV = "LORAFLOW_TEST_DATABASE_URL"
# Set by .ci/run: a tier whose real component is missing fails instead of skipping.
REQUIRE_ENV = "LORAFLOW_TEST_REQUIRE_SERVICES"
# Set by .ci/run: the headless Chromium the HTML report tests open pages in.
CHROMIUM_ENV = "LORAFLOW_TEST_CHROMIUM"
# What Chromium needs on a machine with a closed network (.ci/chromium): no background connections.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# The tiers (pyproject's markers): every test carries exactly one. `slow` is an extra, not a tier.
TIERS = ("unit", "store", "integration", "e2e", "helm", "multihost", "lint")
# Session-wide services (S3, the tiny base, the shared engine) and the tier order.
pytest_plugins = ["tests.services", "tests.training_cache", "tests.shuffle"]

# Tests use only local models: no hub look-ups, no telemetry from HF or vLLM.
for _var, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("VLLM_NO_USAGE_STATS", "1"),
    ("DO_NOT_TRACK", "1"),
):
    os.environ.setdefault(_var, _value)


def chromium_binary() -> str:
    """Debian's Chromium (``LORAFLOW_TEST_CHROMIUM``, else on PATH); a skip without it, a failure
    under ``.ci/run`` (``LORAFLOW_TEST_REQUIRE_SERVICES``)."""
    binary = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium")
    if not binary:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(
                f"{REQUIRE_ENV} is set but no Chromium was found: the browser tests cannot be skipped"
            )
        pytest.skip(f"browser tests: run `bash .ci/chromium` and set {CHROMIUM_ENV} to the path it prints")
    return binary


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("LORAFLOW_") and key not in (PG_ENV, REQUIRE_ENV, CHROMIUM_ENV):
            monkeypatch.delenv(key)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USER", "tester")
    return work


def _create_pg_database(admin_url: str) -> tuple[str, str]:
    import psycopg

    name = f"lf_test_{uuid.uuid4().hex[:12]}"
    url = make_url(admin_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False), name


def _drop_pg_database(admin_url: str, name: str) -> None:
    import psycopg

    url = make_url(admin_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema yet: SQLite in tmp, or a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
        return
    admin = os.environ.get(PG_ENV)
    if not admin:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {PG_ENV} is not: the PostgreSQL tier cannot be skipped")
        pytest.skip(f"PostgreSQL tier: set {PG_ENV} (e.g. postgresql://postgres@localhost/postgres) to run")
    url, name = _create_pg_database(admin)
    try:
        yield url
    finally:
        _drop_pg_database(admin, name)


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """The same databases, upgraded to the current schema (PostgreSQL is never upgraded implicitly)."""
    from loraflow.registry import db

    engine = db.make_engine(empty_db_url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()
    return empty_db_url


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def registry(settings: Settings) -> Iterator[Registry]:
    reg = Registry.open(settings)
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def redactor(tmp_path_factory: pytest.TempPathFactory) -> Redactor:
    """The real redactor (Presidio), built once: what a test writes to a traffic store goes through it,
    as the gateway's writer sends it."""
    from loraflow.registry.redact import Redactor

    return Redactor(key=b"test-key", cache_dir=tmp_path_factory.mktemp("redact"))


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return make_base(tmp_path / "base")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test carries exactly one tier marker, or the run stops before any test runs: a test
    without one would silently drop out of every `-m <tier>` run. Runs before `-m` deselects."""
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier marker'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} tests need exactly one tier marker (one of {', '.join(TIERS)}; "
            "`slow` is not a tier), as pytestmark or a decorator:\n" + "\n".join(wrong)
        )


# What LORAFLOW_TEST_REQUIRE_SERVICES refuses: a test that did not run, or did not run as written.
NOT_A_PASS = ("skipped", "xfailed", "xpassed")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI (LORAFLOW_TEST_REQUIRE_SERVICES), a skipped, xfailed or xpassed test fails the run."""
    if not os.environ.get(REQUIRE_ENV):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    counts = {kind: len(reporter.stats.get(kind, [])) for kind in NOT_A_PASS}
    if any(counts.values()):
        found = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        reporter.write_line(
            f"{REQUIRE_ENV} is set and tests did not run as written ({found}): a skipped tier is not a pass",
            red=True,
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
