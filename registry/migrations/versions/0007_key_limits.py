"""per-key rate limits and the leases gateways take of them

Revision ID: 0007
Revises: 0006

A key may carry requests/min, tokens/min and concurrent-request limits (NULL: the
gateways' defaults). `rate_lease` and `slot_lease` hold the budget slices gateways lease
(server/ratelimit.py), so a limit holds across any number of gateways without a write per
request.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rpm', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tpm', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_concurrency', sa.Integer(), nullable=True))
    op.create_table('rate_lease',
    sa.Column('key_name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('window', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('granted', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('key_name', 'kind', 'window')
    )
    op.create_table('slot_lease',
    sa.Column('key_name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('holder', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('slots', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key_name', 'holder')
    )


def downgrade() -> None:
    op.drop_table('slot_lease')
    op.drop_table('rate_lease')
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.drop_column('max_concurrency')
        batch_op.drop_column('tpm')
        batch_op.drop_column('rpm')
