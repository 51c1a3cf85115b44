"""The registry against a real database: SQLite, and PostgreSQL when LORAFLOW_TEST_DATABASE_URL is set."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from loraflow.registry.errors import ConflictError, IntegrityError, InvalidAdapterError, NotFoundError
from loraflow.registry.refs import Ref
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.factories import FORCED, make_adapter, make_base, register_dataset

pytestmark = pytest.mark.store


@pytest.fixture
def reg(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    r = Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
    yield r
    r.close()


def _snapshot(reg: Registry) -> tuple[int, list]:
    return reg.revision(), [a.model_dump() for a in reg.adapters()]


def test_register_assigns_versions_and_records_lineage(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    start = reg.revision()
    v1 = reg.register(
        "support",
        make_adapter(tmp_path / "a1", seed=1),
        base_model=str(base_dir),
        task="triage",
        metrics={"eval_loss": 1.5},
        training_config={"lr": 1e-4, "lora": {"r": 8}},
    )
    v2 = reg.register("support", make_adapter(tmp_path / "a2", seed=2, r=16), base_model=str(base_dir))
    assert (v1.version, v2.version) == (1, 2)
    assert v1.rank == 8 and v2.rank == 16
    assert v1.target_modules == ["q_proj", "v_proj"]
    assert reg.revision() == start + 2
    info = reg.get("support")
    assert info.base_model == str(base_dir.resolve())
    assert len(info.base_model_fingerprint) == 64
    assert info.task == "triage"
    assert [v.version for v in info.versions] == [1, 2]
    assert info.versions[0].metrics == {"eval_loss": 1.5}
    assert info.versions[0].training_config == {"lr": 1e-4, "lora": {"r": 8}}
    assert info.versions[0].created_by == "tester"
    assert info.versions[0].created_at.tzinfo is not None


def test_version_files_round_trip_verified(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a1", seed=1)
    v1 = reg.register("support", src, base_model=str(base_dir))
    out = reg.fetch(v1, tmp_path / "fetched")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_corrupted_artifact_is_detected_on_read(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    v1 = reg.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    stored = Path(reg.artifacts.root) / "sha256" / v1.digest[:2] / v1.digest / "adapter_model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        reg.fetch(v1, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_refused_adapter_changes_nothing(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    reg.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    before = _snapshot(reg)
    with pytest.raises(InvalidAdapterError):
        reg.register(
            "support", make_adapter(tmp_path / "bad", config={"use_dora": True}), base_model=str(base_dir)
        )
    assert _snapshot(reg) == before


def test_other_base_model_refused_for_existing_adapter(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    reg.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    other = make_base(tmp_path / "other-base", tokenizer="a different tokenizer")
    before = _snapshot(reg)
    with pytest.raises(InvalidAdapterError) as info:
        reg.register("support", make_adapter(tmp_path / "a2", seed=2), base_model=str(other))
    assert info.value.param == "base"
    assert _snapshot(reg) == before


def test_adapter_declaring_a_different_local_base_is_refused(
    reg: Registry, base_dir: Path, tmp_path: Path
) -> None:
    other = make_base(tmp_path / "other-base", tokenizer="other")
    src = make_adapter(tmp_path / "a1", base_model_name_or_path=str(other))
    with pytest.raises(InvalidAdapterError, match="different model"):
        reg.register("support", src, base_model=str(base_dir))


def test_identical_files_are_not_a_new_version(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a1", seed=1)
    reg.register("support", src, base_model=str(base_dir))
    with pytest.raises(ConflictError, match="v1 already holds these exact files"):
        reg.register("support", src, base_model=str(base_dir))
    assert [v.version for v in reg.get("support").versions] == [1]


def test_crash_while_storing_leaves_nothing_in_view(
    reg: Registry, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_copy = shutil.copyfile

    def copy_then_die(src: str, dst: str) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copy_then_die)
    with pytest.raises(OSError, match="disk full"):
        reg.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    root = Path(reg.artifacts.root)
    assert not (root / "sha256").exists() or not any((root / "sha256").rglob("*.safetensors"))
    assert not any((root / ".staging").iterdir())
    with pytest.raises(NotFoundError):
        reg.get("support")


CRASH_AT_COMMIT = """
import os, signal, sys
from pathlib import Path
from sqlalchemy import event
from sqlmodel import Session
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings

home, url, src, base = sys.argv[1:5]
reg = Registry.open(Settings(home=Path(home), database_url=url))

@event.listens_for(Session, "before_commit")
def die(session):
    # Every statement of the registration has run in the open transaction; the process dies
    # before COMMIT, as a power cut or an OOM kill would do it.
    os.kill(os.getpid(), signal.SIGKILL)

reg.register("support", Path(src), base_model=base)
"""


def test_crash_before_commit_leaves_no_version(
    reg: Registry, db_url: str, base_dir: Path, tmp_path: Path
) -> None:
    src = make_adapter(tmp_path / "a1", seed=1)
    before = _snapshot(reg)
    done = subprocess.run(
        [sys.executable, "-c", CRASH_AT_COMMIT, str(tmp_path / "home"), db_url, str(src), str(base_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _snapshot(reg) == before  # no version, no adapter, not even a revision bump
    with pytest.raises(NotFoundError):
        reg.get("support")
    # What may be left is one complete, verified, unreferenced artifact; registering again reuses it.
    version = reg.register("support", src, base_model=str(base_dir))
    reg.artifacts.verify(version.digest)
    assert version.version == 1


def test_a_dataset_with_the_same_splits_is_not_a_new_version(reg: Registry, tmp_path: Path) -> None:
    register_dataset(reg, "tickets", tmp_path / "d", counts={"train": 8})
    before = (reg.revision(), reg.get_dataset("tickets"))
    with pytest.raises(ConflictError, match="tickets@v1 already holds these exact splits") as info:
        register_dataset(reg, "tickets", tmp_path / "d", counts={"train": 8})
    assert info.value.param == "FILE"
    assert (reg.revision(), reg.get_dataset("tickets")) == before


def test_migrations_match_the_models(db_url: str) -> None:
    """What `loraflow db upgrade` builds is exactly what the code's tables declare."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlmodel import SQLModel

    from loraflow.registry import db

    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_audit_subjects_are_backfilled_from_the_old_target_strings(empty_db_url: str) -> None:
    from sqlalchemy import text

    from loraflow.registry import db

    engine = db.make_engine(empty_db_url)
    try:
        db.upgrade(engine, "0002")
        old = [
            ("adapter.create", "key"),
            ("version.register", "key@v1"),
            ("alias.promote", "key:production"),
            ("dataset.register", "key@v3"),
            ("key.create", "key:ci-bot"),
            ("key.revoke", "key:ci-bot"),
        ]
        with engine.begin() as conn:
            for i, (action, target) in enumerate(old, start=1):
                conn.execute(
                    text(
                        "INSERT INTO audit_event (revision, actor, action, target, created_at) "
                        "VALUES (:r, 'me', :a, :t, CURRENT_TIMESTAMP)"
                    ),
                    {"r": i, "a": action, "t": target},
                )
        db.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT subject_kind, subject, version, alias FROM audit_event ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("adapter", "key", None, None),
        ("adapter", "key", 1, None),
        ("adapter", "key", None, "production"),
        ("dataset", "key", 3, None),
        ("api_key", "ci-bot", None, None),
        ("api_key", "ci-bot", None, None),
    ]


def test_promote_rollback_and_linear_history(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        reg.register("support", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    reg.promote("support", 1, force=True, reason=FORCED)
    reg.promote("support", 2, expect=1, force=True, reason=FORCED)
    reg.promote("support", 3, alias="staging")
    assert reg.get("support").aliases == {"production": 2, "staging": 3}
    assert reg.resolve(Ref("support")).version == 2
    assert reg.resolve(Ref("support", alias="staging")).version == 3
    assert reg.resolve(Ref("support", version=1)).version == 1

    with pytest.raises(ConflictError) as info:
        reg.promote("support", 3, expect=1, force=True, reason=FORCED)
    assert info.value.param == "expect"
    assert reg.get("support").aliases["production"] == 2

    back = reg.rollback("support")
    assert (back.from_version, back.to_version, back.reason) == (2, 1, "rollback")
    assert reg.get("support").aliases["production"] == 1

    moves = [m for m in reg.history("support").moves if m.alias == "production"]
    assert [(m.from_version, m.to_version) for m in moves] == [(None, 1), (1, 2), (2, 1)]
    for earlier, later in pairwise(moves):
        assert later.from_version == earlier.to_version
        assert later.revision > earlier.revision
    actions = [e.action for e in reg.history("support").events]
    assert actions[:4] == ["adapter.create", "version.register", "version.register", "version.register"]
    assert actions.count("alias.promote") == 3 and actions.count("alias.rollback") == 1


def test_rollback_without_a_previous_version(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    reg.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    with pytest.raises(NotFoundError):
        reg.rollback("support")
    reg.promote("support", 1, force=True, reason=FORCED)
    with pytest.raises(
        ConflictError, match="not moved since it was created; there is nothing to roll back to"
    ):
        reg.rollback("support")


def test_repeated_rollbacks_walk_back_through_history(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    for seed in (1, 2, 3, 4):
        reg.register("walk", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    for version in (1, 2, 3):
        reg.promote("walk", version, alias="staging")
    assert reg.rollback("walk", alias="staging").to_version == 2
    assert reg.rollback("walk", alias="staging").to_version == 1
    start = reg.revision()
    with pytest.raises(
        ConflictError, match="every promotion since it was created has been rolled back"
    ) as info:
        reg.rollback("walk", alias="staging")
    assert info.value.param == "alias" and reg.revision() == start
    assert reg.get("walk").aliases["staging"] == 1
    # A move forward after rollbacks is undone first; then the walk resumes where it was.
    reg.promote("walk", 4, alias="staging")
    assert reg.rollback("walk", alias="staging").to_version == 1
    with pytest.raises(ConflictError, match="nothing to roll back to"):
        reg.rollback("walk", alias="staging")
    reg.promote("walk", 3, alias="staging")
    reg.promote("walk", 4, alias="staging")
    assert [reg.rollback("walk", alias="staging").to_version for _ in range(2)] == [3, 1]
    moves = [(m.from_version, m.to_version, m.reason) for m in reg.history("walk").moves]
    assert moves[-2:] == [(4, 3, "rollback"), (3, 1, "rollback")]


def test_delete_alias_is_audited_and_lets_archive_work(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    for seed in (1, 2):
        reg.register("typo", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    reg.promote("typo", 1, force=True, reason=FORCED)
    reg.promote("typo", 2, alias="prod")
    with pytest.raises(ConflictError, match="pointed at by prod"):
        reg.archive("typo", 2)
    start = reg.revision()
    assert reg.delete_alias("typo", "prod") == 2
    assert reg.revision() == start + 1
    assert reg.get("typo").aliases == {"production": 1}
    assert reg.archive("typo", 2).status == "archived"
    event = [e for e in reg.history("typo").events if e.action == "alias.delete"][-1]
    assert (event.alias, event.before, event.after) == ("prod", {"version": 2}, None)
    with pytest.raises(NotFoundError, match="aliases: production") as missing:
        reg.delete_alias("typo", "prod")
    assert missing.value.param == "alias"
    with pytest.raises(NotFoundError):
        reg.rollback("typo", alias="prod")


def test_delete_production_needs_force(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    reg.register("guarded", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    reg.promote("guarded", 1, force=True, reason=FORCED)
    start = reg.revision()
    with pytest.raises(ConflictError, match="needs --force") as info:
        reg.delete_alias("guarded", "production")
    assert info.value.param == "force" and reg.revision() == start
    assert reg.delete_alias("guarded", "production", force=True) == 1
    assert reg.get("guarded").aliases == {}
    # Re-created afresh: there is nothing before it to roll back to.
    reg.promote("guarded", 1, force=True, reason=FORCED)
    with pytest.raises(ConflictError, match="nothing to roll back to"):
        reg.rollback("guarded")


def test_archive_refused_while_aliased(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    for seed in (1, 2):
        reg.register("support", make_adapter(tmp_path / f"a{seed}", seed=seed), base_model=str(base_dir))
    reg.promote("support", 1, force=True, reason=FORCED)
    with pytest.raises(ConflictError, match="pointed at by production"):
        reg.archive("support", 1)
    archived = reg.archive("support", 2)
    assert archived.status == "archived"
    with pytest.raises(ConflictError, match="archived"):
        reg.promote("support", 2, force=True, reason=FORCED)
    assert reg.get("support").aliases == {"production": 1}


def test_unknown_names_list_what_exists(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    reg.register("support", make_adapter(tmp_path / "a1", seed=1), base_model=str(base_dir))
    with pytest.raises(NotFoundError, match="adapters: support"):
        reg.get("nope")
    with pytest.raises(NotFoundError, match="versions: v1"):
        reg.promote("support", 7, force=True, reason=FORCED)
    with pytest.raises(NotFoundError, match="aliases: none"):
        reg.resolve(Ref("support", alias="canary"))


def test_diff_reports_config_metric_and_dataset_changes(
    reg: Registry, base_dir: Path, tmp_path: Path
) -> None:
    register_dataset(
        reg, "tickets", tmp_path / "d1", counts={"train": 8}, lineage={"kind": "file", "source": "a.jsonl"}
    )
    register_dataset(
        reg,
        "tickets",
        tmp_path / "d2",
        marker="2",
        counts={"train": 9},
        lineage={"kind": "file", "source": "b.jsonl"},
    )
    reg.register(
        "support",
        make_adapter(tmp_path / "a1", seed=1),
        base_model=str(base_dir),
        dataset="tickets@v1",
        training_config={"lr": 1e-4, "epochs": 3},
        metrics={"eval_loss": 1.2},
    )
    reg.register(
        "support",
        make_adapter(tmp_path / "a2", seed=2),
        base_model=str(base_dir),
        dataset="tickets",
        training_config={"lr": 2e-4, "epochs": 3},
        metrics={"eval_loss": 0.9},
    )
    changes = reg.diff("support", 1, 2)
    assert changes["config"] == {"lr": (1e-4, 2e-4)}
    assert changes["metrics"] == {"eval_loss": (1.2, 0.9)}
    assert changes["dataset"] == {"dataset": ("tickets@v1", "tickets@v2")}
    assert "digest" in changes["weights"]
    assert reg.diff("support", 1, 1) == {}


def test_unknown_dataset_registers_nothing(reg: Registry, base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no dataset named 'ghost'"):
        reg.register("support", make_adapter(tmp_path / "a1"), base_model=str(base_dir), dataset="ghost@v1")
    assert reg.adapters() == []


def test_schema_upgrade_policy(db_url: str, tmp_path: Path) -> None:
    """SQLite upgrades itself on open; PostgreSQL must be upgraded with `loraflow db upgrade`."""
    from sqlalchemy import text

    from loraflow.registry import db
    from loraflow.registry.errors import SchemaOutOfDateError

    if db_url.startswith("sqlite"):
        fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
        Registry.open(Settings(home=tmp_path / "home", database_url=fresh)).close()
        engine = db.make_engine(fresh)
        assert db.current_revision(engine) == db.head_revision()
        engine.dispose()
        return
    engine = db.make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0004'"))
    engine.dispose()
    with pytest.raises(SchemaOutOfDateError, match="loraflow db upgrade"):
        Registry.open(Settings(home=tmp_path / "home", database_url=db_url))
