"""fetched_priors: series asked of a PACS by C-MOVE as priors, never reported on their own

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 07:15:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fetched_priors",
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("peer_ae", sa.String(length=16), nullable=False),
        sa.Column("requested", sa.DateTime(), nullable=False),
        sa.Column("findings_json", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("series_uid"),
    )


def downgrade() -> None:
    op.drop_table("fetched_priors")
