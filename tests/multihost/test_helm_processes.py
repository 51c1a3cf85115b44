"""The chart's rendered gateway and engine, run as local processes: their commands, arguments,
environment, ports and probe paths are taken from the manifests, not retyped, so this proves
that what the chart tells Kubernetes to run is what the code accepts.

What a cluster would provide is stood in for, and only that: the Secret (a dict), the volume
mounts (folders under tmp, substituted for the mount paths in the environment), the cluster DNS
name of the engines' headless Service (127.0.0.1), and the GPU (engine.device=cpu). PostgreSQL
and S3 (moto) are the multihost tier's real ones.

The rendered engine command runs as `loraflow engine` with the chart's arguments and environment
up to the point where it becomes vLLM (it checks its settings and the bucket, then execs vLLM);
the vLLM it execs records what it was given and exits. The vLLM server behind the rendered
gateway is the session's shared `loraflow engine` (tests/services.py), the same command over
the same bucket, so the suite starts one engine fewer.
"""

from __future__ import annotations

import json
import os
import secrets as tokens
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from loraflow.server.engine.supervisor import free_port
from tests.conftest import PG_ENV, _create_pg_database, _drop_pg_database
from tests.helm.chart import container, env_of, manifests, one, pod_spec
from tests.multihost.cluster import Proc, _spawn, wait_up
from tests.multihost.conftest import Cluster
from tests.services import SHARED_ARTIFACT_URI

# One tier: the rendered pods run as processes, like the rest of multihost (`-m helm` renders only).
pytestmark = [pytest.mark.multihost, pytest.mark.slow]

SECRET, S3_SECRET, KEYS_SECRET = "loraflow", "loraflow-s3", "loraflow-api-keys"


# Stands in for vLLM's OpenAI server in the rendered engine's process (first on PYTHONPATH): it
# records its arguments and the loraflow and vLLM variables of its environment, and exits.
VLLM_STAND_IN = """
import json, os, sys
keep = ("LORAFLOW_", "VLLM_ALLO")
record = {"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k[:9] in keep}}
with open(os.environ["STAND_IN_VLLM_RECORD"], "w") as out:
    json.dump(record, out)
"""


def values(cluster: Cluster, artifact_uri: str, gateway_port: int, engine_port: int) -> dict[str, Any]:
    return {
        "baseModel": str(cluster.base),
        "existingSecret": SECRET,
        "artifacts": {
            "uri": artifact_uri,
            "endpointUrl": cluster.env["AWS_ENDPOINT_URL"],
            "region": cluster.env["AWS_DEFAULT_REGION"],
            "existingSecret": S3_SECRET,
        },
        "apiKeys": {"existingSecret": KEYS_SECRET},
        "gateway": {"replicas": 1, "port": gateway_port},
        "engine": {"device": "cpu", "port": engine_port, "maxLoraRank": 16, "maxLoras": 2, "maxCpuLoras": 4},
        "config": {"traffic": {"sample_rate": 1.0}},
    }


class Pod:
    """One rendered container, made runnable here: env resolved, mounts mapped to folders."""

    def __init__(self, workload: dict[str, Any], secrets: dict[str, dict[str, str]], root: Path) -> None:
        self.container = container(workload)
        self.mounts: dict[str, Path] = {}
        for mount in self.container.get("volumeMounts", []):
            path = mount["mountPath"]
            self.mounts[path] = Path(path) if path in ("/tmp", "/dev/shm") else root / path.strip("/")
            self.mounts[path].mkdir(parents=True, exist_ok=True)
        self.volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        self.env: dict[str, str] = {}
        for name, entry in env_of(self.container).items():
            if "value" in entry:
                self.env[name] = self.local(entry["value"])
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                self.env[name] = secrets[ref["name"]][ref["key"]]

    def local(self, value: str) -> str:
        """``value`` with a mount path (at its start) replaced by the folder standing in for it."""
        for path, folder in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(folder) + value[len(path) :]
        return value

    def mount_files(self, config_map: dict[str, Any], secrets: dict[str, dict[str, str]]) -> None:
        """What the kubelet does for configMap and secret volumes: one file per entry."""
        for mount in self.container["volumeMounts"]:
            volume = self.volumes.get(mount["name"], {})  # absent: a volumeClaimTemplate (a folder)
            if "configMap" in volume:
                files = config_map["data"]
            elif "secret" in volume:
                files = secrets[volume["secret"]["secretName"]]
            else:
                continue
            for key, text in files.items():
                (self.mounts[mount["mountPath"]] / key).write_text(text)

    def argv(self) -> list[str]:
        command = list(self.container["command"]) + list(self.container.get("args", []))
        # The image puts loraflow on PATH; here it is this virtual environment's. A path into a
        # volume names its folder here.
        return [str(Path(sys.executable).parent / command[0]), *(self.local(a) for a in command[1:])]

    def port(self) -> int:
        return int(self.container["ports"][0]["containerPort"])

    def probe(self, kind: str) -> str:
        return str(self.container[kind]["httpGet"]["path"])

    def process_env(self) -> dict[str, str]:
        # A container starts with its image's environment (PATH, the offline hub of this machine)
        # plus the manifest's; nothing of this test process's LORAFLOW_* or AWS_* leaks in.
        keep = ("PATH", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK")
        return {**{k: os.environ[k] for k in keep if k in os.environ}, **self.env}


@pytest.fixture
def release_db(cluster: Cluster) -> Iterator[str]:
    """An empty database of this test's own: the release's migration hook creates its schema, and
    nothing it registers reaches the tier's shared registry (whose gateways would preload it)."""
    admin = os.environ[PG_ENV]
    url, name = _create_pg_database(admin)
    yield url
    _drop_pg_database(admin, name)


def test_rendered_engine_and_gateway_come_up_and_serve(
    cluster: Cluster, shared_engine: Proc, release_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraflow.trainer.tiny import random_lora_adapter

    # The engine port is the shared engine's, which stands in for the rendered engine's pod.
    gateway_port, engine_port = free_port(), int(shared_engine.url.rpartition(":")[2])
    artifact_uri = SHARED_ARTIFACT_URI  # the shared engine's bucket and prefix
    docs = manifests(values(cluster, artifact_uri, gateway_port, engine_port))
    secrets = {
        SECRET: {"database-url": release_db, "pseudonym-key": "k" * 64},
        S3_SECRET: {k: cluster.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        KEYS_SECRET: {"web-app": tokens.token_hex(32)},
    }
    config = one(docs, "ConfigMap", "config")
    assert tomllib.loads(config["data"]["loraflow.toml"])["traffic"]["sample_rate"] == 1.0

    # The pre-install hook first: the migration Job's command against the registry.
    migrate = Pod(one(docs, "Job", "migrate"), secrets, tmp_path / "migrate")
    done = subprocess.run(
        migrate.argv(), env=migrate.process_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "registry schema: empty ->" in done.stdout

    # The post-install hook: the API keys of apiKeys.existingSecret, recorded by their hash.
    keys = Pod(one(docs, "Job", "keys"), secrets, tmp_path / "keys")
    keys.mount_files(config, secrets)
    done = subprocess.run(keys.argv(), env=keys.process_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "web-app: created" in done.stdout
    key = secrets[KEYS_SECRET]["web-app"]

    # What an operator does after the install (NOTES.txt): an adapter, registered and promoted.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, cluster.env[name])
    registry = Registry.open(
        Settings(home=tmp_path / "operator", database_url=release_db, artifact_uri=artifact_uri)
    )
    # Bytes of its own: the shared engine has never cached them, so its cache shows the fetch.
    fresh = random_lora_adapter(cluster.base, tmp_path / "helm-a", r=8, seed=tokens.randbelow(10**9))
    try:
        digest = registry.register("helm-a", fresh, base_model=str(cluster.base)).digest
        registry.promote("helm-a", 1, force=True, reason="helm test: random adapter, no eval report")
    finally:
        registry.close()

    engine = Pod(one(docs, "StatefulSet", "engine"), secrets, tmp_path / "engine")
    engine.mount_files(config, secrets)
    gateway = Pod(one(docs, "Deployment", "gateway"), secrets, tmp_path / "gateway")
    gateway.mount_files(config, secrets)
    # The cluster's DNS would resolve the headless Service to the engine pod; here that is loopback.
    host, _, port = gateway.env["LORAFLOW_SERVER__ENGINE_DNS"].rpartition(":")
    assert host.endswith(".svc") and int(port) == engine.port()
    gateway.env["LORAFLOW_SERVER__ENGINE_DNS"] = f"127.0.0.1:{port}"

    # The rendered engine, up to vLLM: the chart's command and environment pass `loraflow engine`'s
    # checks (settings, the bucket through the chart's S3 endpoint and secret) and reach vLLM.
    stand_in = tmp_path / "vllm-stand-in"
    (stand_in / "vllm" / "entrypoints" / "openai").mkdir(parents=True)
    for package in ("vllm", "vllm/entrypoints", "vllm/entrypoints/openai"):
        (stand_in / package / "__init__.py").write_text("")
    (stand_in / "vllm" / "entrypoints" / "openai" / "api_server.py").write_text(VLLM_STAND_IN)
    record = tmp_path / "vllm-argv.json"
    done = subprocess.run(
        engine.argv(),
        env={**engine.process_env(), "PYTHONPATH": str(stand_in), "STAND_IN_VLLM_RECORD": str(record)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and record.is_file(), done.stdout + done.stderr
    execed = json.loads(record.read_text())
    argv = execed["argv"]
    flags = {  # --flag value, or "" for a switch
        a: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        for i, a in enumerate(argv)
        if a.startswith("--")
    }
    assert flags["--model"] == str(cluster.base) and flags["--host"] == "0.0.0.0"
    assert int(flags["--port"]) == engine.port()
    assert (flags["--max-loras"], flags["--max-cpu-loras"], flags["--max-lora-rank"]) == ("2", "4", "16")
    assert flags["--enable-lora"] == ""
    assert execed["env"]["LORAFLOW_ENGINE__RESOLVER"] == "true"
    assert execed["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert execed["env"]["LORAFLOW_ARTIFACT_URI"] == artifact_uri
    cache = engine.mounts["/cache/adapters"]
    assert Path(execed["env"]["LORAFLOW_ENGINE__CACHE_DIR"]) == cache.resolve()
    # vLLM gets the resolver's settings and nothing else of loraflow's (no database URL, no secrets).
    assert sorted(k for k in execed["env"] if k.startswith("LORAFLOW_")) == [
        "LORAFLOW_ARTIFACT_URI",
        "LORAFLOW_CONFIG",  # the engine's own, empty config file: not the caller's ./loraflow.toml
        "LORAFLOW_ENGINE__CACHE_DIR",
        "LORAFLOW_ENGINE__CACHE_MAX_BYTES",
        "LORAFLOW_ENGINE__RESOLVER",
    ]
    # Its probes' paths are served by vLLM (the shared engine's).
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in engine.container:
            assert httpx.get(shared_engine.url + engine.probe(kind), timeout=10).status_code == 200

    procs: list[Proc] = []
    try:
        procs.append(
            _spawn(
                gateway.argv(),
                gateway.process_env(),
                tmp_path / "gateway.log",
                f"http://127.0.0.1:{gateway.port()}",
            )
        )
        wait_up(procs[-1], gateway.probe("readinessProbe"), 120)
        url = procs[-1].url
        assert httpx.get(url + gateway.probe("livenessProbe"), timeout=10).status_code == 200

        with (
            openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client,
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as wrong,
        ):
            with pytest.raises(openai.AuthenticationError):  # apiKeys.enabled is on by default
                wrong.models.list()
            reply = client.chat.completions.with_raw_response.create(
                model="helm-a", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert reply.http_response.status_code == 200
        assert reply.headers["x-loraflow-model"].startswith("helm-a@v1")
        # The engine generated the answer, under the version the gateway routed to, within max_tokens.
        completion = reply.parse()
        assert completion.model == reply.headers["x-loraflow-model"]
        assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 4
        # The engine fetched the adapter itself, from the bucket, into its adapter cache.
        fetched = shared_engine.log.parent / "cache" / "engine" / digest / "adapter_model.safetensors"
        assert fetched.is_file(), "the engine did not fetch helm-a's bytes"
    finally:
        for proc in reversed(procs):
            proc.stop()
