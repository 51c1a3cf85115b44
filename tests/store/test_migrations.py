"""Schema upgrades from a populated database of every earlier revision (SQLite, and PostgreSQL when given).

Each case builds a database at one revision with Alembic, fills it with raw SQL in exactly the
shape the code of that revision wrote (adapters, versions, aliases and their moves, audit events,
a dataset, API keys, evaluations, drift reports, rollouts), upgrades it to head as `loraflow db
upgrade` does, and then reads and writes it through the ``Registry`` facade: list, show, history,
resolve, fetch, a gated promote, rollback, archive, and new rows (which on PostgreSQL need the id
sequences intact): a rollout, a review of a sampled request, an evaluation with its page, a
pairwise vote.

The rule: every migration gets an upgrade test from a populated database of the revision before
it. Adding ``versions/0006_x.py`` makes ``test_every_migration_has_a_populated_upgrade_case`` fail
until ``POPULATE`` has a function for 0005 that writes that schema's rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from loraflow.registry.adapter_files import ADAPTER_FILES
from loraflow.registry.artifacts import ArtifactStore
from loraflow.registry.basemodel import resolve_base_model
from loraflow.registry.errors import ConflictError, GateRefusedError
from loraflow.registry.redact import Redactor
from loraflow.registry.refs import Ref, version_ref
from loraflow.registry.rollouts import LATENCY_EDGES
from loraflow.registry.service import Registry
from loraflow.registry.settings import Settings
from tests.factories import make_adapter, make_base, served_record, write_traffic

pytestmark = pytest.mark.store

T0 = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
DATASET_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


@dataclass(frozen=True)
class World:
    """What the rows point at: a real base folder and real stored artifacts, so reads can verify."""

    base_id: str
    base_fingerprint: str
    adapters: dict[tuple[str, int], tuple[str, int]]  # (name, version) -> (digest, size_bytes)
    dataset_digest: str


@dataclass(frozen=True)
class Event:
    """An audit event, independent of how a revision stored what it concerns."""

    action: str
    kind: str  # adapter, dataset, api_key
    subject: str
    version: int | None = None
    alias: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None

    @property
    def target(self) -> str:
        """The formatted string revisions 0001 and 0002 stored instead (see 0003's docstring)."""
        if self.kind == "api_key":
            return f"key:{self.subject}"
        if self.version is not None:
            return version_ref(self.subject, self.version)
        if self.alias is not None:
            return f"{self.subject}:{self.alias}"
        return self.subject


def _types(values: dict[str, Any]) -> list[sa.BindParameter[Any]]:
    typed: list[sa.BindParameter[Any]] = []
    for key, value in values.items():
        if isinstance(value, dict | list):
            typed.append(sa.bindparam(key, type_=sa.JSON()))
        elif isinstance(value, datetime):
            typed.append(sa.bindparam(key, type_=sa.DateTime(timezone=True)))
    return typed


def insert(conn: Connection, table: str, **values: Any) -> int:
    """Raw INSERT of one row (ids from the database, as the code of every revision let them come)."""
    columns = ", ".join(values)
    params = ", ".join(f":{k}" for k in values)
    stmt = sa.text(f"INSERT INTO {table} ({columns}) VALUES ({params})").bindparams(*_types(values))
    conn.execute(stmt, values)
    row_id: int = conn.execute(sa.text(f"SELECT max(id) FROM {table}")).scalar_one()
    return row_id


def at(revision: int) -> datetime:
    return T0 + timedelta(minutes=revision)


class Writer:
    """Writes the rows of one registry history, one revision per mutation, as a revision's code did."""

    def __init__(self, conn: Connection, world: World, *, audit: str) -> None:
        self.conn, self.world, self.audit_style = conn, world, audit
        self.revision = 0
        self.adapter_ids: dict[str, int] = {}

    def _bump(self) -> int:
        self.revision += 1
        self.conn.execute(
            sa.text("UPDATE registry_state SET revision = :r WHERE id = 1"), {"r": self.revision}
        )
        return self.revision

    def _audit(self, event: Event, actor: str) -> None:
        common = {
            "revision": self.revision,
            "actor": actor,
            "action": event.action,
            "created_at": at(self.revision),
        }
        payload = {"before": event.before, "after": event.after}
        if self.audit_style == "target":
            insert(self.conn, "audit_event", **common, target=event.target, **payload)
        else:
            insert(
                self.conn,
                "audit_event",
                **common,
                subject_kind=event.kind,
                subject=event.subject,
                version=event.version,
                alias=event.alias,
                **payload,
            )

    def dataset(self, name: str, counts: dict[str, int], actor: str) -> None:
        self._bump()
        dataset_id = insert(self.conn, "dataset", name=name, created_by=actor, created_at=at(self.revision))
        insert(
            self.conn,
            "dataset_version",
            dataset_id=dataset_id,
            version=1,
            digest=self.world.dataset_digest,
            counts=counts,
            lineage={"source": "tickets.jsonl", "seed": 0, "fractions": {"val": 0.1, "test": 0.1}},
            profile={"train": {"examples": counts["train"], "prompt_tokens": {"p50": 31}}},
            created_by=actor,
            created_at=at(self.revision),
        )
        self._audit(
            Event(
                "dataset.register",
                "dataset",
                name,
                version=1,
                after={"digest": self.world.dataset_digest, "counts": counts},
            ),
            actor,
        )

    def version(self, name: str, version: int, actor: str, *, dataset_version_id: int | None = None) -> None:
        self._bump()
        digest, size = self.world.adapters[(name, version)]
        if name not in self.adapter_ids:
            self.adapter_ids[name] = insert(
                self.conn,
                "adapter",
                name=name,
                base_model=self.world.base_id,
                base_model_fingerprint=self.world.base_fingerprint,
                task=f"{name} triage [draft]",
                created_by=actor,
                created_at=at(self.revision),
            )
            self._audit(
                Event(
                    "adapter.create",
                    "adapter",
                    name,
                    after={
                        "base_model": self.world.base_id,
                        "base_model_fingerprint": self.world.base_fingerprint,
                    },
                ),
                actor,
            )
        insert(
            self.conn,
            "adapter_version",
            adapter_id=self.adapter_ids[name],
            version=version,
            digest=digest,
            rank=8,
            alpha=16.0,
            target_modules=["q_proj", "v_proj"],
            size_bytes=size,
            dataset_version_id=dataset_version_id,
            training_config={"learning_rate": 2e-4, "lora": {"r": 8, "alpha": 16}, "epochs": version},
            metrics={"eval_loss": 2.0 / version, "train_loss": [3.1, 2.2, 1.9]},
            eval_report=None,
            chat_template_hash="c" * 64,
            status="registered",
            created_by=actor,
            created_at=at(self.revision),
        )
        dataset = "tickets@v1" if dataset_version_id is not None else None
        self._audit(
            Event(
                "version.register",
                "adapter",
                name,
                version=version,
                after={"digest": digest, "dataset": dataset, "rank": 8},
            ),
            actor,
        )

    def move(self, name: str, alias: str, to: int, actor: str, *, reason: str = "promote") -> None:
        self._bump()
        adapter_id = self.adapter_ids[name]
        current = self.conn.execute(
            sa.text("SELECT version FROM alias WHERE adapter_id = :a AND name = :n"),
            {"a": adapter_id, "n": alias},
        ).scalar_one_or_none()
        if current is None:
            insert(
                self.conn,
                "alias",
                adapter_id=adapter_id,
                name=alias,
                version=to,
                updated_at=at(self.revision),
            )
        else:
            self.conn.execute(
                sa.text(
                    "UPDATE alias SET version = :v, updated_at = :t WHERE adapter_id = :a AND name = :n"
                ).bindparams(sa.bindparam("t", type_=sa.DateTime(timezone=True))),
                {"v": to, "t": at(self.revision), "a": adapter_id, "n": alias},
            )
        insert(
            self.conn,
            "alias_move",
            adapter_id=adapter_id,
            alias=alias,
            from_version=current,
            to_version=to,
            reason=reason,
            revision=self.revision,
            actor=actor,
            created_at=at(self.revision),
        )
        self._audit(
            Event(
                f"alias.{reason}",
                "adapter",
                name,
                alias=alias,
                before={"version": current} if current is not None else None,
                after={"version": to},
            ),
            actor,
        )

    def archive(self, name: str, version: int, actor: str) -> None:
        self._bump()
        self.conn.execute(
            sa.text("UPDATE adapter_version SET status = 'archived' WHERE adapter_id = :a AND version = :v"),
            {"a": self.adapter_ids[name], "v": version},
        )
        before, after = {"status": "registered"}, {"status": "archived"}
        self._audit(
            Event("version.archive", "adapter", name, version=version, before=before, after=after), actor
        )

    def key(
        self,
        name: str,
        adapters: list[str] | None,
        actor: str,
        *,
        revoked: bool = False,
        scopes: list[str] | None = None,  # from 0006 on
        limits: dict[str, int | None] | None = None,  # from 0007 on: rpm, tpm, max_concurrency
    ) -> None:
        self._bump()
        insert(
            self.conn,
            "api_key",
            **({} if scopes is None else {"scopes": scopes, "scopes_migrated": False}),
            **(limits or {}),
            name=name,
            prefix=f"lf-{name[:4]}",
            key_hash=name.encode().hex().ljust(64, "0")[:64],
            adapters=adapters,
            created_by=actor,
            created_at=at(self.revision),
            revoked_at=at(self.revision + 1) if revoked else None,
        )
        self._audit(
            Event("key.create", "api_key", name, after={"adapters": adapters, "prefix": f"lf-{name[:4]}"}),
            actor,
        )
        if revoked:
            self._bump()
            self._audit(
                Event("key.revoke", "api_key", name, before={"revoked": False}, after={"revoked": True}),
                actor,
            )

    def evaluation(self, name: str, version: int, production: int, actor: str) -> None:
        self._bump()
        dataset_version_id = self.conn.execute(sa.text("SELECT max(id) FROM dataset_version")).scalar_one()
        report = passing_report(name, version, production=production)
        evaluation_id = insert(
            self.conn,
            "evaluation",
            adapter_id=self.adapter_ids[name],
            version=version,
            dataset_version_id=dataset_version_id,
            split="test",
            split_digest="e" * 64,
            production_version=production,
            report=report,
            revision=self.revision,
            created_by=actor,
            created_at=at(self.revision),
        )
        after = {
            "evaluation": evaluation_id,
            "dataset": "tickets@v1",
            "split": "test",
            "split_digest": "e" * 64,
            "production_version": production,
        }
        self._audit(Event("version.evaluate", "adapter", name, version=version, after=after), actor)

    def drift(self, name: str, version: int, actor: str) -> None:
        """A `loraflow drift` report as 0005's code stored it (no page yet)."""
        self._bump()
        report_id = insert(
            self.conn,
            "drift_report",
            adapter_id=self.adapter_ids[name],
            version=version,
            window_start=at(self.revision) - timedelta(hours=24),
            window_end=at(self.revision),
            report={
                "adapter": name,
                "version": version,
                "verdict": "watch",
                "figures": {"refusal_rate": 0.06},
            },
            revision=self.revision,
            created_by=actor,
            created_at=at(self.revision),
        )
        after = {"drift_report": report_id}
        self._audit(Event("version.drift", "adapter", name, version=version, after=after), actor)

    def rollout(self, name: str, candidate: int, baseline: int, actor: str) -> None:
        """A rollout as 0008's code kept it: started, advanced from shadow to a canary, aborted;
        each move one revision, audited, with its decision in the row; and two gateways' tallies."""
        steps = [{"shadow": 10.0, "canary": 0.0}, {"shadow": 0.0, "canary": 25.0}]
        moves = [
            ("start", 0, "running", None),
            ("advance", 1, "running", "pass"),
            ("abort", 1, "aborted", "ops"),
        ]
        decisions: list[dict[str, Any]] = []
        rollout_id = None
        for seq, (action, step, state, reason) in enumerate(moves, start=1):
            self._bump()
            when = at(self.revision)
            decisions.append(
                {
                    "at": when.isoformat(),
                    "action": action,
                    "actor": actor,
                    "step": step,
                    "reason": reason,
                    "figures": None,
                }
            )
            if rollout_id is None:
                rollout_id = insert(
                    self.conn,
                    "rollout",
                    adapter_id=self.adapter_ids[name],
                    candidate=candidate,
                    baseline=baseline,
                    policy="default",
                    steps=steps,
                    step=step,
                    state=state,
                    seq=seq,
                    decisions=decisions,
                    started_at=when,
                    step_started_at=when,
                    created_by=actor,
                    created_at=when,
                )
            else:
                self.conn.execute(
                    sa.text(
                        "UPDATE rollout SET step = :step, state = :state, seq = :seq, "
                        "decisions = :decisions, step_started_at = :when, ended_at = :ended WHERE id = :id"
                    ).bindparams(
                        sa.bindparam("decisions", type_=sa.JSON()),
                        sa.bindparam("when", type_=sa.DateTime(timezone=True)),
                        sa.bindparam("ended", type_=sa.DateTime(timezone=True)),
                    ),
                    {
                        "step": step,
                        "state": state,
                        "seq": seq,
                        "decisions": decisions,
                        "when": when,
                        "ended": when if state == "aborted" else None,
                        "id": rollout_id,
                    },
                )
            after = {
                "rollout": rollout_id,
                "state": state,
                "step": step,
                "weights": steps[step],
                "baseline": baseline,
                "reason": reason,
                "figures": None,
            }
            self._audit(Event(f"rollout.{action}", "adapter", name, version=candidate, after=after), actor)
        latency = [0] * (len(LATENCY_EDGES) + 1)
        latency[10] = 12
        for holder in ("gw-a", "gw-b"):
            for step, arm in ((0, "production"), (0, "shadow"), (1, "production"), (1, "candidate")):
                counts = {"requests": 6, "errors": 0, "answered": 6, "json_ok": 6, "refusals": 0}
                counts |= {"truncated": 0, "agreed": 5, "rated": 2, "negative": int(arm == "candidate")}
                counts |= {"latency": latency, "ttft": latency}
                self.conn.execute(  # outside the revision, as 0008's gateways wrote them
                    sa.text(
                        "INSERT INTO rollout_tally (rollout_id, holder, step, arm, counts, updated_at) "
                        "VALUES (:r, :h, :s, :a, :c, :t)"
                    ).bindparams(
                        sa.bindparam("c", type_=sa.JSON()),
                        sa.bindparam("t", type_=sa.DateTime(timezone=True)),
                    ),
                    {"r": rollout_id, "h": holder, "s": step, "a": arm, "c": counts, "t": at(self.revision)},
                )


def passing_report(name: str, version: int, *, production: int) -> dict[str, Any]:
    """A `loraflow eval` report as 0004's code stored it: the candidate beats base and production."""
    gain = {"exact_match": {"diff": 0.3, "ci": [0.2, 0.4]}}
    return {
        "schema": 1,
        "candidate": version_ref(name, version),
        "primary_metric": "exact_match",
        "confidence": 0.95,
        "metrics": ["exact_match", "json_valid"],
        "systems": {"candidate": {"metrics": {"json_valid": {"mean": 1.0, "ci": None}}}},
        "comparisons": {"base": gain, "production": gain},
        "regression": {
            "suite": "builtin-general",
            "metric": "token_f1",
            "comparisons": {"base": {"diff": 0.0, "ci": None}, "production": {"diff": 0.0, "ci": None}},
        },
        "production": {"version": production},
        "examples": [{"prompt": "é ✓ <b>", "outputs": {"candidate": "ok"}}],
    }


# -- what each revision's code wrote -----------------------------------------------------------
def _history(w: Writer) -> None:
    """Everything revision 0001 could record: adapters, versions, aliases and moves, a dataset, audits."""
    w.dataset("tickets", {"train": 40, "val": 5, "test": 5}, "alice")
    dataset_version_id = w.conn.execute(sa.text("SELECT max(id) FROM dataset_version")).scalar_one()
    w.version("support", 1, "alice", dataset_version_id=dataset_version_id)
    w.move("support", "production", 1, "alice")
    w.version("support", 2, "bob", dataset_version_id=dataset_version_id)
    w.move("support", "production", 2, "bob")
    w.version("support", 3, "bob")
    w.move("support", "staging", 3, "bob")
    w.version("billing", 1, "carol")
    w.version("billing", 2, "carol")
    w.move("billing", "production", 2, "carol")
    w.archive("billing", 1, "carol")


def populate_0001(w: Writer) -> None:
    _history(w)


def populate_0002(w: Writer) -> None:
    _history(w)
    w.key("ci-bot", ["support"], "alice")
    w.key("old-bot", None, "alice", revoked=True)


def populate_0003(w: Writer) -> None:
    populate_0002(w)  # 0003 changed how audit events name their subject: the Writer's audit style


def populate_0004(w: Writer) -> None:
    populate_0003(w)
    w.evaluation("support", 3, production=2, actor="bob")


def populate_0005(w: Writer) -> None:
    populate_0004(w)  # 0005 added drift reports, which nothing here depends on


def populate_0006(w: Writer) -> None:
    _history(w)
    w.key("ci-bot", ["support"], "alice", scopes=["versions"])
    w.key("old-bot", None, "alice", revoked=True, scopes=[])
    w.evaluation("support", 3, production=2, actor="bob")


def populate_0007(w: Writer) -> None:
    _history(w)
    w.key(
        "ci-bot",
        ["support"],
        "alice",
        scopes=["versions"],
        limits={"rpm": 60, "tpm": None, "max_concurrency": 4},
    )
    w.key("old-bot", None, "alice", revoked=True, scopes=[])
    w.evaluation("support", 3, production=2, actor="bob")
    w.conn.execute(  # a gateway's lease of ci-bot's budget, as 0007's rate limiter wrote it
        sa.text(
            "INSERT INTO rate_lease (key_name, kind, \"window\", granted) VALUES ('ci-bot', 'requests', 7, 5)"
        )
    )


def populate_0008(w: Writer) -> None:
    populate_0007(w)
    w.drift("support", 2, "bob")
    w.rollout("support", 3, 2, "bob")  # ended: production is still v2, and a new rollout may start


# The revision a database is at -> how that revision's code filled it, and how it stored audit subjects.
POPULATE: dict[str, tuple[Callable[[Writer], None], str]] = {
    "0001": (populate_0001, "target"),
    "0002": (populate_0002, "target"),
    "0003": (populate_0003, "subject"),
    "0004": (populate_0004, "subject"),
    "0005": (populate_0005, "subject"),
    "0006": (populate_0006, "subject"),
    "0007": (populate_0007, "subject"),
    "0008": (populate_0008, "subject"),
}


def _migrations() -> list[tuple[str, str | None]]:
    """(revision, the revision it upgrades from) of every script in versions/."""
    from alembic.script import ScriptDirectory

    from loraflow.registry.db import MIGRATIONS

    scripts = ScriptDirectory(str(MIGRATIONS)).walk_revisions()
    return [
        (s.revision, s.down_revision if isinstance(s.down_revision, str | None) else None) for s in scripts
    ]


def test_every_migration_has_a_populated_upgrade_case() -> None:
    missing = [
        f"{rev} (from {down})" for rev, down in _migrations() if down is not None and down not in POPULATE
    ]
    assert not missing, (
        f"migrations without an upgrade test from a populated database of the revision before: {missing}; "
        "add a populate function for that revision to POPULATE in tests/store/test_migrations.py"
    )
    assert {down for _, down in _migrations()} >= set(POPULATE)  # no case for a revision that does not exist


# -- the test ----------------------------------------------------------------------------------
@pytest.fixture
def world(tmp_path: Path) -> World:
    home = tmp_path / "home"
    base = resolve_base_model(str(make_base(tmp_path / "base")))
    artifacts = ArtifactStore(Settings(home=home).resolved_artifact_uri)
    adapters = {}
    for seed, key in enumerate(
        (("support", 1), ("support", 2), ("support", 3), ("billing", 1), ("billing", 2))
    ):
        stored = artifacts.put(make_adapter(tmp_path / f"adapter{seed}", seed=seed), ADAPTER_FILES)
        adapters[key] = (stored.digest, stored.size_bytes)
    data = tmp_path / "dataset"
    data.mkdir()
    for split in DATASET_FILES:
        (data / split).write_text(json.dumps({"messages": [{"role": "user", "content": split}]}) + "\n")
    return World(
        base_id=base.id,
        base_fingerprint=base.fingerprint,
        adapters=adapters,
        dataset_digest=artifacts.put(data, DATASET_FILES).digest,
    )


@pytest.fixture
def upgraded(
    request: pytest.FixtureRequest, empty_db_url: str, world: World, tmp_path: Path
) -> Iterator[tuple[Registry, int]]:
    """The registry over a database populated at ``request.param`` and then upgraded to head."""
    from loraflow.registry import db

    revision: str = request.param
    populate, audit = POPULATE[revision]
    engine = db.make_engine(empty_db_url)
    try:
        db.upgrade(engine, revision)
        with engine.begin() as conn:
            writer = Writer(conn, world, audit=audit)
            populate(writer)
        db.upgrade(engine)  # what `loraflow db upgrade` runs
        assert db.current_revision(engine) == db.head_revision()
    finally:
        engine.dispose()
    reg = Registry.open(Settings(home=tmp_path / "home", database_url=empty_db_url))
    yield reg, writer.revision
    reg.close()


@pytest.mark.parametrize("upgraded", sorted(POPULATE), indirect=True)
def test_a_populated_database_upgrades_to_head_and_stays_usable(
    upgraded: tuple[Registry, int],
    world: World,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    redactor: Redactor,
) -> None:
    reg, last = upgraded
    revision = request.node.callspec.params["upgraded"]
    assert reg.revision() == last

    # Read: list, show, resolve, datasets, fetch.
    assert [a.name for a in reg.adapters()] == ["billing", "support"]
    support = reg.get("support")
    assert support.aliases == {"production": 2, "staging": 3}
    assert support.task == "support triage [draft]" and support.created_by == "alice"
    assert support.base_model == world.base_id and support.base_model_fingerprint == world.base_fingerprint
    assert support.created_at == at(2)
    assert [(v.version, v.status, v.created_by) for v in support.versions] == [
        (1, "registered", "alice"),
        (2, "registered", "bob"),
        (3, "registered", "bob"),
    ]
    v1 = support.versions[0]
    assert v1.dataset == "tickets@v1" and support.versions[2].dataset is None
    assert v1.training_config == {"learning_rate": 2e-4, "lora": {"r": 8, "alpha": 16}, "epochs": 1}
    assert v1.metrics == {"eval_loss": 2.0, "train_loss": [3.1, 2.2, 1.9]}
    assert (v1.digest, v1.size_bytes) == world.adapters[("support", 1)]
    assert v1.target_modules == ["q_proj", "v_proj"] and v1.rank == 8 and v1.alpha == 16.0
    assert reg.resolve(Ref("support")).version == 2
    assert reg.resolve(Ref("support", alias="staging")).version == 3
    billing = reg.get("billing")
    assert billing.aliases == {"production": 2}
    assert [v.status for v in billing.versions] == ["archived", "registered"]
    dataset = reg.get_dataset("tickets")
    assert dataset.ref == "tickets@v1" and dataset.counts == {"train": 40, "val": 5, "test": 5}
    assert dataset.lineage["fractions"] == {"val": 0.1, "test": 0.1} and dataset.profile is not None
    fetched = reg.fetch(v1, tmp_path / "fetched")
    assert sorted(p.name for p in fetched.iterdir()) == sorted(ADAPTER_FILES)

    # History: alias moves, and audit events named by subject (0001/0002 parsed from their target strings).
    history = reg.history("support")
    assert [(m.alias, m.from_version, m.to_version, m.reason) for m in history.moves] == [
        ("production", None, 1, "promote"),
        ("production", 1, 2, "promote"),
        ("staging", None, 3, "promote"),
    ]
    events = [(e.action, e.target) for e in history.events]
    assert events[:5] == [
        ("adapter.create", "support"),
        ("version.register", "support@v1"),
        ("alias.promote", "support:production"),
        ("version.register", "support@v2"),
        ("alias.promote", "support:production"),
    ]
    assert all(e.subject_kind == "adapter" and e.subject == "support" for e in history.events)
    assert history.events[2].before is None and history.events[2].after == {"version": 1}
    assert [(e.action, e.target) for e in reg.history("billing").events][-1] == (
        "version.archive",
        "billing@v1",
    )

    # What later revisions added is there from the revision that had it, and empty before.
    keys = {k.name: k for k in reg.api_keys()}
    if int(revision) >= 2:
        assert set(keys) == {"ci-bot", "old-bot"}
        assert keys["ci-bot"].adapters == ["support"] and keys["ci-bot"].revoked_at is None
        assert keys["old-bot"].adapters is None and keys["old-bot"].revoked_at is not None
        if int(revision) < 6:  # keys from before scopes keep what they could do, flagged as given
            assert all(k.scopes == ["base", "versions"] and k.scopes_migrated for k in keys.values())
        else:
            assert keys["ci-bot"].scopes == ["versions"] and not keys["ci-bot"].scopes_migrated
        limits = {name: (k.rpm, k.tpm, k.max_concurrency) for name, k in keys.items()}
        if int(revision) >= 7:
            assert limits == {"ci-bot": (60, None, 4), "old-bot": (None, None, None)}
        else:
            assert set(limits.values()) == {(None, None, None)}
    else:
        assert keys == {}
    evaluations = reg.evaluations("support")
    if int(revision) >= 4:
        assert [(e.version, e.production_version, e.dataset, e.split) for e in evaluations] == [
            (3, 2, "tickets@v1", "test")
        ]
        assert evaluations[0].report == json.loads(json.dumps(passing_report("support", 3, production=2)))
        assert evaluations[0].page_digest is None  # pages are stored from 0009 on
        actions = [e.action for e in reg.history("support").events]
        assert actions[-1] == ("rollout.abort" if int(revision) >= 8 else "version.evaluate")
    else:
        assert evaluations == []
    drifts = reg.drift_history("support")
    if int(revision) >= 8:
        assert [(d.version, d.report["verdict"], d.page_digest) for d in drifts] == [(2, "watch", None)]
        assert reg.drift_reports()["support@v2"].report["figures"] == {"refusal_rate": 0.06}
    else:
        assert drifts == [] and reg.drift_reports() == {}

    # Rollouts (0008): an ended one of 0008's code reads back whole, with what each gateway counted.
    old_rollouts = reg.rollouts("support")
    if int(revision) >= 8:
        (ended,) = old_rollouts
        assert (ended.candidate, ended.baseline, ended.state, ended.step, ended.seq) == (
            3,
            2,
            "aborted",
            1,
            3,
        )
        assert [str(step) for step in ended.steps] == ["shadow 10%", "canary 25%"]
        assert [(d.action, d.actor, d.reason) for d in ended.decisions] == [
            ("start", "bob", None),
            ("advance", "bob", "pass"),
            ("abort", "bob", "ops"),
        ]
        assert ended.ended_at is not None and reg.rollouts() == []  # none active
        tallies = reg.tallies(ended)  # step 1, summed over the two gateways
        assert (tallies["candidate"].requests, tallies["candidate"].negative) == (12, 2)
        assert (tallies["production"].requests, tallies["shadow"].requests) == (12, 0)
        assert sum(tallies["candidate"].latency) == 24
    else:
        assert old_rollouts == []

    # Write: a gated promote reads the old evaluation (or refuses without one), rollback walks the old moves,
    # archive, and new rows get fresh ids (PostgreSQL's sequences survived the raw inserts).
    if int(revision) >= 4:
        moved = reg.promote("support", 3)
    else:
        with pytest.raises(GateRefusedError):
            reg.promote("support", 3)
        moved = reg.promote("support", 3, force=True, reason="no eval before 0004")
    assert (moved.from_version, moved.to_version, moved.revision) == (2, 3, last + 1)
    assert reg.rollback("support").to_version == 2
    assert reg.archive("support", 1).status == "archived"
    v4 = reg.register("support", make_adapter(tmp_path / "new", seed=99), base_model=world.base_id)
    assert v4.version == 4
    added_key = reg.add_api_key(name="after-upgrade", prefix="lf-aftr", key_hash="f" * 64, adapters=None)
    assert added_key.scopes == [] and not added_key.scopes_migrated  # new keys: least privilege
    added = reg.record_evaluation(
        "support",
        4,
        dataset="tickets@v1",
        split="test",
        split_digest="f" * 64,
        production_version=2,
        report=passing_report("support", 4, production=2),
    )
    assert added.id == len(evaluations) + 1
    assert reg.get("support").aliases == {"production": 2, "staging": 3}
    assert reg.revision() == last + 6

    # A rollout starts on the upgraded rows: v4's report is against production v2.
    assert reg.rollouts() == []
    rollout = reg.start_rollout("support", 4)
    assert (rollout.baseline, rollout.candidate, rollout.id) == (2, 4, len(old_rollouts) + 1)
    with pytest.raises(ConflictError, match=f"in rollout #{rollout.id}"):
        reg.rollback("support")
    assert reg.abort_rollout("support").state == "aborted"
    assert reg.revision() == last + 8

    # Reviews and report pages (0009) start empty and work on the upgraded rows.
    assert reg.reviews("support") == [] and reg.pairwise_votes("evaluation", added.id) == []
    sampled = served_record(
        T0, adapter="support", version=2, prompt="Where is my order?", answer="It ships today."
    )
    (written,) = write_traffic(reg.traffic, "requests", [sampled], redactor)
    review = reg.add_review(
        written["request_id"],
        reviewer="dana",
        redactor=redactor,
        rating=-1,
        correction="It ships tomorrow.",
        categories=["wrong_field"],
    )
    assert (review.id, review.version, review.correction, review.revision) == (
        1,
        2,
        "It ships tomorrow.",
        last + 9,
    )
    page = "<!DOCTYPE html><html><body><h1>Evaluation of support@v4</h1></body></html>"
    paged = reg.record_evaluation(
        "support",
        4,
        dataset="tickets@v1",
        split="test",
        split_digest="f" * 64,
        production_version=2,
        report=passing_report("support", 4, production=2),
        page=page,
    )
    assert paged.id == added.id + 1 and paged.page_digest is not None and reg.page(paged.page_digest) == page
    vote = reg.add_pairwise_vote(
        "support",
        source="evaluation",
        source_id=paged.id,
        item="0",
        candidate=4,
        baseline="production",
        choice="candidate",
        reviewer="dana",
    )
    assert vote.id == 1 and reg.pairwise_votes("evaluation", paged.id) == [vote]
    assert [e.action for e in reg.history("support").events[-3:]] == [
        "review.add",
        "version.evaluate",
        "review.pairwise",
    ]
    assert reg.revision() == last + 11
