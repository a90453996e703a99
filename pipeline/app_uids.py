"""Which uid each app runs as: `base` for the first app, then the next free one, never reused."""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from pipeline.schema import AppUid

log = logging.getLogger(__name__)

MAX_UID = 2**32 - 2  # (uid_t)-1 means "no change" to setuid


class AppUids:
    def __init__(self, sessions: sessionmaker, base: int) -> None:
        self.sessions = sessions
        self.base = base

    def uid_for(self, app: str) -> int:
        for _ in range(5):  # two apps allocating at once: the loser of the unique uid tries the next one
            with self.sessions() as db:
                uid = db.scalar(select(AppUid.uid).where(AppUid.app == app))
                if uid is not None:
                    return uid
                highest = db.scalar(select(func.max(AppUid.uid)))
                uid = self.base if highest is None or highest < self.base else highest + 1
                if uid > MAX_UID:
                    raise RuntimeError(f"no uid left above {self.base} for app {app}")
                db.add(AppUid(app=app, uid=uid))
                try:
                    db.commit()
                except IntegrityError:
                    db.rollback()
                    continue
                log.info("app %s runs as uid %d", app, uid)
                return uid
        raise RuntimeError(f"could not allocate a uid for app {app}")

    def forget(self, app: str) -> None:
        """The app is destroyed: its uid is retired, so a new app of the same name gets a fresh one."""
        with self.sessions.begin() as db:
            row = db.get(AppUid, app)
            if row is not None:
                row.app = f"-retired-{row.uid}"  # app names cannot start with "-": never looked up again
