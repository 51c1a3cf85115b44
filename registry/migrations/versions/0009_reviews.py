"""reviews: people reviewing sampled outputs and blind pairs in the console; report pages stored

Revision ID: 0009
Revises: 0008

`review`: one row per review action of a sampled request (a rating, a redacted correction, failure
categories), kept beside the customer's feedback in the traffic store, never replacing it.
`pairwise_vote`: one row per blind pairwise judgement of an eval report's example or a shadow
rollout's request. `evaluation.page_digest` and `drift_report.page_digest`: the report's HTML page
in the artifact store (NULL for reports stored before, whose pages exist only where --html wrote them).
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('review',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('reviewer', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('rating', sa.Integer(), nullable=True),
    sa.Column('correction', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('categories', sa.JSON(), nullable=False),
    sa.Column('revision', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapter.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.create_index('ix_review_version', ['adapter_id', 'version'], unique=False)
        batch_op.create_index('ix_review_request', ['request_id'], unique=False)
    op.create_table('pairwise_vote',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.Integer(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('item', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('candidate', sa.Integer(), nullable=False),
    sa.Column('baseline', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('choice', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reviewer', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('revision', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapter.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source', 'source_id', 'item', 'reviewer', name='uq_pairwise_vote')
    )
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('page_digest', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    with op.batch_alter_table('drift_report', schema=None) as batch_op:
        batch_op.add_column(sa.Column('page_digest', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('drift_report', schema=None) as batch_op:
        batch_op.drop_column('page_digest')
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.drop_column('page_digest')
    op.drop_table('pairwise_vote')
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.drop_index('ix_review_request')
        batch_op.drop_index('ix_review_version')
    op.drop_table('review')
