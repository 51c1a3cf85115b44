"""The root command: --version, -h, shell completion, help text, and `config show`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraflow.cli.main import app

pytestmark = pytest.mark.unit
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_version_and_short_help() -> None:
    assert invoke("--version") == (0, f"loraflow {version('loraflow')}\n")
    code, output = invoke("-h")
    assert code == 0 and "--install-completion" in output and "--show-completion" in output
    code, output = invoke("adapters", "promote", "-h")  # -h is inherited by every subcommand
    assert code == 0 and "Example: loraflow adapters promote support@v3" in output


def test_shell_completion(tmp_path: Path) -> None:
    """The shipped entry point prints a completion script for the shell it runs under, and completes."""
    exe = Path(sys.executable).parent / "loraflow"
    script = subprocess.run(
        ["bash", "-c", f"{exe} --show-completion"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _loraflow_completion loraflow" in script.stdout
    env = {
        **os.environ,
        "_LORAFLOW_COMPLETE": "complete_bash",
        "COMP_WORDS": "loraflow adap",
        "COMP_CWORD": "1",
    }
    words = subprocess.run([str(exe)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert words.stdout.split() == ["adapters"], words.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("serve", "--help"), ["[server] settings", "Default: server.port (8000)", "--base-model"]),
        (
            ("train", "--help"),
            [
                "Default: 3.",
                "Default: -1",
                "Default: 8.",
                "Default: 1.",
                "Default: 20.",
                "Default: 0.",
                "docs/train-config.md",
                "--base-model",
            ],
        ),
        (("adapters", "register", "--help"), ["--base-model", "--base "]),
        (("data", "prepare", "--help"), ["--base-model", "Example:"]),
        (("adapters", "alias", "delete", "--help"), ["NAME:ALIAS", "--force"]),
    ],
)
def test_help_names_defaults_and_examples(args: tuple[str, ...], words: list[str]) -> None:
    code, output = invoke(*args)
    flat = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", output))
    assert code == 0
    for word in words:
        assert word in flat, word


def test_every_command_has_an_example() -> None:
    """Each command's help shows how it is called (the commands this package's CLI defines)."""
    import typer.main

    group = typer.main.get_command(app)
    missing = []

    def walk(cmd: object, path: str) -> None:
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, f"{path} {name}")
        elif "Example" not in (getattr(cmd, "help", "") or ""):
            missing.append(path.strip())

    walk(group, "")
    assert missing == []


def test_config_show_names_each_source(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated_env / "loraflow.toml").write_text('default_adapter = "support"\n[server]\nport = 8100\n')
    monkeypatch.setenv("LORAFLOW_SERVER__HOST", "0.0.0.0")
    monkeypatch.setenv("LORAFLOW_DATABASE_URL", "postgresql://bob:hunter2@db:5432/loraflow")
    code, output = invoke("config", "show", "--json")
    assert code == 0, output
    data = json.loads(output)["settings"]
    assert data["default_adapter"] == {"value": "support", "source": "file loraflow.toml"}
    assert data["server.port"] == {"value": 8100, "source": "file loraflow.toml"}
    assert data["server.host"] == {"value": "0.0.0.0", "source": "env LORAFLOW_SERVER__HOST"}
    assert data["server.workers"]["source"] == "default"
    assert "hunter2" not in output and "bob:***@db" in output
    code, output = invoke("config", "show", "--changed")
    assert code == 0
    lines = [line for line in output.splitlines() if not line.startswith("#")]
    assert "server.host" in output and "(env LORAFLOW_SERVER__HOST)" in output and "server.port" in output
    assert all("(default)" not in line for line in lines) and "server.workers" not in output
    assert "hunter2" not in output
    assert "# config_file: loraflow.toml\n" in output


def test_config_show_says_the_config_file_is_absent(isolated_env: Path) -> None:
    code, output = invoke("config", "show")
    assert code == 0, output
    assert "# config_file: loraflow.toml (absent: every setting is env or default)" in output
    assert "(file " not in output


def test_every_train_config_key_is_documented() -> None:
    from loraflow.trainer.config import TrainConfig

    doc = (Path(__file__).parents[2] / "docs" / "train-config.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", doc, re.MULTILINE))
    assert documented == set(TrainConfig.model_fields)


def test_every_json_flag_gets_json_errors() -> None:
    """`guarded` prints errors as JSON when the command's `as_json` parameter is set: every --json
    flag must be that parameter, and every command with one must be guarded."""
    import typer.main

    from loraflow.cli.common import guarded

    def commands(cmd: object, path: str) -> list[tuple[str, object]]:
        sub = getattr(cmd, "commands", None)
        if sub:
            return [c for name, child in sub.items() for c in commands(child, f"{path} {name}")]
        return [(path.strip(), cmd)]

    found = []
    for path, cmd in commands(typer.main.get_command(app), ""):
        for param in getattr(cmd, "params", []):
            if "--json" in getattr(param, "opts", []):
                found.append(path)
                assert param.name == "as_json", path
                # Typer wraps the command function once; `guarded` is the wrapper one level inside.
                inner = getattr(getattr(cmd, "callback", None), "__wrapped__", None)
                assert getattr(inner, "__wrapped__", None) is not None, f"{path} is not guarded"
    unguarded = typer.Typer()
    unguarded.command("plain")(lambda as_json=False: None)
    plain = typer.main.get_command(unguarded)
    plain_inner = getattr(getattr(plain, "callback", None), "__wrapped__", None)
    assert plain_inner is not None and getattr(plain_inner, "__wrapped__", None) is None  # it can fail
    assert getattr(guarded(lambda: None), "__wrapped__", None) is not None
    scripted = {"adapters promote", "adapters rollback", "adapters archive", "train", "data prepare"}
    scripted |= {"db current", "keys create", "keys revoke", "traffic purge"}
    assert scripted <= set(found)
