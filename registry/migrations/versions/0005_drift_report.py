"""drift reports of adapter versions

Revision ID: 0005
Revises: 0004

`loraflow drift` stores one row per run; gateways export the latest per version.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('drift_report',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('window_end', sa.DateTime(timezone=True), nullable=False),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.Column('revision', sa.BigInteger(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapter.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('drift_report', schema=None) as batch_op:
        batch_op.create_index('ix_drift_report_version', ['adapter_id', 'version'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('drift_report', schema=None) as batch_op:
        batch_op.drop_index('ix_drift_report_version')
    op.drop_table('drift_report')
