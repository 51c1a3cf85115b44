"""Settings come from loraflow.toml and LORAFLOW_* (environment wins), never from globals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraflow.registry.errors import InvalidArgumentError
from loraflow.registry.settings import Settings, load_settings, setting_source, unknown_env_vars
from loraflow.registry.urls import mask_url

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


def test_a_config_file_named_in_the_environment_must_exist(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLOW_CONFIG", "/nope.toml")
    with pytest.raises(InvalidArgumentError, match=r"LORAFLOW_CONFIG=/nope\.toml: no such file") as caught:
        load_settings()
    assert caught.value.param == "LORAFLOW_CONFIG"


def test_a_config_file_that_does_not_parse_is_named_with_its_line(isolated_env: Path) -> None:
    (isolated_env / "loraflow.toml").write_text('default_adapter = "x"\n[server\nport = 1\n')
    with pytest.raises(InvalidArgumentError, match=r"loraflow\.toml is not valid TOML: .*at line 2"):
        load_settings()


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        (
            "LORAFLOW_SERVER__ENGINE_ARGS",
            "--enforce-eager --swap-space 8",
            "(setting server.engine_args), e.g. "
            """LORAFLOW_SERVER__ENGINE_ARGS='["--enforce-eager", "--swap-space", "8"]'""",
        ),
        ("LORAFLOW_TRAFFIC__ADAPTERS", "orders=1", "LORAFLOW_TRAFFIC__ADAPTERS must be a JSON object"),
    ],
)
def test_a_variable_for_a_list_or_dict_must_be_json(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, says: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(InvalidArgumentError) as caught:
        load_settings()
    assert says in caught.value.message


def test_unknown_variables_are_found_and_known_ones_are_not() -> None:
    environ = {
        "LORAFLOW_HOEM": "typo",
        "LORAFLOW_SERVER__PORTT": "1",
        "LORAFLOW_HOME": "ok",
        "LORAFLOW_SERVER__PORT": "1",
        "LORAFLOW_EVAL__JUDGE__URL": "nested section",
        "LORAFLOW_TRAFFIC__ADAPTERS__orders": "a dict's key",
        "LORAFLOW_GATE__ADAPTERS__orders": "{}",
        "LORAFLOW_CONFIG": "the config file",
        "LORAFLOW_DEBUG": "1",
        "LORAFLOW_TEST_DATABASE_URL": "the suite's",
        "PATH": "not ours",
    }
    assert unknown_env_vars(environ) == ["LORAFLOW_HOEM"]  # ignored with a warning
    environ["LORAFLOW_TRAFIC__X"] = "a mistyped section is no setting: warned about too"
    assert unknown_env_vars(environ) == ["LORAFLOW_HOEM", "LORAFLOW_TRAFIC__X"]


@pytest.mark.parametrize(
    ("var", "says"),
    [
        ("LORAFLOW_SERVER__PORTT", "LORAFLOW_SERVER__PORTT names no setting in [server]; known: "),
        (
            "LORAFLOW_TRAFFIC__URI",
            "LORAFLOW_TRAFFIC__URI names no setting in [traffic]; known: sample_rate, ",
        ),
        ("LORAFLOW_EVAL__JUDGE__URLL", "names no setting in [eval.judge]; known: url, model, "),
    ],
)
def test_a_variable_inside_a_section_that_names_no_setting_is_an_error(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, var: str, says: str
) -> None:
    monkeypatch.setenv(var, "x")
    assert unknown_env_vars({var: "x"}) == []  # not also "ignored"
    with pytest.raises(InvalidArgumentError, match=re.escape(says)) as caught:
        load_settings()
    assert caught.value.param == var


def test_an_unclosed_quote_still_gets_a_json_example(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLOW_SERVER__ENGINE_ARGS", '--x "foo')  # shlex.split raises on it
    with pytest.raises(InvalidArgumentError) as caught:
        load_settings()
    assert """e.g. LORAFLOW_SERVER__ENGINE_ARGS='["--x", "\\"foo"]'""" in caught.value.message


def test_a_password_in_a_bad_url_is_masked_and_postgres_is_corrected() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(database_url="postgres://u:secret@h/db")
    message = caught.value.errors()[0]["msg"]
    assert "write postgresql:// instead of postgres://" in message and "u:***@h/db" in message
    assert "secret" not in message
    with pytest.raises(ValidationError) as caught:
        Settings(database_url="mysql://u:secret@h/db")
    assert "secret" not in caught.value.errors()[0]["msg"]
    with pytest.raises(ValidationError) as caught:
        Settings(artifact_uri="foo://k:secret@bucket/x")
    assert "secret" not in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("postgresql+psycopg://u:p@ss@h:5432/db?x=a@b", "postgresql+psycopg://u:***@h:5432/db?x=a@b"),
        ("at 'postgres://u:pw@h/db' and s3://k:s@b/x", "at 'postgres://u:***@h/db' and s3://k:***@b/x"),
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("postgresql://h:5432/db", "postgresql://h:5432/db"),
        ("sqlite:////data/registry.db", "sqlite:////data/registry.db"),
        ("/a/folder", "/a/folder"),
    ],
)
def test_mask_url_hides_only_passwords(text: str, shown: str) -> None:
    assert mask_url(text) == shown


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("database_url", "notaurl", "must be a SQLite or PostgreSQL URL"),
        ("database_url", "mysql://db/x", "must be a SQLite or PostgreSQL URL"),
        ("artifact_uri", "foo://bar", "'foo' is not a storage scheme fsspec knows"),
    ],
)
def test_urls_are_checked_with_the_settings(setting: str, value: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(**{setting: value})  # type: ignore[arg-type]


def test_good_urls_pass() -> None:
    s = Settings(database_url="postgresql+psycopg://u@h:5432/db", artifact_uri="s3://bucket/prefix")
    assert s.resolved_artifact_uri == "s3://bucket/prefix"
    assert Settings(artifact_uri="relative/folder").artifact_uri == "relative/folder"


def test_a_bad_value_names_where_it_came_from(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert setting_source("server.port") == "loraflow.toml"
    monkeypatch.setenv("LORAFLOW_SERVER__PORT", "x")
    assert setting_source("server.port") == "LORAFLOW_SERVER__PORT"
    monkeypatch.setenv("LORAFLOW_EVAL", "{}")
    assert setting_source("eval.judge.url") == "LORAFLOW_EVAL"
