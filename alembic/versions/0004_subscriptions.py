"""subscriptions: FHIR R4 rest-hook subscriptions, their outbox, the deliverer's lease

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from locator.store.models import UTCDateTime


revision: str = '0004'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('subscription',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('nhs_number', sa.String(length=10), nullable=False),
    sa.Column('endpoint', sa.Text(), nullable=False),
    sa.Column('payload', sa.String(length=60), nullable=True),
    sa.Column('headers', sa.Text(), server_default='[]', nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('end_at', UTCDateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('version', sa.Integer(), server_default=sa.text('1'), nullable=False),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.Column('updated_at', UTCDateTime(), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('failing_since', UTCDateTime(), nullable=True),
    sa.Column('next_attempt_at', UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription'))
    )
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.create_index('ix_subscription_nhs_number_status', ['nhs_number', 'status'], unique=False)
        batch_op.create_index('ix_subscription_owner_status', ['owner', 'status'], unique=False)

    op.create_table('subscription_outbox',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('subscription_id', sa.String(length=32), nullable=False),
    sa.Column('study_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['subscription_id'], ['subscription.id'], name=op.f('fk_subscription_outbox_subscription_id_subscription'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscription_outbox')),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('subscription_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_subscription_outbox_subscription_id_id', ['subscription_id', 'id'], unique=False)

    op.create_table('service_lease',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=False),
    sa.Column('expires_at', UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_service_lease'))
    )


def downgrade() -> None:
    op.drop_table('service_lease')
    with op.batch_alter_table('subscription_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_subscription_outbox_subscription_id_id')
    op.drop_table('subscription_outbox')
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.drop_index('ix_subscription_owner_status')
        batch_op.drop_index('ix_subscription_nhs_number_status')
    op.drop_table('subscription')
