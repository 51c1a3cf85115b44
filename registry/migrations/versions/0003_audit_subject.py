"""audit events name their subject by kind and id

Revision ID: 0003
Revises: 0002

`audit_event.target` was a formatted string ("support@v2", "key:ci-bot"), and an
adapter's history was found by prefix, so `history key` showed API-key events.
Each event now records `subject_kind` (adapter, dataset, api_key), `subject`
(the name), and the `version` or `alias` it concerns. Existing rows are parsed
once, here, from the only formats the code ever wrote.
"""

from __future__ import annotations

import re

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_VERSIONED = re.compile(r"^(?P<name>.+)@v(?P<version>[0-9]+)$")


def _subject(action: str, target: str) -> dict[str, object]:
    if action.startswith("key."):
        return {"kind": "api_key", "subject": target.removeprefix("key:"), "version": None, "alias": None}
    kind = "dataset" if action.startswith("dataset.") else "adapter"
    if (m := _VERSIONED.match(target)) is not None:
        return {"kind": kind, "subject": m["name"], "version": int(m["version"]), "alias": None}
    if kind == "adapter" and ":" in target:
        name, _, alias = target.partition(":")
        return {"kind": kind, "subject": name, "version": None, "alias": alias}
    return {"kind": kind, "subject": target, "version": None, "alias": None}


def upgrade() -> None:
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('subject_kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
        batch_op.add_column(sa.Column('version', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('alias', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))

    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, action, target FROM audit_event")).all()
    for row_id, action, target in rows:
        bind.execute(
            sa.text(
                "UPDATE audit_event SET subject_kind = :kind, subject = :subject, version = :version, "
                "alias = :alias WHERE id = :id"
            ),
            {**_subject(action, target), "id": row_id},
        )

    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.alter_column('subject_kind', existing_type=sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False)
        batch_op.alter_column('subject', existing_type=sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False)
        batch_op.drop_index(batch_op.f('ix_audit_event_target'))
        batch_op.drop_column('target')
        batch_op.create_index('ix_audit_event_subject', ['subject_kind', 'subject'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, subject_kind, subject, version, alias FROM audit_event")).all()
    for row_id, kind, subject, version, alias in rows:
        if kind == "api_key":
            target = f"key:{subject}"
        elif version is not None:
            target = f"{subject}@v{version}"
        elif alias is not None:
            target = f"{subject}:{alias}"
        else:
            target = subject
        bind.execute(sa.text("UPDATE audit_event SET target = :t WHERE id = :id"), {"t": target, "id": row_id})
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.alter_column('target', existing_type=sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False)
        batch_op.drop_index('ix_audit_event_subject')
        batch_op.drop_column('alias')
        batch_op.drop_column('version')
        batch_op.drop_column('subject')
        batch_op.drop_column('subject_kind')
        batch_op.create_index(batch_op.f('ix_audit_event_target'), ['target'], unique=False)
