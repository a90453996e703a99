"""deployments and releases

Revision ID: p0001
Revises:
"""

from alembic import op
import sqlalchemy as sa


revision = 'p0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('config_vars',
    sa.Column('app', sa.String(length=63), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('app', 'key')
    )
    op.create_table('deployments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('app', sa.String(length=63), nullable=False),
    sa.Column('commit', sa.String(length=64), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('release_version', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployments_app'), ['app'], unique=False)

    op.create_table('pipeline_apps',
    sa.Column('app', sa.String(length=63), nullable=False),
    sa.Column('deploy_branch', sa.String(length=255), nullable=True),
    sa.Column('formation', sa.JSON(), nullable=False),
    sa.Column('domains', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('app')
    )
    op.create_table('releases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('app', sa.String(length=63), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('commit', sa.String(length=64), nullable=False),
    sa.Column('artifact', sa.String(length=1024), nullable=False),
    sa.Column('processes', sa.JSON(), nullable=False),
    sa.Column('build_env', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('app_json', sa.JSON(), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('description', sa.String(length=512), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('app', 'version')
    )
    with op.batch_alter_table('releases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_releases_app'), ['app'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('releases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_releases_app'))

    op.drop_table('releases')
    op.drop_table('pipeline_apps')
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployments_app'))

    op.drop_table('deployments')
    op.drop_table('config_vars')
