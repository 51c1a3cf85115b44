"""Many gateways in front of many engines, sharing only PostgreSQL and S3."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import s3fs

from loraflow.registry.service import Registry
from loraflow.server.engine.cache import engine_name, engine_name_of
from loraflow.server.engine.vllm_http import VLLMHttpEngine
from loraflow.server.replicas import ReplicaSet
from tests.factories import FORCED
from tests.multihost.cluster import (
    BUCKET,
    Proc,
    engine_models,
    served_by,
    start_gateway,
    steady_load,
    until,
    wait_up,
)
from tests.multihost.conftest import Cluster

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

CHAT = [{"role": "user", "content": "hello"}]


@contextmanager
def gateways(
    cluster: Cluster, tmp_path: Path, engine_urls: list[str], n: int = 2, **server: object
) -> Iterator[list[Proc]]:
    with ExitStack() as stack:
        procs = []
        for i in range(n):
            proc = start_gateway(
                cluster.base,
                tmp_path / f"gateway{i}",
                cluster.env,
                engine_urls=engine_urls,
                poll_interval_s=0.1,
                **server,
            )
            stack.callback(proc.stop)
            procs.append(proc)
        for proc in procs:
            wait_up(proc, "/ready", 60)
        yield procs


def _register(registry: Registry, cluster: Cluster, name: str, *seeds: int) -> None:
    for seed in seeds:
        registry.register(name, cluster.adapters[seed - 1], base_model=str(cluster.base))


def test_a_promote_is_served_by_every_gateway(
    cluster: Cluster, engines: list[Proc], registry: Registry, tmp_path: Path
) -> None:
    _register(registry, cluster, "support", 1, 2)
    registry.promote("support", 1, force=True, reason=FORCED)
    with gateways(cluster, tmp_path, [e.url for e in engines]) as gws, httpx.Client(timeout=60) as http:
        assert [served_by(g.url, "support", http) for g in gws] == ["support@v1", "support@v1"]
        registry.promote("support", 2, force=True, reason=FORCED)
        until(
            lambda: all(served_by(g.url, "support", http) == "support@v2" for g in gws),
            "both gateways to serve support@v2",
        )
        # Each engine (both are v2's home with adapter_replicas=2) fetches v2 from S3 itself, into
        # its own cache, verified by the digest its name carries. Serving v2 needs one of them;
        # the other's preload may still be under way.
        v2 = registry.get_version("support", 2)
        for engine in engines:
            until(lambda url=engine.url: engine_name_of(v2) in engine_models(url), f"{engine.url} to hold v2")
            assert (
                engine.log.parent / "cache" / "engine" / v2.digest / "adapter_model.safetensors"
            ).is_file()


def test_each_version_is_loaded_on_its_home_set_only(
    cluster: Cluster, engines: list[Proc], registry: Registry, tmp_path: Path
) -> None:
    urls = [e.url for e in engines]
    placement = ReplicaSet([VLLMHttpEngine(u) for u in urls], max_resident=8, home_size=1)
    expected: dict[str, set[str]] = {u: set() for u in urls}
    names: list[str] = []
    # Ports are random, so is the placement. Pick names (all over the same files, so the same
    # digest) until each replica is home to exactly two: the aliases stay for the rest of the
    # session, and the later tests need room left under max_cpu_loras for versions no alias names.
    digest = registry.register("home-probe", cluster.adapters[0], base_model=str(cluster.base)).digest
    for i in range(200):
        name = f"home{i}"
        version = engine_name(f"{name}@v1", digest)
        home = placement.home(version)[0].url
        if len(expected[home]) < 2:
            _register(registry, cluster, name, 1)
            registry.promote(name, 1, force=True, reason=FORCED)
            assert engine_name_of(registry.get_version(name, 1)) == version
            expected[home].add(version)
            names.append(name)
        if min(len(v) for v in expected.values()) == 2:
            break
    assert len(names) == 4, "rendezvous hashing put 200 names on one replica"
    with gateways(cluster, tmp_path, urls, adapter_replicas=1) as gws, httpx.Client(timeout=60) as http:
        for gw in gws:
            for name in names:
                assert served_by(gw.url, name, http) == f"{name}@v1"
        for url in urls:
            mine = {m for m in engine_models(url) if m.partition("@")[0] in names}
            assert mine == expected[url], f"{url} holds versions homed elsewhere"


def test_a_tampered_artifact_is_refused_by_the_engine_and_answered_503(
    cluster: Cluster, engines: list[Proc], registry: Registry, tmp_path: Path
) -> None:
    from loraflow.trainer.tiny import random_lora_adapter

    _register(registry, cluster, "tamper", 3)
    registry.promote("tamper", 1, force=True, reason=FORCED)
    # Bytes no engine has cached yet (an engine serves its own verified copy of a digest it has).
    fresh = random_lora_adapter(cluster.base, tmp_path / "fresh", r=8, seed=99)
    v2 = registry.register("tamper", fresh, base_model=str(cluster.base))
    fs = s3fs.S3FileSystem()
    key = f"{BUCKET}/artifacts/sha256/{v2.digest[:2]}/{v2.digest}/adapter_model.safetensors"
    data = fs.cat_file(key)
    fs.pipe_file(key, data[:-1] + bytes([data[-1] ^ 1]))  # one bit, in S3 only
    with (
        gateways(cluster, tmp_path, [e.url for e in engines], n=1) as (gw,),
        httpx.Client(timeout=60) as http,
    ):
        r = http.post(f"{gw.url}/v1/chat/completions", json={"model": "tamper@v2", "messages": CHAT})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_unavailable" and r.headers["retry-after"]
        assert v2.digest not in r.text and "127.0.0.1" not in r.text
        for engine in engines:
            assert engine_name_of(v2) not in engine_models(engine.url)
            assert httpx.get(f"{engine.url}/health").status_code == 200
        assert any("refusing tamper@v2" in e.log.read_text() for e in engines)
        assert served_by(gw.url, "tamper", http) == "tamper@v1"  # the rest is untouched


def test_an_engine_killed_under_load_fails_no_request_and_ends_its_stream_with_an_error(
    cluster: Cluster, engines: list[Proc], registry: Registry, tmp_path: Path
) -> None:
    """It kills the module's own engine (the first of ``engines``); a later test gets a new one."""
    _register(registry, cluster, "steady", 5)
    registry.promote("steady", 1, force=True, reason=FORCED)
    victim, survivor = engines
    urls = [e.url for e in engines]
    with (
        gateways(cluster, tmp_path, urls) as gws,
        gateways(cluster, tmp_path / "solo", [victim.url], n=1) as (solo,),
    ):
        statuses: list[int] = []
        failures: list[str] = []
        with steady_load([(g.url, ["steady"]) for g in gws for _ in range(2)], statuses, failures):
            client = openai.OpenAI(base_url=f"{solo.url}/v1", api_key="unused", max_retries=0, timeout=120)
            with client:
                stream = client.completions.create(
                    model="steady",
                    prompt="x",
                    max_tokens=4000,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                assert next(iter(stream)).model == "steady@v1"
                until(lambda: len(statuses) >= 8, "steady traffic before the kill", 60)
                victim.kill()
                with pytest.raises(openai.APIError, match="mid-stream"):
                    list(stream)
            served_before = len(statuses)
            until(lambda: len(statuses) >= served_before + 20, "traffic after the kill", 120)
        assert statuses and set(statuses) == {200}, "\n".join(failures)
        for gw in gws:
            metrics = httpx.get(f"{gw.url}/metrics").text
            assert f'loraflow_replica_up{{replica="{victim.url}"}} 0.0' in metrics
            assert f'loraflow_replica_up{{replica="{survivor.url}"}} 1.0' in metrics
