"""one uid per app for builds and processes under a root daemon

Revision ID: p0003
Revises: p0002
"""

import sqlalchemy as sa
from alembic import op

revision = "p0003"
down_revision = "p0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipeline_app_uids",
        sa.Column("app", sa.String(63), primary_key=True),
        sa.Column("uid", sa.Integer(), nullable=False, unique=True),
    )


def downgrade() -> None:
    op.drop_table("pipeline_app_uids")
