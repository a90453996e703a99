"""per-app resource limits and the ps:stop state

Revision ID: p0002
Revises: p0001
"""

import sqlalchemy as sa
from alembic import op

revision = "p0002"
down_revision = "p0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pipeline_apps") as batch_op:
        batch_op.add_column(sa.Column("resources", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("stopped", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("pipeline_apps") as batch_op:
        batch_op.drop_column("stopped")
        batch_op.drop_column("resources")
