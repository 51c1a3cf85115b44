"""Settings come from loraflow.toml and LORAFLOW_* (environment wins), never from globals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from loraflow.registry.settings import Settings, load_settings

pytestmark = pytest.mark.unit


def test_defaults_live_under_home(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFLOW_HOME")
    s = load_settings()
    assert s.home == Path(".loraflow")
    assert s.resolved_database_url == f"sqlite:///{isolated_env / '.loraflow' / 'registry.db'}"
    assert s.resolved_artifact_uri == str(isolated_env / ".loraflow" / "artifacts")


def test_toml_then_environment(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated_env / "loraflow.toml").write_text(
        'default_adapter = "support"\n'
        'database_url = "postgresql://db/registry"\n'
        "[registry]\nmax_lora_rank = 16\n"
    )
    s = load_settings()
    assert s.default_adapter == "support"
    assert s.resolved_database_url == "postgresql://db/registry"
    assert s.registry.max_lora_rank == 16
    monkeypatch.setenv("LORAFLOW_DATABASE_URL", "postgresql://other/registry")
    monkeypatch.setenv("LORAFLOW_ARTIFACT_URI", "s3://bucket/loraflow")
    monkeypatch.setenv("LORAFLOW_REGISTRY__MAX_LORA_RANK", "128")
    s = load_settings()
    assert s.resolved_database_url == "postgresql://other/registry"
    assert s.resolved_artifact_uri == "s3://bucket/loraflow"
    assert s.registry.max_lora_rank == 128


def test_config_file_can_be_named(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text('default_adapter = "billing"\n')
    monkeypatch.setenv("LORAFLOW_CONFIG", str(other))
    assert load_settings().default_adapter == "billing"


def test_unknown_key_is_refused(isolated_env: Path) -> None:
    (isolated_env / "loraflow.toml").write_text('default_adaptr = "typo"\n')
    with pytest.raises(ValidationError, match="default_adaptr"):
        load_settings()


def test_explicit_values_win(isolated_env: Path) -> None:
    assert Settings(home=Path("/data")).resolved_database_url == "sqlite:////data/registry.db"


def test_nested_eval_sections_load_from_toml_and_environment(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated_env / "loraflow.toml").write_text(
        '[eval.lm_eval]\ntasks = ["gsm8k"]\nmetrics = { gsm8k = "exact_match,strict-match" }\n'
        '[eval.judge]\nurl = "http://judge/v1"\nmodel = "m"\n'
    )
    s = load_settings()
    assert s.eval.lm_eval is not None and s.eval.lm_eval.tasks == ["gsm8k"]
    assert s.eval.lm_eval.metrics == {"gsm8k": "exact_match,strict-match"}
    assert s.eval.judge is not None and s.eval.judge.model == "m"
    monkeypatch.setenv("LORAFLOW_EVAL__LM_EVAL__TASKS", '["local_task"]')
    monkeypatch.setenv("LORAFLOW_EVAL__LM_EVAL__LIMIT", "5")
    s = load_settings()
    assert s.eval.lm_eval is not None
    assert (s.eval.lm_eval.tasks, s.eval.lm_eval.limit) == (["local_task"], 5)
    monkeypatch.delenv("LORAFLOW_EVAL__LM_EVAL__TASKS")
    (isolated_env / "loraflow.toml").write_text("[eval.lm_eval]\ntasks = []\n")
    with pytest.raises(ValidationError, match="tasks"):
        load_settings()
