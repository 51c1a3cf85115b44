"""Engine flags come from settings; an unset flag is left to vLLM; CPU defaults only without a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app
from loraflow.registry.settings import EngineSettings, ServerSettings, Settings, load_settings
from loraflow.server.engine.supervisor import detect_device, engine_env, engine_slice, vllm_command

pytestmark = pytest.mark.unit


def command(device: str, **settings: object) -> list[str]:
    return vllm_command(
        ServerSettings(**settings),  # type: ignore[arg-type]
        model="/m",
        port=9,
        device=device,  # type: ignore[arg-type]
    )


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_unset_flags_are_left_to_vllm_and_cpu_defaults_stay_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cpu, gpu = command("cpu"), command("gpu")
    for name in ("--max-model-len", "--gpu-memory-utilization", "--tensor-parallel-size"):
        assert name not in cpu and name not in gpu
    assert flag(cpu, "--dtype") == "float32" and flag(gpu, "--dtype") is None
    settings = Settings(home=Path("/h"))
    assert engine_env(settings, "cpu")["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine_env(settings, "gpu")
    assert engine_env(settings, "gpu")["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert flag(cpu, "--host") == "127.0.0.1"  # the runtime-LoRA admin API stays private


def test_the_engine_environment_turns_the_resolver_on_for_these_settings_only(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, artifact_uri="s3://bucket/art", engine=EngineSettings(cache_max_bytes=123)
    )
    env = engine_env(settings, "cpu")
    assert env["LORAFLOW_ENGINE__RESOLVER"] == "true"
    assert env["LORAFLOW_ARTIFACT_URI"] == "s3://bucket/art"
    assert env["LORAFLOW_ENGINE__CACHE_DIR"] == str((tmp_path / "cache" / "engine").resolve())
    assert env["LORAFLOW_ENGINE__CACHE_MAX_BYTES"] == "123"
    assert Settings(home=tmp_path).engine.resolver is False  # a plain vLLM: the plugin stays off


def test_an_engine_inherits_none_of_the_gateways_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "LORAFLOW_DATABASE_URL": "postgresql://loraflow:hunter2@db/loraflow",
        "LORAFLOW_TRAFFIC__PSEUDONYM_KEY": "pseudonym-secret",
        "LORAFLOW_SERVER__METRICS_TOKEN": "metrics-secret",
        "LORAFLOW_CONFIG": str(tmp_path / "gateway.toml"),
        "PGPASSWORD": "hunter2",
    }
    (tmp_path / "gateway.toml").write_text("")
    for name, value in {**secrets, "AWS_SECRET_ACCESS_KEY": "s3-secret", "PATH": "/usr/bin"}.items():
        monkeypatch.setenv(name, value)
    env = engine_env(Settings(home=tmp_path, artifact_uri="s3://bucket/art"), "cpu")
    assert env.pop("LORAFLOW_CONFIG") != secrets["LORAFLOW_CONFIG"]  # its own, empty (next test)
    assert not set(secrets) & set(env), sorted(set(secrets) & set(env))
    assert not [
        v for v in env.values() if any(s in v for s in ("hunter2", "pseudonym-secret", "metrics-secret"))
    ]
    loraflow = sorted(k for k in env if k.startswith("LORAFLOW_"))
    assert loraflow == [
        "LORAFLOW_ARTIFACT_URI",
        "LORAFLOW_ENGINE__CACHE_DIR",
        "LORAFLOW_ENGINE__CACHE_MAX_BYTES",
        "LORAFLOW_ENGINE__RESOLVER",
    ]
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3-secret" and env["PATH"] == "/usr/bin"  # the store's client


def test_an_engine_reads_no_config_file_of_the_process_that_started_it(
    isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's ./loraflow.toml (the engine starts in the gateway's working directory) holds
    secrets too; the engine's settings come from its environment alone."""
    (isolated_env / "loraflow.toml").write_text(
        'database_url = "postgresql://loraflow:hunter2@db/loraflow"\n[engine]\ncache_max_bytes = 7\n'
    )
    assert load_settings().database_url is not None  # what the gateway reads here
    env = engine_env(Settings(home=tmp_path, artifact_uri="s3://bucket/art"), "cpu")
    for key in [k for k in os.environ if k.startswith("LORAFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    engine = load_settings()  # what the resolver plugin reads in the engine
    assert engine.database_url is None
    assert engine.engine.cache_max_bytes == Settings().engine.cache_max_bytes  # the default, not 7
    assert engine.engine.resolver and engine.resolved_artifact_uri == "s3://bucket/art"


def test_several_supervised_engines_get_disjoint_gpus_or_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_slice(ServerSettings(), "gpu", 0) == {} and engine_slice(ServerSettings(), "cpu", 0) == {}
    two_by_two = ServerSettings(supervised_engines=2, tensor_parallel_size=2)
    gpus = [engine_slice(two_by_two, "gpu", i)["CUDA_VISIBLE_DEVICES"] for i in (0, 1)]
    assert gpus == ["0,1", "2,3"]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    two = ServerSettings(supervised_engines=2)
    cores = [engine_slice(two, "cpu", i)["VLLM_CPU_OMP_THREADS_BIND"] for i in (0, 1)]
    assert cores == ["0,1", "2,3"]
    settings = Settings(home=Path("/h"), server=two)
    assert engine_env(settings, "cpu", index=1)["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"


def test_settings_set_flags_and_engine_args_carry_the_rest() -> None:
    cmd = command(
        "gpu",
        max_model_len=512,
        dtype="bfloat16",
        gpu_memory_utilization=0.85,
        tensor_parallel_size=2,
        max_loras=2,
        max_cpu_loras=16,
        max_lora_rank=32,
        engine_args=["--enforce-eager", "--swap-space", "8"],
    )
    assert flag(cmd, "--max-model-len") == "512" and flag(cmd, "--dtype") == "bfloat16"
    assert flag(cmd, "--gpu-memory-utilization") == "0.85" and flag(cmd, "--tensor-parallel-size") == "2"
    assert (flag(cmd, "--max-loras"), flag(cmd, "--max-cpu-loras"), flag(cmd, "--max-lora-rank")) == (
        "2",
        "16",
        "32",
    )
    assert cmd[-3:] == ["--enforce-eager", "--swap-space", "8"]
    assert flag(command("cpu", dtype="bfloat16"), "--dtype") == "bfloat16"  # a setting beats the default


@pytest.mark.parametrize(
    ("value", "setting"),
    [('["--max-model-len", "4096"]', "server.max_model_len"), ('["--port=9"]', "a free private port")],
)
def test_engine_args_may_not_repeat_a_flag_loraflow_sets(
    value: str, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLOW_SERVER__ENGINE_ARGS", value)
    result = CliRunner().invoke(app, ["serve", "--base-model", "/nowhere"])
    assert result.exit_code == 2
    assert "server.engine_args" in result.output and setting in result.output


def test_max_cpu_loras_must_hold_a_batch(isolated_env: Path) -> None:
    (isolated_env / "loraflow.toml").write_text("[server]\nmax_loras = 8\nmax_cpu_loras = 4\n")
    result = CliRunner().invoke(app, ["serve", "--base-model", "/nowhere"])
    assert result.exit_code == 2 and "max_cpu_loras (4) must be at least max_loras (8)" in result.output


def test_no_visible_gpu_means_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_device() == "cpu"


def test_the_engine_command_fails_fast_on_a_store_it_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLOW_ARTIFACT_URI", "nosuchprotocol://bucket/x")
    result = CliRunner().invoke(app, ["engine", "--base-model", "/m"])
    assert result.exit_code == 2
    # an unknown scheme is refused with the settings, naming the variable (before any store opens)
    assert "'nosuchprotocol' is not a storage scheme" in result.output
    assert "LORAFLOW_ARTIFACT_URI" in result.output
    monkeypatch.delenv("LORAFLOW_ARTIFACT_URI")
    result = CliRunner().invoke(app, ["engine"])
    assert result.exit_code == 2 and "--base-model" in result.output
