"""Bad input a new user meets: one or two lines naming what to change, the documented exit code, no
Python traceback, and nothing changed. Each case runs the installed ``loraflow`` console script."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from loraflow.cli.common import DEBUG_ENV, EXIT_CODES, UNEXPECTED_EXIT_CODE, guarded
from loraflow.registry.errors import ErrorCode
from tests.factories import make_adapter, make_base, run_loraflow

INVALID = EXIT_CODES[ErrorCode.INVALID_ARGUMENT]  # 2 in the README's list
NOT_FOUND = EXIT_CODES[ErrorCode.NOT_FOUND]  # 3
UNAVAILABLE = EXIT_CODES[ErrorCode.UNAVAILABLE]  # 10
GOOD_LINE = json.dumps({"prompt": "hi", "completion": "there"})


loraflow = run_loraflow  # the installed script, as a subprocess


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    says: tuple[str, ...]  # in stderr (the error line) or stdout (a listed bad line)
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] = lambda work: None
    hides: tuple[str, ...] = ()  # never in the output (a password)


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda work: (work / name).write_bytes(data) and None


def _non_empty(work: Path) -> None:
    (work / "notempty").mkdir()
    (work / "notempty" / "notes.txt").write_text("mine")


CASES = {
    "tiny-model onto a file": Case(
        ("dev", "tiny-model", "afile"), INVALID, ("afile is a file",), setup=_write("afile", b"x")
    ),
    "tiny-model into a folder with files": Case(
        ("dev", "tiny-model", "notempty"), INVALID, ("notempty is not empty", "--force"), setup=_non_empty
    ),
    "not a Parquet file": Case(
        ("data", "validate", "fake.parquet"),
        INVALID,
        ("fake.parquet is not a readable Parquet file", "JSONL"),
        setup=_write("fake.parquet", b"not parquet at all\n"),
    ),
    "gzipped JSONL": Case(
        ("data", "validate", "d.jsonl"),
        INVALID,
        ("gzip-compressed", "gunzip"),
        setup=_write("d.jsonl", gzip.compress((GOOD_LINE + "\n").encode())),
    ),
    "a line that is not UTF-8": Case(
        ("data", "validate", "latin1.jsonl"),
        INVALID,
        ("latin1.jsonl:1: not UTF-8 text (byte 0xe9",),
        setup=_write(
            "latin1.jsonl", b'{"prompt": "caf\xe9", "completion": "b"}\n' + GOOD_LINE.encode() + b"\n"
        ),
    ),
    "a UTF-8 BOM is accepted": Case(
        ("data", "validate", "bom.jsonl"),
        0,
        ("1 good examples, 0 bad lines",),
        setup=_write("bom.jsonl", b"\xef\xbb\xbf" + GOOD_LINE.encode() + b"\n"),
    ),
    "CSV": Case(
        ("data", "validate", "orders.csv"),
        INVALID,
        ("looks like CSV", "JSONL", "Parquet"),
        setup=_write("orders.csv", b"prompt,completion\nhi,there\nbye,now\n"),
    ),
    "--max-length below 8": Case(
        ("data", "validate", "d.jsonl", "--max-length", "-5"), INVALID, ("--max-length",)
    ),
    "--max-length without a base": Case(
        ("data", "validate", "d.jsonl", "--max-length", "64"),
        INVALID,
        ("--max-length", "--base"),
        setup=_write("d.jsonl", GOOD_LINE.encode() + b"\n"),
    ),
    "loraflow.toml that does not parse": Case(
        ("adapters", "list"),
        INVALID,
        ("loraflow.toml is not valid TOML", "line 2"),
        setup=_write("loraflow.toml", b"[server]\nport = = 8000\n"),
    ),
    "train --config YAML that does not parse": Case(
        ("train", "--config", "train.yaml"),
        INVALID,
        ("train.yaml is not valid YAML at line 2",),
        setup=_write("train.yaml", b"adapter: x\n  base: [\n"),
    ),
    "engine_args that is not a JSON list": Case(
        ("adapters", "list"),
        INVALID,
        ("LORAFLOW_SERVER__ENGINE_ARGS must be a JSON list", """'["--enforce-eager"]'"""),
        env={"LORAFLOW_SERVER__ENGINE_ARGS": "--enforce-eager"},
    ),
    "engine_args whose quote does not close": Case(
        ("adapters", "list"),
        INVALID,
        ("LORAFLOW_SERVER__ENGINE_ARGS must be a JSON list", """'["--x", "\\"foo"]'"""),
        env={"LORAFLOW_SERVER__ENGINE_ARGS": '--x "foo'},
    ),
    "a variable inside a section that names none of its settings": Case(
        ("traffic", "show", "r"),
        INVALID,
        ("LORAFLOW_TRAFFIC__URI names no setting in [traffic]; known: sample_rate, ",),
        env={"LORAFLOW_TRAFFIC__URI": "x"},
    ),
    "a postgres:// database URL with a password": Case(
        ("adapters", "list"),
        INVALID,
        ("write postgresql:// instead of postgres://", "postgres://u:***@h/db", "LORAFLOW_DATABASE_URL"),
        env={"LORAFLOW_DATABASE_URL": "postgres://u:secret@h/db"},
        hides=("secret",),
    ),
    "a database URL that is not one": Case(
        ("adapters", "list"),
        INVALID,
        ("database_url", "LORAFLOW_DATABASE_URL"),
        env={"LORAFLOW_DATABASE_URL": "notaurl"},
    ),
    "a PostgreSQL server that cannot be reached": Case(
        ("adapters", "list"),
        UNAVAILABLE,
        ("cannot connect to the registry database at 127.0.0.1:1/nothing",),
        env={"LORAFLOW_DATABASE_URL": "postgresql://loraflow:secret@127.0.0.1:1/nothing"},
    ),
    "an artifact URI scheme nobody knows": Case(
        ("keys", "create", "k"),
        INVALID,
        ("'foo' is not a storage scheme", "LORAFLOW_ARTIFACT_URI"),
        env={"LORAFLOW_ARTIFACT_URI": "foo://bar"},
    ),
    "a LORAFLOW_HOME that cannot be written": Case(
        ("keys", "create", "k"),
        INVALID,
        ("cannot create", "LORAFLOW_HOME"),
        env={"LORAFLOW_HOME": "afile/home"},
        setup=_write("afile", b"x"),
    ),
    "a LORAFLOW_CONFIG that names no file": Case(
        ("adapters", "list"),
        INVALID,
        ("LORAFLOW_CONFIG=/nope.toml: no such file",),
        env={"LORAFLOW_CONFIG": "/nope.toml"},
    ),
    "a read-only command on a mistyped LORAFLOW_HOME": Case(
        ("adapters", "list"),
        NOT_FOUND,
        ("no registry database at", "typo/registry.db"),
        env={"LORAFLOW_HOME": "typo"},
    ),
    "train with a name the registry refuses": Case(
        ("train", "--adapter", "bad name", "--base", "nowhere", "--data", "orders"),
        INVALID,
        ("invalid name 'bad name'",),
    ),
    "train with a rank above registry.max_lora_rank": Case(
        ("train", "--adapter", "orders", "--base", "nowhere", "--data", "orders", "--r", "128"),
        INVALID,
        ("r=128", "registry.max_lora_rank (64)"),
    ),
    "prepare with fractions that leave nothing to train on": Case(
        ("data", "prepare", "d.jsonl", "--name", "d", "--base", "nowhere", "--val-fraction", "0.95"),
        INVALID,
        ("val_fraction (0.95) and test_fraction (0.1)",),
        setup=_write("d.jsonl", GOOD_LINE.encode() + b"\n"),
    ),
    "prepare with bad lines, before the base loads": Case(
        ("data", "prepare", "d.jsonl", "--name", "d", "--base", "nowhere"),
        INVALID,
        ("d.jsonl:2: invalid JSON", "1 bad lines"),
        setup=_write("d.jsonl", GOOD_LINE.encode() + b"\n{oops\n"),
    ),
    "the console on the network with auth off": Case(
        ("ui", "--host", "0.0.0.0"), INVALID, ("--host 0.0.0.0 would open the console", "server.auth")
    ),
    "the console on the gateway's port": Case(
        ("ui", "--port", "8000"), INVALID, ("the gateway's address", "--port")
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_its_exit_code(case: Case, isolated_env: Path) -> None:
    case.setup(isolated_env)
    before = sorted(p.relative_to(isolated_env) for p in isolated_env.rglob("*"))
    done = loraflow(*case.args, cwd=isolated_env, env=case.env)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode == case.code, output
    for text in case.says:
        assert text in output, output
    for text in case.hides:
        assert text not in output, output
    assert "warning: ignoring" not in done.stderr, done.stderr  # an error is not also "ignored"
    if case.code:
        # one error line (data validate lists bad lines on stdout instead; Click's usage errors box theirs)
        assert done.stderr.count("error: ") <= 1, done.stderr
        assert len(done.stderr.strip().splitlines()) <= 2 or "Usage:" in done.stderr, done.stderr
        # nothing changed where the user works (no registry, no checkpoints, no model files)
        assert sorted(p.relative_to(isolated_env) for p in isolated_env.rglob("*")) == before
    home = Path(os.environ["LORAFLOW_HOME"])
    assert not (home / "runs").exists()  # train refused before it made a checkpoint folder


@pytest.mark.integration
def test_a_mistyped_home_creates_no_registry(isolated_env: Path, tmp_path: Path) -> None:
    typo = tmp_path / "hoem"
    for args in (
        ("adapters", "list"),
        ("adapters", "show", "x"),
        ("adapters", "history", "x"),
        ("keys", "list"),
        ("traffic", "show", "req-20260101-0123abcd"),
        ("traffic", "purge", "--request-id", "req-20260101-0123abcd"),
        ("drift", "x", "--no-embeddings"),
        ("flywheel", "build-dataset", "x"),
        ("flywheel", "run", "x"),
    ):
        done = loraflow(*args, cwd=isolated_env, env={"LORAFLOW_HOME": str(typo)})
        assert done.returncode == NOT_FOUND, done.stderr
        assert f"no registry database at {typo / 'registry.db'}" in done.stderr
    assert not typo.exists()
    done = loraflow("adapters", "list", cwd=isolated_env)  # a command that writes made one: it says which
    assert done.returncode == NOT_FOUND
    loraflow("keys", "create", "k", cwd=isolated_env)
    done = loraflow("adapters", "list", cwd=isolated_env)
    assert done.returncode == 0, done.stderr
    assert f"no adapters registered in sqlite:///{Path(os.environ['LORAFLOW_HOME']).resolve()}" in done.stdout


@pytest.mark.integration
def test_user_text_is_shown_verbatim_not_as_rich_markup(isolated_env: Path, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    for name, task in (("tickets", "classify [/] tickets"), ("fields", "extract [red]fields")):
        adapter = make_adapter(tmp_path / name)
        done = loraflow(
            "adapters", "register", name, str(adapter), "--base", str(base), "--task", task, cwd=isolated_env
        )
        assert done.returncode == 0, done.stderr
        shown = loraflow("adapters", "show", name, cwd=isolated_env)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert task in shown.stdout, shown.stdout


@pytest.mark.integration
def test_warnings_for_what_would_be_silently_ignored(isolated_env: Path) -> None:
    done = loraflow(
        "keys",
        "create",
        "tenant",
        "--adapter",
        "nope",
        cwd=isolated_env,
        env={"LORAFLOW_HOEM": "x", "LORAFLOW_TRAFIC__X": "a mistyped section is no setting either"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("lf-")
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, done.stderr
    assert "LORAFLOW_HOEM, LORAFLOW_TRAFIC__X: not a loraflow setting" in warnings[0]
    assert "no adapter named nope is registered yet" in warnings[1]


boom = typer.Typer()


@boom.command()
@guarded
def explode() -> None:
    raise RuntimeError("something nobody expected")


clicks = typer.Typer()  # its own app: boom runs its one command without naming it


@clicks.command()
@guarded
def clicky(kind: str) -> None:
    import click  # the package, not Typer's vendored copy: a library or helper may raise its errors

    if kind == "usage":
        raise click.UsageError("--flag needs a value")
    if kind == "exit":
        raise click.exceptions.Exit(4)
    raise click.Abort()


@pytest.mark.unit
def test_errors_of_the_click_package_keep_their_message_and_exit_code() -> None:
    result = CliRunner().invoke(clicks, ["usage"])
    assert result.exit_code == 2 and result.stderr == "error: --flag needs a value\n", result.output
    assert CliRunner().invoke(clicks, ["exit"]).exit_code == 4
    result = CliRunner().invoke(clicks, ["abort"])
    assert result.exit_code == 1 and "unexpected" not in result.output


@pytest.mark.unit
def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(boom, [])
    assert result.exit_code == UNEXPECTED_EXIT_CODE == 1
    assert (
        result.stderr
        == f"error: unexpected RuntimeError: something nobody expected ({DEBUG_ENV}=1 shows the traceback)\n"
    )
    monkeypatch.setenv(DEBUG_ENV, "1")
    result = CliRunner().invoke(boom, [])
    assert isinstance(result.exception, RuntimeError)  # raised on: Typer prints the traceback
