"""rollouts: canary and shadow steps from production to a candidate, decided on live traffic

Revision ID: 0008
Revises: 0007

One row per rollout of an adapter: its steps, the step it is at, its state, the decisions taken
(with the figures each rests on), a compare-and-swap counter, and the lease of the gateway process
that decides for it; and `rollout_tally`, what each gateway process counted per step and arm,
which the controller sums. Nothing existing changes: a database upgraded from 0007 has no rollouts.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rollout',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('candidate', sa.Integer(), nullable=False),
    sa.Column('baseline', sa.Integer(), nullable=False),
    sa.Column('policy', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('steps', sa.JSON(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('decisions', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('step_started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('controller', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapter.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.create_index('ix_rollout_adapter_state', ['adapter_id', 'state'], unique=False)
    op.create_table('rollout_tally',
    sa.Column('rollout_id', sa.Integer(), nullable=False),
    sa.Column('holder', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('step', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('arm', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['rollout_id'], ['rollout.id'], ),
    sa.PrimaryKeyConstraint('rollout_id', 'holder', 'step', 'arm')
    )


def downgrade() -> None:
    op.drop_table('rollout_tally')
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.drop_index('ix_rollout_adapter_state')
    op.drop_table('rollout')
