"""The `adapters` CLI through Typer's CliRunner: output, JSON shapes, exit codes, no change on error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.cli.adapters import app as adapters_app
from loraflow.cli.common import EXIT_CODES
from loraflow.cli.main import app as loraflow_app
from loraflow.registry.errors import ErrorCode
from loraflow.registry.refs import version_ref
from tests.factories import FORCE, make_adapter, register_dataset

pytestmark = pytest.mark.unit
runner = CliRunner()


def adapters(*args: str) -> tuple[int, str]:
    result = runner.invoke(adapters_app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture
def two_versions(base_dir: Path, tmp_path: Path) -> Path:
    for seed in (1, 2):
        code, output = adapters(
            "register",
            "support",
            str(make_adapter(tmp_path / f"a{seed}", seed=seed)),
            "--base",
            str(base_dir),
        )
        assert code == 0, output
        assert f"registered {version_ref('support', seed)}" in output
    return base_dir


def state_json() -> str:
    code, output = adapters("list", "--json")
    assert code == 0
    return output


def test_register_list_show(two_versions: Path) -> None:
    code, output = adapters("list")
    assert code == 0 and "support" in output
    code, output = adapters("show", "support", "--json")
    assert code == 0
    data = json.loads(output)
    assert set(data) == {"name", "base_model", "aliases", "versions"}
    assert data["name"] == "support" and data["aliases"] == {}
    assert [v["version"] for v in data["versions"]] == [1, 2]
    assert set(data["versions"][0]) == {
        "version",
        "digest",
        "status",
        "dataset",
        "metrics",
        "template_matches",
        "created_at",
    }
    code, output = adapters("show", "support@v2", "--json")
    assert code == 0 and json.loads(output)["version"] == 2


def test_register_json_metrics_and_config(base_dir: Path, tmp_path: Path) -> None:
    metrics, config = tmp_path / "m.json", tmp_path / "c.json"
    metrics.write_text('{"eval_loss": 0.5}')
    config.write_text('{"lr": 0.001}')
    code, output = adapters(
        "register",
        "x",
        str(make_adapter(tmp_path / "a")),
        "--base",
        str(base_dir),
        "--metrics",
        str(metrics),
        "--config",
        str(config),
        "--json",
    )
    assert code == 0, output
    assert json.loads(output)["metrics"] == {"eval_loss": 0.5}
    code, output = adapters("show", "x@v1", "--json")
    assert json.loads(output)["training_config"] == {"lr": 0.001}


def test_bad_metrics_file_names_the_option(base_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text("{nope")
    code, output = adapters(
        "register", "x", str(make_adapter(tmp_path / "a")), "--base", str(base_dir), "--metrics", str(bad)
    )
    assert code == EXIT_CODES[ErrorCode.INVALID_ARGUMENT]
    assert "metrics" in output and "not valid JSON" in output
    assert json.loads(state_json()) == []


def test_promote_expect_rollback_archive(two_versions: Path) -> None:
    assert adapters("promote", "support", "v1", *FORCE)[0] == 0
    code, output = adapters("promote", "support", "v2", "--expect", "v1", *FORCE)
    assert code == 0 and "support:production -> v2 (was v1" in output

    before = state_json()
    code, output = adapters("promote", "support", "v1", "--expect", "v1", *FORCE)
    assert code == EXIT_CODES[ErrorCode.CONFLICT] == 4
    assert output.count("\n") == 1 and "points at v2, not v1" in output
    assert state_json() == before

    code, output = adapters("archive", "support@v2")
    assert code == 4 and "pointed at by production" in output
    code, output = adapters("rollback", "support")
    assert code == 0 and "-> v1" in output
    assert adapters("archive", "support@v2")[0] == 0
    data = json.loads(adapters("show", "support", "--json")[1])
    assert data["aliases"] == {"production": 1}
    assert data["versions"][1]["status"] == "archived"


def test_staging_alias(two_versions: Path) -> None:
    assert adapters("promote", "support", "v2", "--alias", "staging")[0] == 0
    assert json.loads(adapters("show", "support", "--json")[1])["aliases"] == {"staging": 2}
    code, output = adapters("promote", "support", "v2", "--alias", "Not A Slug")
    assert code == 2 and "invalid alias" in output


def test_default_adapter_from_loraflow_toml(two_versions: Path, isolated_env: Path) -> None:
    (isolated_env / "loraflow.toml").write_text('default_adapter = "support"\n')
    code, output = adapters("promote", "v2", *FORCE)
    assert code == 0, output
    assert "support:production -> v2" in output
    assert adapters("promote", "v1", *FORCE)[0] == 0
    assert "-> v2" in adapters("rollback")[1]


def test_version_only_without_default_adapter(two_versions: Path) -> None:
    code, output = adapters("promote", "v2", *FORCE)
    assert code == 2 and "default_adapter" in output


def test_history_json_is_linear(two_versions: Path) -> None:
    adapters("promote", "support", "v1", *FORCE)
    adapters("promote", "support", "v2", *FORCE)
    adapters("rollback", "support")
    code, output = adapters("history", "support", "--json")
    assert code == 0
    moves = json.loads(output)["moves"]
    assert [(m["from_version"], m["to_version"]) for m in moves] == [(None, 1), (1, 2), (2, 1)]
    code, output = adapters("history", "support")
    assert code == 0 and "alias.rollback" in output


def test_diff(base_dir: Path, tmp_path: Path) -> None:
    for seed, lr in ((1, "0.001"), (2, "0.002")):
        cfg = tmp_path / f"c{seed}.json"
        cfg.write_text(f'{{"lr": {lr}, "epochs": 2}}')
        adapters(
            "register",
            "x",
            str(make_adapter(tmp_path / f"a{seed}", seed=seed)),
            "--base",
            str(base_dir),
            "--config",
            str(cfg),
        )
    code, output = adapters("diff", "x", "v1", "v2", "--json")
    assert code == 0
    data = json.loads(output)
    assert data["config"] == {"lr": {"a": 0.001, "b": 0.002}}
    assert "epochs" not in data["config"]


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("show", "ghost"), 3, "no adapter named 'ghost'; adapters: support"),
        (("show", "support@v9"), 3, "versions: v1, v2"),
        (("show", "support@vx"), 2, "invalid version 'vx'"),
        (("show", "bad name!"), 2, "invalid name"),
        (("promote", "support", "v9", *FORCE), 3, "versions: v1, v2"),
        (("promote", "support", "three"), 2, "invalid version"),
        (("archive", "support"), 2, "'support' names no version: write support@vN"),
        (("archive", "@v1"), 2, "no default_adapter is set"),
        (("promote", "support:nope"), 3, "has no alias 'nope'"),
        (("diff", "support@v1", "other@v2"), 2, "two versions of one adapter"),
        (("alias", "delete", "support"), 2, "alias delete takes NAME:ALIAS"),
        (("alias", "delete", "support:staging"), 3, "has no alias 'staging'; aliases: none"),
        (("alias", "delete", "support:production"), 4, "deleting it needs --force"),
        (("rollback", "support"), 3, "no alias 'production'"),
        (("diff", "support", "v1", "v7"), 3, "has no version v7"),
    ],
)
def test_errors_are_one_line_and_change_nothing(
    two_versions: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    before = state_json()
    got, output = adapters(*args)
    assert got == code, output
    assert words in output
    assert output.startswith("error: ") and output.count("\n") == 1
    assert state_json() == before


def test_a_base_path_that_does_not_exist_is_named(two_versions: Path, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    before = state_json()
    code, output = adapters("register", "support", str(src), "--base", str(tmp_path / "no-such-base"))
    assert code == 3 and "neither a local directory nor in the Hugging Face cache" in output, output
    assert output.startswith("error: ") and state_json() == before


def test_refused_adapter_exit_code(base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a", config={"use_dora": True})
    code, output = adapters("register", "x", str(src), "--base", str(base_dir))
    assert code == EXIT_CODES[ErrorCode.INVALID_ADAPTER] == 5
    assert "vllm#6983" in output
    assert json.loads(state_json()) == []


def test_loraflow_mounts_the_same_app(two_versions: Path) -> None:
    result = runner.invoke(loraflow_app, ["adapters", "show", "support", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads(adapters("show", "support", "--json")[1])


def test_bad_setting_is_named(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLOW_REGISTRY__MAX_LORA_RANK", "lots")
    code, output = adapters("list")
    assert code == 2
    assert "registry.max_lora_rank" in output


def test_show_says_whether_each_version_matches_its_base_chat_template(
    base_dir: Path, tmp_path: Path
) -> None:
    from loraflow.registry.basemodel import chat_template_hash
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import load_settings

    (base_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    served = chat_template_hash(base_dir)
    reg = Registry.open(load_settings())
    for seed, trained_with in ((1, served), (2, "f" * 64), (3, None)):
        reg.register(
            "support",
            make_adapter(tmp_path / f"a{seed}", seed=seed),
            base_model=str(base_dir),
            chat_template_hash=trained_with,
        )
    reg.close()
    data = json.loads(adapters("show", "support", "--json")[1])
    assert [v["template_matches"] for v in data["versions"]] == [True, False, None]
    assert json.loads(adapters("show", "support@v2", "--json")[1])["template_matches"] is False
    code, output = adapters("show", "support")
    rows = [line.split("│") for line in output.splitlines() if line.startswith("│ v")]
    assert code == 0 and "template" in output
    assert [row[7].strip() for row in rows] == ["yes", "NO", "unknown"]
    assert "chat template matches: yes" in adapters("show", "support@v1")[1]


def test_history_holds_only_the_adapters_own_events(base_dir: Path, tmp_path: Path) -> None:
    """Names may share a prefix with datasets and API keys: `history key` is not `key:ci-bot`."""
    from loraflow.registry.keys import create_key
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import load_settings

    reg = Registry.open(load_settings())
    reg.register("key", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    reg.register("support", make_adapter(tmp_path / "a2", seed=2), base_model=str(base_dir))
    create_key(reg, "ci-bot")
    register_dataset(reg, "support", tmp_path / "d")
    reg.close()
    for name in ("key", "support"):
        code, output = adapters("history", name, "--json")
        assert code == 0
        events = json.loads(output)["events"]
        assert [e["action"] for e in events] == ["adapter.create", "version.register"]
        assert {(e["subject_kind"], e["subject"]) for e in events} == {("adapter", name)}
    code, output = adapters("history", "support")
    assert "support@v1" in output and "dataset.register" not in output


def test_every_command_takes_name_at_version_and_name_colon_alias(two_versions: Path) -> None:
    code, output = adapters("promote", "support@v1", *FORCE, "--json")
    assert code == 0, output
    move = json.loads(output)
    assert (move["alias"], move["from_version"], move["to_version"], move["reason"]) == (
        "production",
        None,
        1,
        "promote",
    )
    assert move["created_alias"] is True and move["forced"] is True
    assert adapters("promote", "support@v2", "--alias", "staging")[0] == 0
    # staging's version goes to production: NAME:ALIAS resolves to what the alias points at now
    code, output = adapters("promote", "support:staging", "--expect", "v1", *FORCE)
    assert code == 0 and "support:production -> v2 (was v1" in output
    assert json.loads(adapters("show", "support:production", "--json")[1])["version"] == 2
    assert json.loads(adapters("show", "support@v1", "--json")[1])["version"] == 1
    code, output = adapters("diff", "support@v1", "support:production", "--json")
    assert code == 0 and json.loads(output) == json.loads(
        adapters("diff", "support", "v1", "v2", "--json")[1]
    )
    assert adapters("promote", "support", "v1", *FORCE)[0] == 0  # the older two-word form
    code, output = adapters("rollback", "support:production", "--json")
    assert code == 0 and json.loads(output)["to_version"] == 2
    code, output = adapters("archive", "support@v1", "--json")
    assert code == 0 and json.loads(output)["status"] == "archived"


def test_default_adapter_applies_to_every_command(two_versions: Path, isolated_env: Path) -> None:
    (isolated_env / "loraflow.toml").write_text('default_adapter = "support"\n')
    assert adapters("promote", "@v1", *FORCE)[0] == 0
    assert adapters("promote", ":production", "--alias", "staging")[0] == 0
    assert json.loads(adapters("show", "--json")[1])["aliases"] == {"production": 1, "staging": 1}
    assert json.loads(adapters("show", "@v2", "--json")[1])["version"] == 2
    assert json.loads(adapters("show", ":staging", "--json")[1])["version"] == 1
    assert "alias.promote" in adapters("history")[1]
    assert "weights" in json.loads(adapters("diff", "@v1", "v2", "--json")[1])
    code, output = adapters("alias", "delete", ":staging")
    assert code == 0 and "deleted support:staging (pointed at v1)" in output
    assert adapters("archive", "v2")[0] == 0


def test_a_new_alias_name_is_warned_about_and_can_be_deleted(two_versions: Path) -> None:
    result = runner.invoke(adapters_app, ["promote", "support@v1", *FORCE])
    assert result.exit_code == 0 and "warning" not in result.output  # the first production is expected
    result = runner.invoke(adapters_app, ["promote", "support@v2", "--alias", "prod"])
    assert result.exit_code == 0
    assert "warning: created new alias 'prod' on support (existing: production)" in result.stderr
    assert "pointed at by prod" in adapters("archive", "support@v2")[1]
    before = json.loads(adapters("history", "support", "--json")[1])
    code, output = adapters("alias", "delete", "support:prod", "--json")
    assert code == 0 and json.loads(output) == {
        "adapter": "support",
        "alias": "prod",
        "version": 2,
        "deleted": True,
    }
    after = json.loads(adapters("history", "support", "--json")[1])
    event = after["events"][-1]
    assert (event["action"], event["alias"], event["before"]) == ("alias.delete", "prod", {"version": 2})
    assert event["revision"] > before["events"][-1]["revision"]
    text = adapters("history", "support")[1]
    assert "alias.delete" in text and "gate=refused forced=True" not in text
    assert "forced=True" in text and "gate=refused" in text and "{" not in text
    assert adapters("archive", "support@v2")[0] == 0
    # production needs --force
    code, output = adapters("alias", "delete", "support:production")
    assert code == 4 and "--force" in output
    assert adapters("alias", "delete", "support:production", "--force")[0] == 0
    assert json.loads(adapters("show", "support", "--json")[1])["aliases"] == {}


def test_repeated_rollbacks_walk_back(two_versions: Path, base_dir: Path, tmp_path: Path) -> None:
    adapters("register", "support", str(make_adapter(tmp_path / "a3", seed=3)), "--base-model", str(base_dir))
    for v in ("v1", "v2", "v3"):
        assert adapters("promote", f"support@{v}", "--alias", "staging")[0] == 0
    assert "-> v2" in adapters("rollback", "support:staging")[1]
    assert "-> v1" in adapters("rollback", "support", "--alias", "staging")[1]
    before = state_json()
    code, output = adapters("rollback", "support:staging")
    assert code == 4 and "nothing to roll back to" in output
    assert state_json() == before


def test_show_version_is_a_summary_with_the_latest_eval(two_versions: Path) -> None:
    from loraflow.registry.service import Registry
    from loraflow.registry.settings import load_settings

    reg = Registry.open(load_settings())
    report = {
        "primary_metric": "exact_match",
        "dataset": "tickets@v1",
        "split": "test",
        "n": 40,
        "systems": {
            "base": {"label": "prompted base", "metrics": {"exact_match": {"mean": 0.1, "ci": [0.05, 0.2]}}},
            "candidate": {"label": "support@v2", "metrics": {"exact_match": {"mean": 0.6, "ci": [0.5, 0.7]}}},
        },
        "comparisons": {"base": {"exact_match": {"diff": 0.5, "ci": [0.4, 0.6]}}},
    }
    for n in (1, 2):
        reg.record_evaluation(
            "support",
            2,
            dataset=None,
            split="test",
            split_digest=f"{n}" * 64,
            production_version=None,
            report=report | {"n": 40 + n},
        )
    reg.close()
    code, output = adapters("show", "support@v2")
    assert code == 0, output
    assert "prompted base 0.100 [0.050, 0.200]" in output and "support@v2 0.600 [0.500, 0.700]" in output
    assert "Δ vs base 0.500 [0.400, 0.600]" in output and "(n=42)" in output
    assert "gate:" in output and "--json" in output
    assert "None" not in output and "{" not in output
    data = json.loads(adapters("show", "support@v2", "--json")[1])
    assert [e["report"]["n"] for e in data["evaluations"]] == [42, 41]  # newest first
    assert data["gate"]["alias"] == "production" and "message" in data["gate"]
    assert "latest eval: none yet" in adapters("show", "support@v1")[1]


def test_show_version_summarizes_metrics_and_loss(base_dir: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "m.json"
    metrics.write_text(
        json.dumps(
            {
                "eval_loss": 0.52,
                "base_eval_loss": 1.9,
                "steps": 30,
                "loss_curve": [[5, 2.31], [10, 1.5], [30, 0.61]],
                "eval_curve": [[20, 0.7], [30, 0.52]],
            }
        )
    )
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"learning_rate": 0.0002, "lora": {"r": 8}}))
    src = make_adapter(tmp_path / "a")
    args = ("register", "sum", str(src), "--base-model", str(base_dir), "--task", "extract [red]fields")
    assert adapters(*args, "--metrics", str(metrics), "--config", str(config))[0] == 0
    code, output = adapters("show", "sum@v1")
    assert code == 0, output
    assert "metrics: eval_loss 0.52, base_eval_loss 1.9, steps 30" in output
    assert "training loss: 2.31 (step 5) -> 0.61 (step 30), 3 points" in output
    assert "eval loss: 0.7 (step 20) -> 0.52 (step 30)" in output
    assert "dataset: - (not recorded)" in output and "learning_rate" not in output  # config: --json only
    assert "[[" not in output and "None" not in output
    code, output = adapters("show", "sum")
    assert code == 0 and "extract [red]fields" in output
    code, output = adapters("history", "sum")
    assert code == 0 and "None" not in output and "dataset=-" in output


def test_a_refused_promote_to_a_new_alias_warns_of_nothing(two_versions: Path) -> None:
    result = runner.invoke(adapters_app, ["promote", "support@v1", "--alias", "bad name!"])
    assert result.exit_code == 2 and "warning" not in result.output  # nothing was created
    result = runner.invoke(adapters_app, ["promote", "support@v9", "--alias", "prod"])
    assert result.exit_code == 3 and "warning" not in result.output


def test_show_summarizes_metrics_of_any_shape(base_dir: Path, tmp_path: Path) -> None:
    """`register --metrics/--eval-report` take any JSON object: a version whose curves or report are
    not what training writes is still shown, without the parts that do not fit."""
    metrics, report = tmp_path / "metrics.json", tmp_path / "report.json"
    metrics.write_text(json.dumps({"eval_loss": 0.5, "loss_curve": [1, 2, 3], "eval_curve": [[1, 2, 3]]}))
    report.write_text(json.dumps({"n": 2, "adapter": {"exact_match": 0.5}, "base": [0.1]}))
    src = make_adapter(tmp_path / "a")
    code, output = adapters(
        "register", "odd", str(src), "--base-model", str(base_dir), "--metrics", str(metrics),
        "--eval-report", str(report),
    )  # fmt: skip
    assert code == 0, output
    code, output = adapters("show", "odd@v1")
    assert code == 0, output
    assert "eval_loss 0.5" in output and "exact_match 0.5 (base -)" in output
    assert "training loss" not in output and "eval loss:" not in output
