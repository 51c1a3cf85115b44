"""The Helm chart: rendered by Helm's own engine, linted, validated against the Kubernetes schemas,
and held to the invariants a production install depends on. No cluster is needed."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REQUIRE_ENV
from tests.helm.chart import (
    CHART,
    REQUIRED,
    ROOT,
    container,
    env_of,
    manifests,
    one,
    pod_spec,
    production,
    render,
)

pytestmark = pytest.mark.helm

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema known.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}  # validated against their own CRDs, below
CRD_DIR = Path(__file__).parent / "crd"
# The console (on in production) behind its internal ingress, with TLS.
CONSOLE_INGRESS: dict[str, Any] = {
    "console": {
        "enabled": True,
        "ingress": {
            "enabled": True,
            "className": "internal",
            "annotations": {"nginx.ingress.kubernetes.io/whitelist-source-range": "10.0.0.0/8"},
            "host": "loraflow-console.corp.example",
            "tls": [{"hosts": ["loraflow-console.corp.example"], "secretName": "console-tls"}],
        },
    }
}
CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "default": lambda: copy.deepcopy(REQUIRED),
    "production": production,
    "console-ingress": lambda: merged(production(), CONSOLE_INGRESS),
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as info:
        render(values)
    return str(info.value)


@pytest.mark.parametrize("case", CASES)
def test_lint_finds_nothing_to_warn_about(case: str) -> None:
    report = helm.lint(str(CHART), values=CASES[case]())
    assert report["errors"] == []
    # Severity 1 is information (e.g. "icon is recommended"); 2 and above are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes(case: str, version: str) -> None:
    docs = manifests(CASES[case]())
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        # strict: a field the schema does not know (a typo, a wrong level) is an error too.
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "Job", "ConfigMap"} <= kinds
    assert checked >= 8


def test_custom_resources_are_valid_against_their_crds() -> None:
    """The ServiceMonitors and the PrometheusRule against the Prometheus Operator's own CRD schemas
    (a pinned npm package generated from them; `.ci/setup` installs it)."""
    validator = CRD_DIR / "validate.mjs"
    node = shutil.which("node")
    if node is None or not (CRD_DIR / "node_modules").is_dir():
        message = "node and `npm ci --prefix tests/helm/crd` are needed (.ci/setup runs it)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    docs = [d for d in manifests(production()) if d["kind"] in CUSTOM_KINDS]
    assert len(docs) == 3
    done = subprocess.run(
        [node, str(validator)], input=json.dumps(docs), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("valid: ") == 3
    # The validator can fail: a scrape interval that is not a duration is refused.
    docs[1]["spec"]["endpoints"][0]["interval"] = "thirty seconds"
    bad = subprocess.run(
        [node, str(validator)], input=json.dumps(docs), capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "invalid: ServiceMonitor" in bad.stdout


def test_production_renders_every_optional_part() -> None:
    kinds = sorted(d["kind"] for d in manifests(production()))
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "CronJob", "PrometheusRule"):
        assert kind in kinds
    assert kinds.count("ServiceMonitor") == 2  # gateways and engines
    assert kinds.count("CronJob") == 2  # one per flywheel adapter


def test_the_chart_refuses_to_render_without_what_it_cannot_default() -> None:
    assert "baseModel is required" in render_error({k: v for k, v in REQUIRED.items() if k != "baseModel"})
    assert "artifacts.uri is required" in render_error(
        {k: v for k, v in REQUIRED.items() if k != "artifacts"}
    )
    message = render_error({k: v for k, v in REQUIRED.items() if k != "existingSecret"})
    assert "existingSecret" in message and "registry.databaseUrl" in message


def test_sqlite_with_more_than_one_gateway_replica_fails_with_the_message() -> None:
    sqlite = {
        "baseModel": "m",
        "artifacts": {"uri": "s3://b/p"},
        "registry": {"databaseUrl": "sqlite:////d/r.db"},
    }
    message = render_error(merged(sqlite, {"gateway": {"replicas": 2}}))
    assert "registry.databaseUrl is SQLite" in message and "gateway.replicas" in message and "is 2" in message
    # An autoscaler that may add replicas counts by its maximum.
    scaled = {"gateway": {"replicas": 1, "autoscaling": {"enabled": True, "maxReplicas": 4}}}
    assert "is 4" in render_error(merged(sqlite, scaled))
    # One replica on SQLite is a trial, and renders.
    docs = manifests(merged(sqlite, {"gateway": {"replicas": 1}}))
    assert one(docs, "Deployment", "gateway")["spec"]["replicas"] == 1


def test_an_ingress_needs_a_metrics_token_so_metrics_is_never_published_open() -> None:
    assert production()["ingress"]["enabled"] and any(d["kind"] == "Ingress" for d in manifests(production()))
    open_metrics = merged(production(), {"secretKeys": {"metricsToken": ""}})
    assert "secretKeys.metricsToken" in render_error(open_metrics)
    no_ingress = merged(open_metrics, {"ingress": {"enabled": False}})
    assert not any(d["kind"] == "Ingress" for d in manifests(no_ingress))  # no ingress: no token needed


def test_a_postgresql_url_is_refused_in_values_because_it_carries_a_password() -> None:
    values = {"baseModel": "m", "artifacts": {"uri": "s3://b/p"}}
    values["registry"] = {"databaseUrl": "postgresql+psycopg://u:secret@pg/db"}
    assert "put it in the Secret" in render_error(values)


def test_the_values_schema_names_a_misspelt_value() -> None:
    message = render_error(merged(REQUIRED, {"gateway": {"replica": 3}}))
    assert "replica" in message and "/gateway" in message
    message = render_error(merged(REQUIRED, {"engine": {"device": "tpu"}}))
    assert "/engine/device" in message


def test_engine_pods_request_their_gpus() -> None:
    values = merged(production(), {"engine": {"tensorParallelSize": 2}})
    engine = container(one(manifests(values), "StatefulSet", "engine"))
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert env_of(engine)["LORAFLOW_SERVER__TENSOR_PARALLEL_SIZE"]["value"] == "2"
    # On CPU nodes (small models) nothing asks for a GPU.
    cpu = container(one(manifests(merged(REQUIRED, {"engine": {"device": "cpu"}})), "StatefulSet", "engine"))
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])


def test_engine_flags_come_from_values() -> None:
    engine = container(one(manifests(production()), "StatefulSet", "engine"))
    env = {k: v.get("value") for k, v in env_of(engine).items()}
    assert engine["command"] == ["loraflow", "engine"]
    assert "--base-model=meta-llama/Llama-3.1-8B-Instruct" in engine["args"]
    assert env["LORAFLOW_SERVER__DTYPE"] == "bfloat16"
    assert env["LORAFLOW_SERVER__MAX_LORAS"] == "8"
    assert env["LORAFLOW_SERVER__MAX_CPU_LORAS"] == "32"
    assert env["LORAFLOW_SERVER__MAX_LORA_RANK"] == "64"
    assert env["LORAFLOW_SERVER__MAX_MODEL_LEN"] == "8192"
    assert json.loads(env["LORAFLOW_SERVER__ENGINE_ARGS"]) == ["--enable-prefix-caching"]
    # The adapter cache is bounded twice: by the engine's own eviction, and by the volume.
    assert env["LORAFLOW_ENGINE__CACHE_MAX_BYTES"] == str(10 * 2**30)
    volumes = {
        v["name"]: v for v in pod_spec(one(manifests(production()), "StatefulSet", "engine"))["volumes"]
    }
    assert volumes["adapters"]["emptyDir"]["sizeLimit"] == "12Gi"


def test_secrets_are_referenced_never_inlined() -> None:
    docs = manifests(production())
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart must not create secrets"
    text = json.dumps(docs)
    assert "postgresql" not in text and 'AWS_SECRET_ACCESS_KEY", "value"' not in text
    for workload in [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "CronJob")]:
        for name, entry in env_of(container(workload)).items():
            if name in (
                "LORAFLOW_DATABASE_URL",
                "LORAFLOW_TRAFFIC__PSEUDONYM_KEY",
                "LORAFLOW_SERVER__METRICS_TOKEN",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
            ):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], (workload["kind"], name)
    gateway = env_of(container(one(docs, "Deployment", "gateway")))
    assert gateway["LORAFLOW_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "loraflow",
        "key": "database-url",
    }
    assert gateway["LORAFLOW_TRAFFIC__PSEUDONYM_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "pseudonym-key"
    # The engines read adapters by name from object storage; they never get the database.
    assert "LORAFLOW_DATABASE_URL" not in env_of(container(one(docs, "StatefulSet", "engine")))


def test_probes_and_a_graceful_stop() -> None:
    docs = manifests(production())
    gateway = container(one(docs, "Deployment", "gateway"))
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    engine = container(one(docs, "StatefulSet", "engine"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert engine[probe]["httpGet"]["path"] == "/health"
    # The preStop wait plus the gateway's own drain fit in the grace period.
    grace = pod_spec(one(docs, "Deployment", "gateway"))["terminationGracePeriodSeconds"]
    wait = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(env_of(gateway)["LORAFLOW_SERVER__SHUTDOWN_TIMEOUT_S"]["value"])
    assert wait > 0 and drain > 0 and wait + drain < grace
    # ... and leave the traffic writer time for a full queue (about 1 ms a record, with room)
    from loraflow.registry.settings import TrafficSettings

    assert grace - wait - drain >= TrafficSettings().queue_max_records * 0.001 * 5


def test_the_network_policy_lets_only_gateways_and_prometheus_reach_the_engines() -> None:
    docs = manifests(production())
    policy = one(docs, "NetworkPolicy")
    engine = one(docs, "StatefulSet", "engine")
    gateway = one(docs, "Deployment", "gateway")
    assert policy["spec"]["podSelector"]["matchLabels"] == engine["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    port = container(engine)["ports"][0]["containerPort"]
    assert all(r["ports"] == [{"protocol": "TCP", "port": port}] for r in rules)
    peers = [peer for r in rules for peer in r["from"]]
    assert peers[0] == {"podSelector": {"matchLabels": gateway["spec"]["selector"]["matchLabels"]}}
    # Prometheus, by namespace AND pod (one peer with both selectors), not anything in its namespace.
    assert set(peers[1]) == {"namespaceSelector", "podSelector"}
    assert len(peers) == 2
    # Without a ServiceMonitor, only the gateways.
    plain = one(manifests(REQUIRED), "NetworkPolicy")
    assert [peer for r in plain["spec"]["ingress"] for peer in r["from"]] == [peers[0]]
    # The engines' Service is headless (how gateways find every pod) and never load-balanced outward.
    service = one(docs, "Service", "engine")
    assert service["spec"]["clusterIP"] == "None" and "type" not in service["spec"]
    dns = env_of(container(gateway))["LORAFLOW_SERVER__ENGINE_DNS"]["value"]
    assert dns == f"{service['metadata']['name']}.ml.svc:{port}"


def test_hpa_and_pdb_render_when_enabled_and_not_otherwise() -> None:
    docs = manifests(production())
    hpa = one(docs, "HorizontalPodAutoscaler")
    gateway = one(docs, "Deployment", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": gateway["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 12
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    rate = merged(production(), {"gateway": {"autoscaling": {"targetRequestsPerSecond": 50}}})
    metrics = one(manifests(rate), "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    plain = manifests(merged(REQUIRED, {"gateway": {"pdb": {"enabled": False}}}))
    assert not [d for d in plain if d["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")]
    assert one(plain, "Deployment", "gateway")["spec"]["replicas"] == 2


def test_every_container_runs_hardened() -> None:
    for doc in manifests(production()):
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job", "CronJob"):
            continue
        pod = pod_spec(doc)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        ctx = container(doc)["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]


def test_migrations_run_as_a_hook_before_install_and_upgrade() -> None:
    job = one(manifests(REQUIRED), "Job", "migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["command"] == ["loraflow", "db", "upgrade"]
    # A hook runs before the release's ConfigMap and ServiceAccount exist: it must need neither.
    assert "serviceAccountName" not in pod_spec(job)
    assert all(v.get("configMap") is None for v in pod_spec(job)["volumes"])


def test_api_keys_from_a_secret_are_imported_after_install_and_upgrade() -> None:
    job = one(manifests(production()), "Job", "keys")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    keys = container(job)
    folder = keys["command"][-1]
    assert keys["command"][:3] == ["loraflow", "keys", "import"]
    mount = next(m for m in keys["volumeMounts"] if m["mountPath"] == folder)
    volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "loraflow-api-keys"
    assert not [d for d in manifests(REQUIRED) if d["kind"] == "Job" and "keys" in d["metadata"]["name"]]
    assert keys["command"] == ["loraflow", "keys", "import", folder]  # least privilege by default
    values = production()
    values["apiKeys"] |= {"adapters": ["support"], "scopes": ["review", "versions"]}
    scoped = container(one(manifests(values), "Job", "keys"))["command"]
    assert scoped == [
        "loraflow", "keys", "import", "--adapter=support", "--scope=review", "--scope=versions", folder
    ]  # fmt: skip


def test_flywheel_cronjobs_one_per_adapter_never_overlapping() -> None:
    jobs = [d for d in manifests(production()) if d["kind"] == "CronJob"]
    by_name = {container(j)["command"][-1]: j for j in jobs}
    assert set(by_name) == {"orders", "support"}
    orders = by_name["orders"]
    assert container(orders)["command"] == ["loraflow", "flywheel", "run", "orders"]
    assert container(orders)["args"] == ["--since", "7d"]
    assert all(j["spec"]["concurrencyPolicy"] == "Forbid" for j in jobs)
    assert container(orders)["resources"]["limits"]["nvidia.com/gpu"] == 1
    on_cpu = merged(production(), {"flywheel": {"gpu": False}})
    for job in [d for d in manifests(on_cpu) if d["kind"] == "CronJob"]:
        assert "nvidia.com/gpu" not in json.dumps(container(job)["resources"])


def test_settings_from_values_reach_loraflow_toml() -> None:
    config = one(manifests(production()), "ConfigMap", "config")
    import tomllib

    from loraflow.registry.settings import TrafficSettings

    parsed = tomllib.loads(config["data"]["loraflow.toml"])
    assert parsed["traffic"]["sample_rate"] == 0.1
    assert TrafficSettings(**parsed["traffic"]).retention_days == 30


def test_bitnami_style_names_and_labels() -> None:
    values = merged(REQUIRED, {"fullnameOverride": "lf", "commonLabels": {"team": "ml"}})
    docs = manifests(merged(values, CONSOLE_INGRESS))
    assert len(console_objects(docs)) == 3
    for doc in docs:
        assert doc["metadata"]["name"].startswith("lf"), doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["team"] == "ml"
    docs = manifests(merged(REQUIRED, {"nameOverride": "llm"}))
    assert one(docs, "Deployment", "gateway")["metadata"]["name"] == "rel-llm-gateway"


def test_notes_show_the_first_request() -> None:
    notes = render(production())["loraflow/templates/NOTES.txt"]
    assert "kubectl -n ml port-forward svc/rel-loraflow-gateway" in notes
    assert '"model": "orders"' in notes and "/v1/chat/completions" in notes
    # The console (on in production): how to reach it, and which key logs in.
    assert "kubectl -n ml port-forward svc/rel-loraflow-console 8090:8090" in notes
    assert "API key" in notes and "--scope review" in notes and "operator" in notes


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector picks an object with these labels."""
    return all(labels.get(key) == value for key, value in selector.items())


def console_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "console"]


def test_the_console_is_off_by_default() -> None:
    import tomllib

    assert production()["console"]["enabled"] is True  # production opts in; the chart's default does not
    docs = manifests(REQUIRED)
    assert console_objects(docs) == []
    assert not [d for d in docs if "console" in d["metadata"]["name"]]
    assert "console" not in tomllib.loads(one(docs, "ConfigMap", "config")["data"]["loraflow.toml"])
    assert "console" not in render(REQUIRED)["loraflow/templates/NOTES.txt"].lower()


def test_the_console_runs_loraflow_ui_hardened_with_the_gateways_settings() -> None:
    docs = manifests(production())
    deployment = one(docs, "Deployment", "console")
    service = one(docs, "Service", "console")
    assert {d["kind"] for d in console_objects(docs)} == {"Deployment", "Service"}  # no ingress by default
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "rel-loraflow-console"
    assert deployment["spec"]["replicas"] == 1
    console, pod = container(deployment), pod_spec(deployment)
    assert console["command"] + console["args"] == ["loraflow", "ui", "--host", "0.0.0.0", "--port", "8090"]
    assert console["ports"] == [{"name": "http", "containerPort": 8090}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert console[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The gateway's image, service account and settings file; hardened as every container is.
    gateway_deployment = one(docs, "Deployment", "gateway")
    gateway, gateway_pod = container(gateway_deployment), pod_spec(gateway_deployment)
    assert console["image"] == gateway["image"] and console["imagePullPolicy"] == gateway["imagePullPolicy"]
    assert pod["serviceAccountName"] == gateway_pod["serviceAccountName"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == gateway_pod["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert console["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    # With a read-only root, everything it writes goes to emptyDirs; the settings are the ConfigMap.
    assert console["volumeMounts"] == gateway["volumeMounts"] and pod["volumes"] == gateway_pod["volumes"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in console["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts["/var/lib/loraflow"]
    assert (
        mounts["/etc/loraflow"]["configMap"]["name"] == one(docs, "ConfigMap", "config")["metadata"]["name"]
    )
    # The same database, artifact (and so traffic) store, S3 credentials and secrets as the gateway...
    env, gateway_env = env_of(console), env_of(gateway)
    shared = (
        "LORAFLOW_CONFIG",
        "LORAFLOW_HOME",
        "HOME",
        "LORAFLOW_DATABASE_URL",
        "LORAFLOW_ARTIFACT_URI",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "LORAFLOW_TRAFFIC__PSEUDONYM_KEY",
        "LORAFLOW_SERVER__AUTH",
    )
    for name in shared:
        assert env[name] == gateway_env[name], name
    assert env["LORAFLOW_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "loraflow",
        "key": "database-url",
    }
    assert env["LORAFLOW_SERVER__AUTH"]["value"] == "true"
    # ...but nothing that points at the engines (the console never talks to them), and not the
    # token of the gateways' /metrics, which it does not serve.
    assert "LORAFLOW_SERVER__ENGINE_DNS" not in env and "LORAFLOW_SERVER__METRICS_TOKEN" in gateway_env
    assert "LORAFLOW_SERVER__METRICS_TOKEN" not in env
    # Its own ClusterIP Service on 8090; the gateways' Service, PDB, ServiceMonitor and the engines'
    # NetworkPolicy never pick console pods, and the console's Service never picks a gateway.
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8090, "targetPort": "http"}]
    console_labels = deployment["spec"]["template"]["metadata"]["labels"]
    gateway_labels = gateway_deployment["spec"]["template"]["metadata"]["labels"]
    assert console_labels["app.kubernetes.io/component"] == "console"
    assert selects(service["spec"]["selector"], console_labels)
    assert selects(deployment["spec"]["selector"]["matchLabels"], console_labels)
    assert not selects(service["spec"]["selector"], gateway_labels)
    assert not selects(deployment["spec"]["selector"]["matchLabels"], gateway_labels)
    gateway_selectors = [
        one(docs, "Service", "gateway")["spec"]["selector"],
        gateway_deployment["spec"]["selector"]["matchLabels"],
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    gateway_selectors += [m["spec"]["selector"]["matchLabels"] for m in docs if m["kind"] == "ServiceMonitor"]
    for selector in gateway_selectors:
        assert not selects(selector, console_labels), selector
        assert not selects(selector, service["metadata"]["labels"]), selector
    policy = one(docs, "NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            if "namespaceSelector" not in peer:  # a peer in this namespace: by pod labels only
                assert not selects(peer["podSelector"]["matchLabels"], console_labels), peer
    # It is not behind the gateways' (public) ingress.
    gateway_ingress = one(docs, "Ingress", "gateway")
    backends = [
        p["backend"]["service"]["name"] for r in gateway_ingress["spec"]["rules"] for p in r["http"]["paths"]
    ]
    assert backends and service["metadata"]["name"] not in backends


def test_the_console_takes_its_values() -> None:
    values = merged(
        production(),
        {
            "console": {
                "port": 9000,
                "resources": {"requests": {"cpu": "1"}},
                "podAnnotations": {"team": "ml-ops"},
                "nodeSelector": {"pool": "system"},
                "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"podAntiAffinity": {}},
                "extraEnv": [{"name": "FOO", "value": "bar"}],
            }
        },
    )
    docs = manifests(values)
    deployment = one(docs, "Deployment", "console")
    console, pod = container(deployment), pod_spec(deployment)
    assert console["args"] == ["--host", "0.0.0.0", "--port", "9000"]
    assert console["ports"][0]["containerPort"] == 9000
    assert one(docs, "Service", "console")["spec"]["ports"][0]["port"] == 9000
    assert console["resources"]["requests"] == {"cpu": "1", "memory": "512Mi"}  # merged over the defaults
    assert deployment["spec"]["template"]["metadata"]["annotations"]["team"] == "ml-ops"
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["tolerations"][0]["key"] == "system"
    assert pod["affinity"] == {"podAntiAffinity": {}}
    assert env_of(console)["FOO"] == {"name": "FOO", "value": "bar"}
    for version in KUBE_VERSIONS:
        for doc in console_objects(docs):
            kubernetes_validate.validate(doc, version, strict=True)
    notes = render(values)["loraflow/templates/NOTES.txt"]
    assert "port-forward svc/rel-loraflow-console 9000:9000" in notes


def test_the_console_refuses_to_render_without_api_keys() -> None:
    message = render_error(merged(production(), {"apiKeys": {"enabled": False}}))
    assert "console.enabled" in message and "apiKeys.enabled" in message
    # Without the console, API keys may be off (a trial), and the chart renders.
    off = merged(production(), {"apiKeys": {"enabled": False}, "console": {"enabled": False}})
    assert (
        env_of(container(one(manifests(off), "Deployment", "gateway")))["LORAFLOW_SERVER__AUTH"]["value"]
        == "false"
    )
    # A SQLite registry is a file in the gateway's pod: the console's pod would see another database.
    sqlite = {
        "baseModel": "m",
        "artifacts": {"uri": "s3://b/p"},
        "registry": {"databaseUrl": "sqlite:////d/r.db"},
        "gateway": {"replicas": 1},
    }
    message = render_error(merged(sqlite, {"console": {"enabled": True}}))
    assert "console.enabled" in message and "SQLite" in message
    # Each console pod signs sessions with a key of its own: a second replica would refuse them.
    message = render_error(merged(production(), {"console": {"replicas": 2}}))
    assert "console.replicas is 2" in message
    # An ingress needs the host it answers on.
    no_host = merged(production(), {"console": {"ingress": {"enabled": True}}})
    assert "console.ingress.host" in render_error(no_host)
    # The schema names a misspelt console value.
    assert "/console" in render_error(merged(production(), {"console": {"replica": 2}}))
    assert "/console/ingress" in render_error(merged(production(), {"console": {"ingress": {"hosts": []}}}))


def test_the_console_ingress_is_its_own_and_tls_makes_its_cookie_secure() -> None:
    import tomllib

    from loraflow.registry.settings import ConsoleSettings

    docs = manifests(merged(production(), CONSOLE_INGRESS))
    ingress = one(docs, "Ingress", "console")
    service = one(docs, "Service", "console")
    assert ingress["metadata"]["name"] == "rel-loraflow-console"
    assert ingress["metadata"]["annotations"] == CONSOLE_INGRESS["console"]["ingress"]["annotations"]
    assert ingress["spec"]["ingressClassName"] == "internal"
    assert ingress["spec"]["tls"] == CONSOLE_INGRESS["console"]["ingress"]["tls"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "loraflow-console.corp.example"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    # The gateways' ingress is untouched: it still routes to the gateways only.
    assert (
        one(docs, "Ingress", "gateway")["spec"]["rules"]
        == one(manifests(production()), "Ingress", "gateway")["spec"]["rules"]
    )

    def console_settings(values: dict[str, Any]) -> dict[str, Any]:
        config = one(manifests(values), "ConfigMap", "config")
        table: dict[str, Any] = tomllib.loads(config["data"]["loraflow.toml"]).get("console", {})
        return table

    # Behind a TLS ingress the console sees plain HTTP: the chart marks its cookie Secure.
    assert console_settings(merged(production(), CONSOLE_INGRESS)) == {"secure_cookies": True}
    assert ConsoleSettings(**console_settings(merged(production(), CONSOLE_INGRESS))).secure_cookies is True
    # Without TLS (or reached by port-forward, production's default) the chart writes no [console].
    plain = merged(production(), merged(CONSOLE_INGRESS, {"console": {"ingress": {"tls": []}}}))
    assert console_settings(plain) == {}
    assert console_settings(production()) == {}
    # A `console` table in config wins, as for [rollout] (TLS ended by a load balancer, say).
    ended_elsewhere = merged(plain, {"config": {"console": {"secure_cookies": True}}})
    assert console_settings(ended_elsewhere) == {"secure_cookies": True}
    opted_out = merged(
        production(), merged(CONSOLE_INGRESS, {"config": {"console": {"secure_cookies": False}}})
    )
    assert console_settings(opted_out) == {"secure_cookies": False}
    # The ConfigMap's checksum on the console's pods rolls them when [console] changes.
    checksums = {
        one(manifests(v), "Deployment", "console")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]
        for v in (plain, merged(production(), CONSOLE_INGRESS))
    }
    assert len(checksums) == 2
    notes = render(merged(production(), CONSOLE_INGRESS))["loraflow/templates/NOTES.txt"]
    assert "https://loraflow-console.corp.example" in notes


def test_every_value_is_documented() -> None:
    """Each value in values.yaml has a `# --` comment directly above it or above a parent block."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, bool]] = []  # (indent, documented) of the keys enclosing this one
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        comments = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comments.append(lines[j].strip())
            j -= 1
        while parents and parents[-1][0] >= indent:
            parents.pop()
        documented = any(c.startswith("# --") for c in comments) or any(d for _, d in parents)
        if not documented and not line.rstrip().endswith(":"):
            undocumented.append(line.strip())
        parents.append((indent, documented))
    assert undocumented == []


def test_alerts_and_dashboard_use_metrics_the_gateway_exports() -> None:
    """A rule on a metric nobody exports never fires: every loraflow_* series named in the
    PrometheusRule and the dashboard is one the server code defines."""
    source = "\n".join(p.read_text() for p in (ROOT / "server").rglob("*.py"))
    rules = json.dumps(one(manifests(production()), "PrometheusRule")["spec"])
    dashboard = (CHART / "dashboards" / "loraflow.json").read_text()
    names = set(re.findall(r"loraflow_[a-z_]+", rules + dashboard))
    assert len(names) >= 10
    for name in sorted(names):
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        stored = base.removeprefix("loraflow_drift_")
        assert f'"{base}"' in source or f'"{stored}"' in source, f"{name} is exported by nothing"


def test_values_schema_is_the_chart_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    # Every top-level value has a schema entry, and the schema names nothing values.yaml lacks.
    assert set(schema["properties"]) == set(defaults)
    # The chart's own values and the production file are valid under it...
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(defaults)] == []
    assert [e.message for e in validator.iter_errors(production())] == []
    # ...and it refuses a misspelt key at every level, not only where a test happens to look.
    assert open_objects(schema) == []


def open_objects(schema: dict[str, Any], path: str = "") -> list[str]:
    """The objects in ``schema`` that name their keys but accept any other key too."""
    found = []
    if "properties" in schema and schema.get("additionalProperties") is not False:
        found.append(path or "/")
    for key, sub in schema.get("properties", {}).items():
        found.extend(open_objects(sub, f"{path}/{key}"))
    return found


def test_rollout_policies_from_values_reach_loraflow_toml_and_a_rollback_alerts() -> None:
    import tomllib

    from loraflow.registry.settings import RolloutSettings

    values = merged(
        production(),
        {
            "rollout": {
                "policies": {"careful": {"steps": [{"shadow": 50}, {"canary": 10}], "min_requests": 500}}
            },
            "config": {"rollout": {"interval_s": 2}},
        },
    )
    config = one(manifests(values), "ConfigMap", "config")
    parsed = RolloutSettings(**tomllib.loads(config["data"]["loraflow.toml"])["rollout"])
    assert parsed.interval_s == 2 and parsed.lease_ttl_s == 20  # config's table wins; the rest stays
    assert parsed.policy("careful").min_requests == 500 and parsed.policy("default").min_seconds == 60
    assert [s.canary for s in parsed.policy("default").steps] == [0, 5, 25, 100]
    rules = one(manifests(values), "PrometheusRule")["spec"]["groups"][0]["rules"]
    (alert,) = [r for r in rules if r["alert"] == "LoraflowRolloutRolledBack"]
    assert 'action="rollback"' in alert["expr"] and "[1h]" in alert["expr"]
    assert "stepz" in render_error(merged(REQUIRED, {"rollout": {"policies": {"x": {"stepz": []}}}}))
