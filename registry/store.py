"""The registry's metadata store: SQLModel over SQLite or PostgreSQL.

Every mutation goes through :meth:`MetadataStore._write`, one transaction that
starts by bumping the registry revision. That first UPDATE takes the
registry-wide write lock, so everything after it in the transaction reads the
latest committed state and concurrent writers run one after the other. Rows are
converted to ``registry.domain`` objects before they leave this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from loraflow.registry import domain
from loraflow.registry.drift import Profile
from loraflow.registry.errors import ConflictError, InvalidAdapterError, InvalidArgumentError, NotFoundError
from loraflow.registry.models import (
    Adapter,
    AdapterVersion,
    Alias,
    AliasMove,
    ApiKey,
    AuditEvent,
    DatasetRow,
    DatasetVersionRow,
    DriftReport,
    Evaluation,
    PairwiseVote,
    RateLease,
    RegistryState,
    Review,
    Rollout,
    RolloutTally,
    SlotLease,
    utcnow,
)
from loraflow.registry.refs import DEFAULT_ALIAS, parse_ref, version_ref
from loraflow.registry.scopes import Scope


def _next_version(
    s: Session,
    table: type[AdapterVersion] | type[DatasetVersionRow],
    owner: Any,
    *,
    digest: str,
    already: Callable[[int], ConflictError],
) -> int:
    """The number the next version of an adapter or dataset gets (``owner`` selects its versions):
    one past the highest. A version holding exactly ``digest`` already is ``already(its number)``,
    raised: versions are immutable and content-addressed, so the same files are never a new one.
    Runs inside the write transaction, whose revision bump serializes writers."""
    same = s.exec(select(table.version).where(owner, table.digest == digest)).first()
    if same is not None:
        raise already(same)
    latest = s.exec(select(func.max(table.version)).where(owner)).one()
    return (latest or 0) + 1


def _pk(row: Adapter | DatasetRow) -> int:
    if row.id is None:  # only before flush; every caller flushes first
        raise RuntimeError(f"{type(row).__name__} has no primary key yet")
    return row.id


# A write that lost to a concurrent one, by the driver's code (never its message): SQLite's
# SQLITE_BUSY and SQLITE_LOCKED (primary codes: the low byte of an extended one), PostgreSQL's
# serialization_failure, deadlock_detected and lock_not_available.
SQLITE_BUSY_CODES = frozenset({5, 6})
POSTGRES_BUSY_STATES = frozenset({"40001", "40P01", "55P03"})


def busy(error: BaseException | None) -> bool:
    """Whether a driver error means "try again": the registry was busy with another change."""
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in SQLITE_BUSY_CODES
    return getattr(error, "sqlstate", None) in POSTGRES_BUSY_STATES


@contextmanager
def _transaction(engine: Engine) -> Iterator[Session]:
    """A session committed at the end and rolled back on any error. A write that lost to a
    concurrent one is a :class:`ConflictError`, told by the driver's error code (:func:`busy`)."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            if busy(exc.orig):
                raise ConflictError("the registry is busy with another change; try again") from exc
            raise
        except BaseException:
            session.rollback()
            raise


@dataclass
class _Tx:
    session: Session
    revision: int
    actor: str

    def audit(
        self,
        action: str,
        kind: domain.SubjectKind,
        subject: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        before: Any = None,
        after: Any = None,
    ) -> None:
        self.session.add(
            AuditEvent(
                revision=self.revision,
                actor=self.actor,
                action=action,
                subject_kind=kind,
                subject=subject,
                version=version,
                alias=alias,
                before=before,
                after=after,
            )
        )


@dataclass(frozen=True)
class NewVersion:
    """Everything recorded about a version at registration (the registry assigns the number)."""

    digest: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    dataset: str | None = None  # "NAME@vN"
    training_config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    eval_report: dict[str, Any] | None = None
    chat_template_hash: str | None = None


class MetadataStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- transactions ------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def _write(self, actor: str) -> Iterator[_Tx]:
        try:
            with _transaction(self.engine) as session:
                session.execute(update(RegistryState).values(revision=col(RegistryState.revision) + 1))
                revision = session.exec(select(RegistryState.revision)).one()
                yield _Tx(session=session, revision=revision, actor=actor)
        except SAIntegrityError as exc:
            raise ConflictError(
                f"a concurrent change conflicted with this one; nothing was changed ({exc.orig})"
            ) from exc

    def revision(self) -> int:
        with self._read() as s:
            return s.exec(select(RegistryState.revision)).one()

    # -- lookups -----------------------------------------------------------------
    @staticmethod
    def _alias_row(s: Session, adapter: Adapter, alias: str) -> Alias:
        row = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias)).first()
        if row is None:
            have = s.exec(select(Alias.name).where(Alias.adapter_id == adapter.id)).all()
            raise NotFoundError(
                f"{adapter.name} has no alias {alias!r}; aliases: {', '.join(sorted(have)) or 'none'}",
                param="alias",
            )
        return row

    @staticmethod
    def _adapter_row(s: Session, name: str) -> Adapter:
        row = s.exec(select(Adapter).where(Adapter.name == name)).first()
        if row is None:
            names = s.exec(select(Adapter.name).order_by(Adapter.name).limit(21)).all()
            known = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
            raise NotFoundError(
                f"no adapter named {name!r}"
                + (f"; adapters: {known}" if names else "; the registry is empty"),
                param="name",
            )
        return row

    @staticmethod
    def _version_row(s: Session, adapter: Adapter, version: int) -> AdapterVersion:
        row = s.exec(
            select(AdapterVersion).where(
                AdapterVersion.adapter_id == adapter.id, AdapterVersion.version == version
            )
        ).first()
        if row is None:
            versions = s.exec(
                select(AdapterVersion.version)
                .where(AdapterVersion.adapter_id == adapter.id)
                .order_by(col(AdapterVersion.version))
            ).all()
            have = ", ".join(f"v{v}" for v in versions) or "none"
            raise NotFoundError(
                f"{adapter.name} has no version v{version}; versions: {have}", param="version"
            )
        return row

    @staticmethod
    def _dataset_ref(s: Session, dataset_version_id: int | None) -> str | None:
        if dataset_version_id is None:
            return None
        dv = s.get(DatasetVersionRow, dataset_version_id)
        ds = s.get(DatasetRow, dv.dataset_id) if dv else None
        return version_ref(ds.name, dv.version) if dv and ds else None

    def _version_info(self, s: Session, adapter: Adapter, row: AdapterVersion) -> domain.VersionInfo:
        return row.to_domain(adapter=adapter.name, dataset=self._dataset_ref(s, row.dataset_version_id))

    def _adapter_info(self, s: Session, adapter: Adapter) -> domain.AdapterInfo:
        versions = s.exec(
            select(AdapterVersion)
            .where(AdapterVersion.adapter_id == adapter.id)
            .order_by(col(AdapterVersion.version))
        ).all()
        aliases = s.exec(select(Alias).where(Alias.adapter_id == adapter.id).order_by(col(Alias.name))).all()
        return adapter.to_domain(
            aliases={a.name: a.version for a in aliases},
            versions=[self._version_info(s, adapter, v) for v in versions],
        )

    def list_adapters(self) -> list[domain.AdapterInfo]:
        with self._read() as s:
            return [
                self._adapter_info(s, a) for a in s.exec(select(Adapter).order_by(col(Adapter.name))).all()
            ]

    def get_adapter(self, name: str) -> domain.AdapterInfo:
        with self._read() as s:
            return self._adapter_info(s, self._adapter_row(s, name))

    def find_adapter(self, name: str) -> domain.AdapterInfo | None:
        with self._read() as s:
            row = s.exec(select(Adapter).where(Adapter.name == name)).first()
            return self._adapter_info(s, row) if row else None

    def get_version(self, name: str, version: int) -> domain.VersionInfo:
        with self._read() as s:
            adapter = self._adapter_row(s, name)
            return self._version_info(s, adapter, self._version_row(s, adapter, version))

    def get_alias(self, name: str, alias: str) -> domain.VersionInfo:
        with self._read() as s:
            adapter = self._adapter_row(s, name)
            row = self._alias_row(s, adapter, alias)
            return self._version_info(s, adapter, self._version_row(s, adapter, row.version))

    def history(self, name: str) -> domain.History:
        with self._read() as s:
            adapter = self._adapter_row(s, name)
            moves = s.exec(
                select(AliasMove).where(AliasMove.adapter_id == adapter.id).order_by(col(AliasMove.revision))
            ).all()
            events = s.exec(
                select(AuditEvent)
                .where(AuditEvent.subject_kind == "adapter", AuditEvent.subject == name)
                .order_by(col(AuditEvent.revision), col(AuditEvent.id))
            ).all()
            return domain.History(
                adapter=name,
                moves=[m.to_domain(adapter=name) for m in moves],
                events=[e.to_domain() for e in events],
            )

    # -- mutations ---------------------------------------------------------------
    def register_version(
        self,
        *,
        name: str,
        base_model: str,
        base_model_fingerprint: str,
        task: str | None,
        new: NewVersion,
        actor: str,
    ) -> domain.VersionInfo:
        with self._write(actor) as tx:
            s = tx.session
            adapter = s.exec(select(Adapter).where(Adapter.name == name)).first()
            if adapter is None:
                adapter = Adapter(
                    name=name,
                    base_model=base_model,
                    base_model_fingerprint=base_model_fingerprint,
                    task=task,
                    created_by=actor,
                )
                s.add(adapter)
                s.flush()
                tx.audit(
                    "adapter.create",
                    "adapter",
                    name,
                    after={"base_model": base_model, "base_model_fingerprint": base_model_fingerprint},
                )
            elif adapter.base_model_fingerprint != base_model_fingerprint:
                raise InvalidAdapterError(
                    f"{name} is registered on base model {adapter.base_model} "
                    f"(fingerprint {adapter.base_model_fingerprint[:12]}); {base_model} has fingerprint "
                    f"{base_model_fingerprint[:12]}. Register it under a new adapter name instead",
                    param="base",
                )
            version = _next_version(
                s,
                AdapterVersion,
                AdapterVersion.adapter_id == _pk(adapter),
                digest=new.digest,
                already=lambda same: ConflictError(
                    f"{version_ref(name, same)} already holds these exact files (digest {new.digest[:12]}); "
                    "nothing was registered",
                    param="dir",
                ),
            )
            dataset_version_id = self._dataset_version_id(s, new.dataset) if new.dataset else None
            row = AdapterVersion(
                adapter_id=_pk(adapter),
                version=version,
                digest=new.digest,
                rank=new.rank,
                alpha=new.alpha,
                target_modules=new.target_modules,
                size_bytes=new.size_bytes,
                dataset_version_id=dataset_version_id,
                training_config=new.training_config,
                metrics=new.metrics,
                eval_report=new.eval_report,
                chat_template_hash=new.chat_template_hash,
                created_by=actor,
            )
            s.add(row)
            s.flush()
            tx.audit(
                "version.register",
                "adapter",
                name,
                version=row.version,
                after={"digest": new.digest, "dataset": new.dataset, "rank": new.rank},
            )
            return self._version_info(s, adapter, row)

    def set_alias(
        self,
        *,
        name: str,
        alias: str,
        version: int,
        expect: domain.AliasExpect,
        actor: str,
        note: dict[str, Any] | None = None,
    ) -> domain.AliasMoveInfo:
        """Move ``alias`` to ``version`` if it still satisfies ``expect`` (a version, ``AliasState.UNSET``
        for a first promotion, or ``AliasState.ANY``). ``note`` (the gate's decision, a forced
        promotion's reason) goes into the audit event."""
        with self._write(actor) as tx:
            adapter = self._adapter_row(tx.session, name)
            self._refuse_during_rollout(tx.session, adapter, f"moving {name}:{alias}")
            return self._move_alias(tx, adapter, alias, version, expect=expect, reason="promote", note=note)

    def rollback_alias(self, *, name: str, alias: str, actor: str) -> domain.AliasMoveInfo:
        """Move an alias to the version it pointed at before its last move *forward*.

        Each rollback undoes one forward move (a ``promote``) that no earlier rollback undid, so
        repeated rollbacks walk back through history: v1 -> v2 -> v3, rollback -> v2, rollback
        -> v1, rollback -> nothing to roll back to. The walk stops where the alias was created.
        """
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            self._refuse_during_rollout(s, adapter, f"rolling back {name}:{alias}")
            row = self._alias_row(s, adapter, alias)
            moves = s.exec(
                select(AliasMove)
                .where(AliasMove.adapter_id == adapter.id, AliasMove.alias == alias)
                .order_by(col(AliasMove.revision).desc(), col(AliasMove.id).desc())
            ).all()
            undone = 0  # forward moves already undone by the rollbacks seen so far (newest first)
            rolled_back = False
            target: int | None = None
            for move in moves:
                if move.reason == "rollback":
                    undone, rolled_back = undone + 1, True
                elif undone:
                    undone -= 1
                else:
                    target = move.from_version
                    break
            if target is None:
                why = (
                    "every promotion since it was created has been rolled back"
                    if rolled_back
                    else "it has not moved since it was created"
                )
                raise ConflictError(
                    f"{name}:{alias} points at v{row.version} and {why}; there is nothing to roll back to",
                    param="alias",
                )
            return self._move_alias(tx, adapter, alias, target, expect=row.version, reason="rollback")

    def delete_alias(self, *, name: str, alias: str, actor: str) -> int:
        """Remove an alias (its moves stay in the history); the version it pointed at."""
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            self._refuse_during_rollout(s, adapter, f"deleting {name}:{alias}")
            row = self._alias_row(s, adapter, alias)
            version = row.version
            s.delete(row)
            tx.audit("alias.delete", "adapter", name, alias=alias, before={"version": version}, after=None)
            s.flush()
            return version

    def _move_alias(
        self,
        tx: _Tx,
        adapter: Adapter,
        alias: str,
        version: int,
        *,
        expect: domain.AliasExpect,
        reason: str,
        note: dict[str, Any] | None = None,
    ) -> domain.AliasMoveInfo:
        s, name = tx.session, adapter.name
        target = self._version_row(s, adapter, version)
        if target.status == "archived":
            raise ConflictError(
                f"{version_ref(name, version)} is archived; it cannot be served", param="version"
            )
        row = s.exec(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias)).first()
        current = row.version if row else None
        if expect is not domain.AliasState.ANY and current != (
            None if expect is domain.AliasState.UNSET else expect
        ):
            now = f"v{current}" if current is not None else "nothing"
            wanted = "nothing" if expect is domain.AliasState.UNSET else f"v{expect}"
            raise ConflictError(
                f"{name}:{alias} points at {now}, not {wanted}; someone moved it first. Nothing was changed",
                param="expect",
            )
        if current == version:
            raise ConflictError(f"{name}:{alias} already points at v{version}", param="version")
        if row is None:
            row = Alias(adapter_id=_pk(adapter), name=alias, version=version)
        else:
            row.version, row.updated_at = version, utcnow()
        s.add(row)
        move = AliasMove(
            adapter_id=_pk(adapter),
            alias=alias,
            from_version=current,
            to_version=version,
            reason=reason,
            revision=tx.revision,
            actor=tx.actor,
        )
        s.add(move)
        tx.audit(
            f"alias.{reason}",
            "adapter",
            name,
            alias=alias,
            before={"version": current} if current is not None else None,
            after={"version": version} | (note or {}),
        )
        s.flush()
        return move.to_domain(adapter=name)

    def archive(self, *, name: str, version: int, actor: str) -> domain.VersionInfo:
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            self._refuse_during_rollout(s, adapter, f"archiving {version_ref(name, version)}")
            row = self._version_row(s, adapter, version)
            pointing = s.exec(
                select(Alias.name).where(Alias.adapter_id == adapter.id, Alias.version == version)
            ).all()
            if pointing:
                raise ConflictError(
                    f"{version_ref(name, version)} is pointed at by {', '.join(sorted(pointing))}; "
                    "promote another version first",
                    param="version",
                )
            if row.status == "archived":
                raise ConflictError(f"{version_ref(name, version)} is already archived", param="version")
            row.status = "archived"
            s.add(row)
            tx.audit(
                "version.archive",
                "adapter",
                name,
                version=version,
                before={"status": "registered"},
                after={"status": "archived"},
            )
            s.flush()
            return self._version_info(s, adapter, row)

    # -- rollouts ----------------------------------------------------------------
    @staticmethod
    def _active_rollout_row(s: Session, adapter: Adapter) -> Rollout | None:
        return s.exec(
            select(Rollout).where(
                Rollout.adapter_id == adapter.id, col(Rollout.state).in_(domain.ACTIVE_ROLLOUT_STATES)
            )
        ).first()

    def _refuse_during_rollout(self, s: Session, adapter: Adapter, what: str) -> None:
        """Aliases and versions of an adapter in rollout belong to the rollout until it ends."""
        row = self._active_rollout_row(s, adapter)
        if row is not None:
            info = row.to_domain(adapter=adapter.name)
            raise ConflictError(
                f"{what} is refused: {adapter.name} is in rollout #{info.id} ({info.baseline_ref} -> "
                f"{info.candidate_ref}, {info.state}); end it first with "
                f"`adapters rollout abort {adapter.name}`. Nothing was changed",
                param="name",
            )

    def _rollout_row(self, s: Session, adapter: Adapter, *, expect_seq: int | None) -> Rollout:
        """The adapter's active rollout; with ``expect_seq``, only if nothing changed it since."""
        row = self._active_rollout_row(s, adapter)
        if row is None:
            raise NotFoundError(f"{adapter.name} has no rollout running or paused", param="name")
        if expect_seq is not None and row.seq != expect_seq:
            raise ConflictError(
                f"rollout #{row.id} of {adapter.name} changed since it was read (change {row.seq}, "
                f"not {expect_seq}); someone else acted first. Nothing was changed",
                param="expect",
            )
        return row

    def start_rollout(
        self,
        *,
        name: str,
        candidate: int,
        policy: str,
        steps: list[domain.RolloutStep],
        actor: str,
        note: dict[str, Any] | None = None,
    ) -> domain.RolloutInfo:
        """Start rolling ``candidate`` out from the production version, at ``steps[0]``. Refused
        while another rollout of the adapter is active, without a production version, or for the
        version production already serves."""
        if not steps:
            raise InvalidArgumentError("a rollout needs at least one step", param="steps")
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            running = self._active_rollout_row(s, adapter)
            if running is not None:
                raise ConflictError(
                    f"{name} is already in rollout #{running.id} (v{running.baseline} -> "
                    f"v{running.candidate}, {running.state}); end it first with "
                    f"`adapters rollout abort {name}`",
                    param="name",
                )
            production = s.exec(
                select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == DEFAULT_ALIAS)
            ).first()
            if production is None:
                raise ConflictError(
                    f"{name} has no {DEFAULT_ALIAS} version to compare {version_ref(name, candidate)} "
                    f"with; a first version is promoted (`adapters promote {version_ref(name, candidate)}`)",
                    param="version",
                )
            target = self._version_row(s, adapter, candidate)
            if target.status == "archived":
                raise ConflictError(f"{version_ref(name, candidate)} is archived; it cannot be served")
            if production.version == candidate:
                raise ConflictError(f"{name}:{DEFAULT_ALIAS} already points at v{candidate}", param="version")
            now = utcnow()
            row = Rollout(
                adapter_id=_pk(adapter),
                candidate=candidate,
                baseline=production.version,
                policy=policy,
                steps=[step.model_dump() for step in steps],
                state="running",
                decisions=[],
                started_at=now,
                step_started_at=now,
                created_by=actor,
            )
            self._decide(tx, row, adapter, "start", figures=note)
            return row.to_domain(adapter=name)

    def _decide(
        self,
        tx: _Tx,
        row: Rollout,
        adapter: Adapter,
        action: str,
        *,
        reason: str | None = None,
        figures: dict[str, Any] | None = None,
    ) -> None:
        """Record one change of a rollout: its decision (in the row and the audit log), ``seq`` + 1."""
        decision = domain.RolloutDecision(
            at=utcnow(), action=action, actor=tx.actor, step=row.step, reason=reason, figures=figures
        )
        row.decisions = [*row.decisions, decision.model_dump(mode="json")]
        row.seq += 1
        tx.session.add(row)
        tx.session.flush()
        tx.audit(
            f"rollout.{action}",
            "adapter",
            adapter.name,
            version=row.candidate,
            after={
                "rollout": row.id,
                "state": row.state,
                "step": row.step,
                "weights": row.steps[row.step],
                "baseline": row.baseline,
                "reason": reason,
                "figures": figures,
            },
        )

    def active_rollouts(self) -> list[domain.RolloutInfo]:
        """Every running or paused rollout (what gateways route by)."""
        with self._read() as s:
            rows = s.exec(
                select(Rollout, Adapter)
                .join(Adapter, col(Adapter.id) == col(Rollout.adapter_id))
                .where(col(Rollout.state).in_(domain.ACTIVE_ROLLOUT_STATES))
                .order_by(col(Rollout.id))
            ).all()
            return [row.to_domain(adapter=adapter.name) for row, adapter in rows]

    def rollouts(self, name: str) -> list[domain.RolloutInfo]:
        """Every rollout of an adapter, oldest first."""
        with self._read() as s:
            adapter = self._adapter_row(s, name)
            rows = s.exec(select(Rollout).where(Rollout.adapter_id == adapter.id).order_by(col(Rollout.id)))
            return [row.to_domain(adapter=name) for row in rows.all()]

    def advance_rollout(
        self,
        *,
        name: str,
        expect_seq: int | None,
        actor: str,
        reason: str | None = None,
        figures: dict[str, Any] | None = None,
    ) -> domain.RolloutInfo:
        """The current step passed: go to the next one, or, from a last step at canary 100%,
        succeed (production moves to the candidate, compare-and-swap on the baseline, in the
        same transaction). A last step below 100% holds: ConflictError."""
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            row = self._rollout_row(s, adapter, expect_seq=expect_seq)
            if row.state != "running":
                raise ConflictError(f"rollout #{row.id} of {name} is {row.state}", param="name")
            if row.step + 1 < len(row.steps):
                row.step += 1
                row.step_started_at = utcnow()
                self._decide(tx, row, adapter, "advance", reason=reason, figures=figures)
            elif row.steps[row.step].get("canary") == 100:
                self._move_alias(
                    tx,
                    adapter,
                    DEFAULT_ALIAS,
                    row.candidate,
                    expect=row.baseline,
                    reason="promote",
                    note={"rollout": row.id, "figures": figures},
                )
                row.state, row.ended_at = "succeeded", utcnow()
                self._decide(tx, row, adapter, "succeed", reason=reason, figures=figures)
            else:
                raise ConflictError(
                    f"rollout #{row.id} of {name} is held at its last step "
                    f"({domain.RolloutStep.model_validate(row.steps[row.step])}); "
                    f"`adapters rollout resume {name} --to 100` takes it further",
                    param="to",
                )
            return row.to_domain(adapter=name)

    def end_rollout(
        self,
        *,
        name: str,
        state: domain.RolloutState,
        expect_seq: int | None,
        actor: str,
        reason: str | None = None,
        figures: dict[str, Any] | None = None,
    ) -> domain.RolloutInfo:
        """End the active rollout with production unchanged: ``rolled_back`` (the guards said
        so) or ``aborted`` (an operator did)."""
        if state not in ("rolled_back", "aborted"):
            raise InvalidArgumentError(f"a rollout ends rolled_back or aborted, not {state!r}", param="state")
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            row = self._rollout_row(s, adapter, expect_seq=expect_seq)
            row.state, row.ended_at = state, utcnow()
            row.controller, row.lease_until = None, None
            self._decide(
                tx,
                row,
                adapter,
                "rollback" if state == "rolled_back" else "abort",
                reason=reason,
                figures=figures,
            )
            return row.to_domain(adapter=name)

    def pause_rollout(self, *, name: str, expect_seq: int | None, actor: str) -> domain.RolloutInfo:
        """Hold the rollout where it is: the weights stay, nothing advances or rolls back on its own."""
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            row = self._rollout_row(s, adapter, expect_seq=expect_seq)
            if row.state == "paused":
                raise ConflictError(f"rollout #{row.id} of {name} is already paused", param="name")
            row.state = "paused"
            self._decide(tx, row, adapter, "pause")
            return row.to_domain(adapter=name)

    def resume_rollout(
        self, *, name: str, to: float | None, expect_seq: int | None, actor: str
    ) -> domain.RolloutInfo:
        """Let the rollout decide on its own again; ``to`` (a canary percent above the last step's)
        adds a step it may advance to when the current one passes."""
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            row = self._rollout_row(s, adapter, expect_seq=expect_seq)
            if to is not None:
                top = max(float(step.get("canary") or 0) for step in row.steps)
                if to <= top:
                    raise InvalidArgumentError(
                        f"--to {to:g}: the rollout already goes to canary {top:g}%; give a higher percent",
                        param="to",
                    )
                row.steps = [*row.steps, domain.RolloutStep(canary=to).model_dump()]
            elif row.state == "running":
                raise ConflictError(
                    f"rollout #{row.id} of {name} is running; --to PCT takes it further", param="name"
                )
            row.state = "running"
            self._decide(tx, row, adapter, "resume", figures={"to": to} if to is not None else None)
            return row.to_domain(adapter=name)

    def claim_rollout(self, *, rollout_id: int, holder: str, ttl_s: float) -> bool:
        """Take or renew the controller lease of an active rollout: granted when nobody holds it,
        ``holder`` does, or the holder's lease ran out. One conditional UPDATE, so two gateways
        never both hold it. Moves no routing: the revision stays."""
        now = utcnow()
        with _transaction(self.engine) as s:
            moved = s.execute(
                update(Rollout)
                .where(
                    col(Rollout.id) == rollout_id,
                    col(Rollout.state).in_(domain.ACTIVE_ROLLOUT_STATES),
                    (col(Rollout.controller).is_(None))
                    | (col(Rollout.controller) == holder)
                    | (col(Rollout.lease_until) < now),
                )
                .values(controller=holder, lease_until=now + timedelta(seconds=ttl_s))
            )
            return bool(moved.rowcount == 1)  # type: ignore[attr-defined]

    def release_rollout(self, *, rollout_id: int, holder: str) -> None:
        """Give up ``holder``'s controller lease of a rollout, if it holds it (a gateway stopping)."""
        with _transaction(self.engine) as s:
            s.execute(
                update(Rollout)
                .where(col(Rollout.id) == rollout_id, col(Rollout.controller) == holder)
                .values(controller=None, lease_until=None)
            )

    def put_tallies(
        self, *, rollout_id: int, holder: str, step: int, counts: dict[str, dict[str, Any]]
    ) -> None:
        """Write what ``holder`` has counted so far in ``step``, per arm, over its earlier rows."""
        with _transaction(self.engine) as s:
            for arm, data in counts.items():
                row = s.get(RolloutTally, (rollout_id, holder, step, arm))
                if row is None:
                    row = RolloutTally(rollout_id=rollout_id, holder=holder, step=step, arm=arm, counts=data)
                else:
                    row.counts, row.updated_at = data, utcnow()
                s.add(row)

    def tallies(self, *, rollout_id: int, step: int) -> list[tuple[str, dict[str, Any]]]:
        """Every holder's (arm, counts) for one step of a rollout."""
        with self._read() as s:
            rows = s.exec(
                select(RolloutTally).where(RolloutTally.rollout_id == rollout_id, RolloutTally.step == step)
            ).all()
            return [(row.arm, row.counts) for row in rows]

    # -- evaluations -------------------------------------------------------------
    def add_evaluation(
        self,
        *,
        name: str,
        version: int,
        dataset: str | None,
        split: str,
        split_digest: str,
        production_version: int | None,
        report: dict[str, Any],
        actor: str,
        page_digest: str | None = None,
    ) -> domain.EvaluationInfo:
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            self._version_row(s, adapter, version)
            row = Evaluation(
                adapter_id=_pk(adapter),
                version=version,
                dataset_version_id=self._dataset_version_id(s, dataset) if dataset else None,
                split=split,
                split_digest=split_digest,
                production_version=production_version,
                report=report,
                page_digest=page_digest,
                revision=tx.revision,
                created_by=actor,
            )
            s.add(row)
            s.flush()
            tx.audit(
                "version.evaluate",
                "adapter",
                name,
                version=version,
                after={
                    "evaluation": row.id,
                    "dataset": dataset,
                    "split": split,
                    "split_digest": split_digest,
                    "production_version": production_version,
                },
            )
            return self._evaluation_info(s, adapter, row)

    def _evaluation_info(self, s: Session, adapter: Adapter, row: Evaluation) -> domain.EvaluationInfo:
        return row.to_domain(adapter=adapter.name, dataset=self._dataset_ref(s, row.dataset_version_id))

    def evaluations(self, name: str, version: int | None = None) -> list[domain.EvaluationInfo]:
        """Oldest first; of one version, or of every version of the adapter."""
        with self._read() as s:
            adapter = self._adapter_row(s, name)
            query = select(Evaluation).where(Evaluation.adapter_id == adapter.id)
            if version is not None:
                self._version_row(s, adapter, version)
                query = query.where(Evaluation.version == version)
            rows = s.exec(query.order_by(col(Evaluation.revision), col(Evaluation.id))).all()
            return [self._evaluation_info(s, adapter, r) for r in rows]

    # -- drift -------------------------------------------------------------------
    def add_drift_report(
        self,
        *,
        name: str,
        version: int,
        window_start: datetime,
        window_end: datetime,
        report: dict[str, Any],
        actor: str,
        page_digest: str | None = None,
    ) -> domain.DriftReportInfo:
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            self._version_row(s, adapter, version)
            row = DriftReport(
                adapter_id=_pk(adapter),
                version=version,
                window_start=window_start,
                window_end=window_end,
                report=report,
                page_digest=page_digest,
                revision=tx.revision,
                created_by=actor,
            )
            s.add(row)
            s.flush()
            tx.audit("version.drift", "adapter", name, version=version, after={"drift_report": row.id})
            return row.to_domain(adapter=adapter.name)

    def evaluation(self, evaluation_id: int) -> domain.EvaluationInfo:
        with self._read() as s:
            row = s.get(Evaluation, evaluation_id)
            if row is None:
                raise NotFoundError(f"no evaluation {evaluation_id}", param="evaluation")
            adapter = s.get(Adapter, row.adapter_id)
            if adapter is None:
                raise NotFoundError(f"no evaluation {evaluation_id}", param="evaluation")
            return self._evaluation_info(s, adapter, row)

    def drift_reports_of(self, name: str, version: int | None = None) -> list[domain.DriftReportInfo]:
        """Oldest first; of one version, or of every version of the adapter."""
        with self._read() as s:
            adapter = self._adapter_row(s, name)
            query = select(DriftReport).where(DriftReport.adapter_id == adapter.id)
            if version is not None:
                query = query.where(DriftReport.version == version)
            rows = s.exec(query.order_by(col(DriftReport.id))).all()
            return [r.to_domain(adapter=adapter.name) for r in rows]

    def drift_report(self, report_id: int) -> domain.DriftReportInfo:
        with self._read() as s:
            row = s.get(DriftReport, report_id)
            adapter = s.get(Adapter, row.adapter_id) if row is not None else None
            if row is None or adapter is None:
                raise NotFoundError(f"no drift report {report_id}", param="drift_report")
            return row.to_domain(adapter=adapter.name)

    # -- reviews -----------------------------------------------------------------
    def add_review(
        self,
        *,
        name: str,
        version: int,
        request_id: str,
        rating: int | None,
        correction: str | None,
        categories: list[str],
        actor: str,
    ) -> domain.ReviewInfo:
        """A review of one sampled request; audited as ``review.add`` (the correction's text is not
        copied into the audit log: the review row holds it)."""
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            self._version_row(s, adapter, version)
            row = Review(
                adapter_id=_pk(adapter),
                version=version,
                request_id=request_id,
                reviewer=actor,
                rating=rating,
                correction=correction,
                categories=categories,
                revision=tx.revision,
            )
            s.add(row)
            s.flush()
            tx.audit(
                "review.add",
                "adapter",
                name,
                version=version,
                after={
                    "review": row.id,
                    "request_id": request_id,
                    "rating": rating,
                    "corrected": correction is not None,
                    "categories": categories,
                },
            )
            return row.to_domain(adapter=adapter.name)

    def reviews(self, name: str, version: int | None = None) -> list[domain.ReviewInfo]:
        """Every review of an adapter's requests (of one version, if given), oldest first."""
        with self._read() as s:
            adapter = self._adapter_row(s, name)
            query = select(Review).where(Review.adapter_id == adapter.id)
            if version is not None:
                query = query.where(Review.version == version)
            rows = s.exec(query.order_by(col(Review.id))).all()
            return [r.to_domain(adapter=adapter.name) for r in rows]

    def add_pairwise_vote(
        self,
        *,
        name: str,
        source: domain.PairwiseSource,
        source_id: int,
        item: str,
        candidate: int,
        baseline: str,
        choice: domain.PairwiseChoice,
        actor: str,
    ) -> domain.PairwiseVoteInfo:
        """One reviewer's blind judgement of one item; a second vote on the same item by the same
        reviewer is a ConflictError (the unique key), audited as ``review.pairwise``."""
        with self._write(actor) as tx:
            s = tx.session
            adapter = self._adapter_row(s, name)
            taken = s.exec(
                select(PairwiseVote.id).where(
                    PairwiseVote.source == source,
                    PairwiseVote.source_id == source_id,
                    PairwiseVote.item == item,
                    PairwiseVote.reviewer == actor,
                )
            ).first()
            if taken is not None:
                raise ConflictError(f"{actor} has already judged item {item} of this {source}", param="item")
            row = PairwiseVote(
                adapter_id=_pk(adapter),
                source=source,
                source_id=source_id,
                item=item,
                candidate=candidate,
                baseline=baseline,
                choice=choice,
                reviewer=actor,
                revision=tx.revision,
            )
            s.add(row)
            s.flush()
            tx.audit(
                "review.pairwise",
                "adapter",
                name,
                version=candidate,
                after={
                    "vote": row.id,
                    "source": source,
                    "source_id": source_id,
                    "item": item,
                    "choice": choice,
                },
            )
            return row.to_domain(adapter=adapter.name)

    def pairwise_votes(
        self, *, source: domain.PairwiseSource, source_id: int
    ) -> list[domain.PairwiseVoteInfo]:
        with self._read() as s:
            rows = s.exec(
                select(PairwiseVote, Adapter)
                .join(Adapter, col(Adapter.id) == col(PairwiseVote.adapter_id))
                .where(PairwiseVote.source == source, PairwiseVote.source_id == source_id)
                .order_by(col(PairwiseVote.id))
            ).all()
            return [row.to_domain(adapter=adapter.name) for row, adapter in rows]

    def latest_drift_reports(self) -> dict[str, domain.DriftReportInfo]:
        """The latest drift report of every version that has one, by ``NAME@vN``."""
        with self._read() as s:
            latest = (
                select(func.max(DriftReport.id))
                .group_by(col(DriftReport.adapter_id), col(DriftReport.version))
                .scalar_subquery()
            )
            rows = s.exec(
                select(DriftReport, Adapter)
                .join(Adapter, col(Adapter.id) == col(DriftReport.adapter_id))
                .where(col(DriftReport.id).in_(latest))
            ).all()
            infos = [row.to_domain(adapter=adapter.name) for row, adapter in rows]
            return {info.ref: info for info in infos}

    # -- datasets ----------------------------------------------------------------
    @staticmethod
    def _dataset_version_id(s: Session, ref: str) -> int:
        parsed = parse_ref(ref, param="dataset")
        if parsed.version is None:
            raise InvalidArgumentError(f"a dataset version is written NAME@vN, not {ref!r}", param="dataset")
        row = s.exec(
            select(DatasetVersionRow)
            .join(DatasetRow, col(DatasetRow.id) == col(DatasetVersionRow.dataset_id))
            .where(DatasetRow.name == parsed.name, DatasetVersionRow.version == parsed.version)
        ).first()
        if row is None or row.id is None:
            raise NotFoundError(f"no dataset version {ref}", param="dataset")
        return row.id

    def register_dataset_version(
        self,
        *,
        name: str,
        digest: str,
        counts: dict[str, int],
        lineage: dict[str, Any],
        profile: Profile | None,
        actor: str,
        description: str | None = None,
    ) -> domain.DatasetVersionInfo:
        with self._write(actor) as tx:
            s = tx.session
            ds = s.exec(select(DatasetRow).where(DatasetRow.name == name)).first()
            if ds is None:
                ds = DatasetRow(name=name, description=description, created_by=actor)
                s.add(ds)
                s.flush()
            version = _next_version(
                s,
                DatasetVersionRow,
                DatasetVersionRow.dataset_id == _pk(ds),
                digest=digest,
                already=lambda same: ConflictError(
                    f"dataset {version_ref(name, same)} already holds these exact splits "
                    f"(digest {digest[:12]}); nothing was registered",
                    param="FILE",
                ),
            )
            row = DatasetVersionRow(
                dataset_id=_pk(ds),
                version=version,
                digest=digest,
                counts=counts,
                lineage=lineage,
                profile=profile.to_json() if profile else None,
                created_by=actor,
            )
            s.add(row)
            s.flush()
            tx.audit(
                "dataset.register",
                "dataset",
                name,
                version=row.version,
                after={"digest": digest, "counts": counts},
            )
            return row.to_domain(name=ds.name)

    def find_dataset_version(self, name: str, digest: str) -> domain.DatasetVersionInfo | None:
        """The version of dataset ``name`` holding exactly the splits ``digest``, if there is one."""
        with self._read() as s:
            found = s.exec(
                select(DatasetRow, DatasetVersionRow)
                .join(DatasetVersionRow, col(DatasetVersionRow.dataset_id) == col(DatasetRow.id))
                .where(DatasetRow.name == name, DatasetVersionRow.digest == digest)
            ).first()
            return found[1].to_domain(name=found[0].name) if found else None

    def list_dataset_versions(self, name: str | None = None) -> list[domain.DatasetVersionInfo]:
        """Every dataset version (or every version of ``name``), by name then version."""
        with self._read() as s:
            query = select(DatasetRow, DatasetVersionRow).join(
                DatasetVersionRow, col(DatasetVersionRow.dataset_id) == col(DatasetRow.id)
            )
            if name is not None:
                if s.exec(select(DatasetRow.id).where(DatasetRow.name == name)).first() is None:
                    have = s.exec(select(DatasetRow.name).order_by(col(DatasetRow.name))).all()
                    raise NotFoundError(
                        f"no dataset named {name!r}; datasets: {', '.join(have) or 'none'}", param="dataset"
                    )
                query = query.where(DatasetRow.name == name)
            rows = s.exec(query.order_by(col(DatasetRow.name), col(DatasetVersionRow.version))).all()
            return [row.to_domain(name=ds.name) for ds, row in rows]

    def get_dataset_version(self, name: str, version: int | None = None) -> domain.DatasetVersionInfo:
        with self._read() as s:
            ds = s.exec(select(DatasetRow).where(DatasetRow.name == name)).first()
            if ds is None:
                raise NotFoundError(f"no dataset named {name!r}", param="dataset")
            query = select(DatasetVersionRow).where(DatasetVersionRow.dataset_id == ds.id)
            if version is None:
                row = s.exec(query.order_by(col(DatasetVersionRow.version).desc())).first()
            else:
                row = s.exec(query.where(DatasetVersionRow.version == version)).first()
            if row is None:
                raise NotFoundError(
                    f"dataset {name} has no version {'v' + str(version) if version else ''}", param="dataset"
                )
            return row.to_domain(name=ds.name)

    # -- API keys ----------------------------------------------------------------
    def create_api_key(
        self,
        *,
        name: str,
        prefix: str,
        key_hash: str,
        adapters: list[str] | None,
        scopes: list[Scope],
        limits: domain.KeyLimits,
        actor: str,
    ) -> domain.ApiKeyInfo:
        with self._write(actor) as tx:
            s = tx.session
            if s.exec(select(ApiKey).where(ApiKey.name == name)).first() is not None:
                raise ConflictError(f"an API key named {name!r} exists already", param="name")
            row = ApiKey(
                name=name,
                prefix=prefix,
                key_hash=key_hash,
                adapters=adapters,
                scopes=list(scopes),
                rpm=limits.rpm,
                tpm=limits.tpm,
                max_concurrency=limits.max_concurrency,
                created_by=actor,
            )
            s.add(row)
            tx.audit(
                "key.create",
                "api_key",
                name,
                after={
                    "adapters": adapters,
                    "scopes": list(scopes),
                    "prefix": prefix,
                    **limits.model_dump(exclude_none=True),
                },
            )
            s.flush()
            return row.to_domain()

    def list_api_keys(self) -> list[domain.ApiKeyInfo]:
        with self._read() as s:
            return [r.to_domain() for r in s.exec(select(ApiKey).order_by(col(ApiKey.name))).all()]

    def revoke_api_key(self, *, name: str, actor: str) -> domain.ApiKeyInfo:
        with self._write(actor) as tx:
            s = tx.session
            row = s.exec(select(ApiKey).where(ApiKey.name == name)).first()
            if row is None:
                raise NotFoundError(f"no API key named {name!r}", param="name")
            if row.revoked_at is not None:
                raise ConflictError(f"API key {name!r} is already revoked", param="name")
            row.revoked_at = utcnow()
            s.add(row)
            tx.audit("key.revoke", "api_key", name, before={"revoked": False}, after={"revoked": True})
            s.flush()
            return row.to_domain()


@dataclass(frozen=True)
class Lease:
    """What :meth:`LeaseStore.lease_budget` granted, and what the sliding window holds with it."""

    granted: int
    total: int  # granted in the buckets of the window, this lease included


# A lease that loses a race with another gateway's tries again this many times, then grants 0.
_LEASE_TRIES = 5


class LeaseStore:
    """Budget slices of API keys' limits (server/ratelimit.py): compare-and-swap updates of one
    row per key, kind and time bucket, so that concurrent gateways never grant more than the
    limit, on SQLite and PostgreSQL alike. Outside the registry's revision: leasing moves no routing."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def lease_budget(self, *, key: str, kind: str, bucket: int, span: int, want: int, limit: int) -> Lease:
        """Take up to ``want`` of ``key``'s budget of ``kind`` into ``bucket``: what ``limit``
        leaves after what was granted in the ``span`` buckets ending with it (a sliding window,
        counted whole: never more than ``limit`` in any window). Grants 0 when nothing is left."""
        lease = Lease(0, 0)
        for _ in range(_LEASE_TRIES):
            with _transaction(self.engine) as s:
                rows = s.exec(
                    select(RateLease).where(
                        RateLease.key_name == key,
                        RateLease.kind == kind,
                        col(RateLease.window) > bucket - span,
                        col(RateLease.window) <= bucket,
                    )
                ).all()
                seen = next((r.granted for r in rows if r.window == bucket), None)
                used = sum(r.granted for r in rows)
                grant = max(0, min(want, limit - used))
                lease = Lease(0, used)
                if grant == 0:
                    return lease
                if seen is None:
                    s.add(RateLease(key_name=key, kind=kind, window=bucket, granted=grant))
                    try:
                        s.flush()
                    except SAIntegrityError:
                        s.rollback()  # another gateway opened the bucket first: read it again
                        continue
                    s.execute(  # buckets that left the window
                        delete(RateLease).where(
                            col(RateLease.key_name) == key,
                            col(RateLease.kind) == kind,
                            col(RateLease.window) <= bucket - span,
                        )
                    )
                else:
                    moved = s.execute(
                        update(RateLease)
                        .where(
                            col(RateLease.key_name) == key,
                            col(RateLease.kind) == kind,
                            col(RateLease.window) == bucket,
                            col(RateLease.granted) == seen,
                        )
                        .values(granted=seen + grant)
                    )
                    if moved.rowcount != 1:  # type: ignore[attr-defined]
                        s.rollback()
                        continue
                return Lease(grant, used + grant)
        return lease

    def return_budget(self, *, key: str, kind: str, bucket: int, amount: int) -> None:
        """Give back ``amount`` of a lease into ``bucket`` that was not spent in it."""
        with _transaction(self.engine) as s:
            s.execute(
                update(RateLease)
                .where(
                    col(RateLease.key_name) == key,
                    col(RateLease.kind) == kind,
                    col(RateLease.window) == bucket,
                    col(RateLease.granted) >= amount,
                )
                .values(granted=col(RateLease.granted) - amount)
            )

    def lease_slots(self, *, key: str, holder: str, slots: int, limit: int, ttl_s: float) -> int:
        """Make ``holder`` hold ``slots`` of ``key``'s concurrent requests, or as many as
        ``limit`` leaves beside the other holders' leases (expired ones are reclaimed first).
        ``slots`` below what it holds gives the rest back. Returns what it holds now."""
        for _ in range(_LEASE_TRIES):
            with _transaction(self.engine) as s:
                now = utcnow()
                total_row = s.get(RateLease, (key, "slots", 0))
                seen = total_row.granted if total_row is not None else None
                leases = s.exec(select(SlotLease).where(SlotLease.key_name == key)).all()
                mine = next((lease for lease in leases if lease.holder == holder), None)
                expired = [
                    lease for lease in leases if lease.holder != holder and _aware(lease.expires_at) < now
                ]
                others = (seen or 0) - sum(lease.slots for lease in expired) - (mine.slots if mine else 0)
                new = max(0, min(slots, limit - others))
                if seen is None:
                    s.add(RateLease(key_name=key, kind="slots", window=0, granted=others + new))
                    try:
                        s.flush()
                    except SAIntegrityError:
                        s.rollback()
                        continue
                else:
                    moved = s.execute(
                        update(RateLease)
                        .where(
                            col(RateLease.key_name) == key,
                            col(RateLease.kind) == "slots",
                            col(RateLease.window) == 0,
                            col(RateLease.granted) == seen,
                        )
                        .values(granted=others + new)
                    )
                    if moved.rowcount != 1:  # type: ignore[attr-defined]
                        s.rollback()
                        continue
                for lease in expired:
                    s.delete(lease)
                expires = now + timedelta(seconds=ttl_s)
                if mine is None:
                    s.add(SlotLease(key_name=key, holder=holder, slots=new, expires_at=expires))
                else:
                    mine.slots, mine.expires_at = new, expires
                    s.add(mine)
                return new
        return 0

    def renew_slots(self, *, holder: str, ttl_s: float) -> None:
        """Keep ``holder``'s leases alive for ``ttl_s`` more (a gateway that dies stops renewing)."""
        with _transaction(self.engine) as s:
            s.execute(
                update(SlotLease)
                .where(col(SlotLease.holder) == holder)
                .values(expires_at=utcnow() + timedelta(seconds=ttl_s))
            )


def _aware(at: datetime) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
