"""studies.description and indexes for the dashboard's searches (accession, audit event)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 15:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(
            sa.Column("description", sa.String(length=64), nullable=False, server_default="")
        )
        batch.create_index("ix_studies_accession_number", ["accession_number"])
    with op.batch_alter_table("audit_events") as batch:
        batch.create_index("ix_audit_events_event", ["event"])


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_index("ix_audit_events_event")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_accession_number")
        batch.drop_column("description")
