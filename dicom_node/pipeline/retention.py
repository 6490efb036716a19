"""Retention: received images are deleted once they are no longer needed.

A series' images go when its results are delivered everywhere, nothing of it is pending or
dead-lettered, and ``storage.retention_days`` have passed since it last received an instance.
Results and the index stay. Rows go first and files after the commit: a crash in between
leaves files without rows (harmless), never rows without files.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from storage import index, queue
from storage.files import FileStore
from storage.models import utcnow

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self, db: sessionmaker[Session], instances: FileStore, retention_days: float | None
    ) -> None:
        self.db = db
        self.instances = instances
        self.retention_days = retention_days

    def purge(self) -> int:
        """Delete the images of every series past retention; returns how many series."""
        if self.retention_days is None:
            return 0
        before = utcnow() - timedelta(days=self.retention_days)
        with self.db() as session:
            due = index.purgeable_series(session, before, queue.series_with_unfinished_delivery())
        for series_id in due:
            with self.db.begin() as session:
                paths = index.purge_series_images(session, series_id)
            self.instances.delete(paths)
            log.info("series %d: %d image(s) deleted after retention", series_id, len(paths))
        return len(due)
