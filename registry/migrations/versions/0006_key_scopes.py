"""scopes of API keys

Revision ID: 0006
Revises: 0005

A key gets scopes beyond its adapters' aliases (registry/domain.py: SCOPES). Keys made before
could call the base model and pinned versions, so they keep exactly that (`base`, `versions`)
and are marked `scopes_migrated`, which `loraflow keys list` flags; new keys get none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scopes', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('scopes_migrated', sa.Boolean(), nullable=True))
    api_key = sa.table(
        'api_key', sa.column('scopes', sa.JSON()), sa.column('scopes_migrated', sa.Boolean())
    )
    op.execute(api_key.update().values(scopes=['base', 'versions'], scopes_migrated=True))
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.alter_column('scopes', existing_type=sa.JSON(), nullable=False)
        batch_op.alter_column('scopes_migrated', existing_type=sa.Boolean(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('api_key', schema=None) as batch_op:
        batch_op.drop_column('scopes_migrated')
        batch_op.drop_column('scopes')
