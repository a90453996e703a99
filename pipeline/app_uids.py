"""Which uid each app (and the router) runs as under a root daemon: one no other app and no other DevFlow on this
host has, never handed out again once its app is destroyed.

The daemon's table is its app -> uid map; the host record (pipeline.host_uids) says which daemon holds each uid.
A uid is claimed in the host record before the table names it, so a crash between the two writes leaves at most
a claimed uid that nothing runs as, never a uid two daemons use. At start the daemon claims every uid its table
names (tables older than the record, or a record moved aside), and refuses to start on one another daemon holds.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from pipeline.host_uids import Claim, HostUids, HostUidsError
from pipeline.schema import AppUid

log = logging.getLogger(__name__)

ROUTER = "-router"
"""The router's row: app names cannot start with "-"."""
RETIRED = "-retired-"


class UidClash(HostUidsError):
    """Uids in this daemon's table are held by another daemon on this host."""


class AppUids:
    def __init__(self, sessions: sessionmaker, base: int, host: HostUids | None) -> None:
        """`host` is None for a daemon that is not root: it runs everything as itself and allocates nothing."""
        self.sessions = sessions
        self.base = base
        self.host = host

    def uid_for(self, app: str) -> int:
        for _ in range(5):  # two threads allocating for one app: the loser gives its uid back and reads the row
            with self.sessions() as db:
                uid = db.scalar(select(AppUid.uid).where(AppUid.app == app))
                if uid is not None:
                    return uid
                uid = self._take(app, db.scalar(select(func.max(AppUid.uid))))
                db.add(AppUid(app=app, uid=uid))
                try:
                    db.commit()
                except IntegrityError:
                    db.rollback()
                    self._host.give_back(uid)
                    continue
                log.info("%s runs as uid %d", _holder(app), uid)
                return uid
        raise RuntimeError(f"could not allocate a uid for app {app}")

    def router_uid(self) -> int | None:
        """None when not root: the router runs as the daemon's user."""
        return self.uid_for(ROUTER) if self.host is not None else None

    def claim_recorded(self, reassign: bool) -> None:
        """At start: every uid of the table becomes this daemon's in the host record. Apps (and the router) whose
        uid another daemon holds get a fresh one if `reassign`, else the start is refused; a destroyed app's
        uid held elsewhere is only logged, nothing runs as it here. Nothing to claim when not root."""
        if self.host is None:
            return
        with self.sessions() as db:
            rows = db.execute(select(AppUid.app, AppUid.uid).order_by(AppUid.uid)).all()
        clashes: list[tuple[str, Claim]] = []
        for app, uid in rows:
            other = self.host.hold(uid, _holder(app))
            if other is None:
                continue
            if app.startswith(RETIRED):
                log.warning("uid %d of a destroyed app is held by %s", uid, other.describe())
            else:
                clashes.append((app, other))
        if clashes and not reassign:
            app, other = clashes[0]
            more = f", and {len(clashes) - 1} more of this daemon's uids are held elsewhere" if len(clashes) > 1 else ""
            raise UidClash(f"uid {other.uid}, which {_holder(app)} runs as, is held by {other.describe()} (record "
                           f"{self.host.path(other.uid)}){more}: whatever shares a uid can read the other's files "
                           "and signal its processes. Start this daemon once with --reassign-uids to give each a uid "
                           "of its own (their processes restart as it)")
        for app, other in clashes:
            self._reassign(app, other)

    def forget(self, app: str) -> None:
        """The app is destroyed: its uid is retired, so a new app of the same name gets a fresh one."""
        with self.sessions.begin() as db:
            row = db.get(AppUid, app)
            if row is None:
                return
            row.app = f"{RETIRED}{row.uid}"  # app names cannot start with "-": never looked up again
            uid = row.uid
        if self.host is not None:
            try:
                self.host.relabel(uid, f"{_holder(app)} (destroyed)")
            except HostUidsError as exc:  # the record still says which daemon holds the uid: all that matters
                log.warning("%s is destroyed, but its uid's record still names it: %s", _holder(app), exc)

    @property
    def _host(self) -> HostUids:
        if self.host is None:
            raise RuntimeError("only a root daemon allocates uids")
        return self.host

    def _take(self, app: str, highest: int | None) -> int:
        """Above every uid of the table, destroyed apps' included: never one this daemon handed out before."""
        return self._host.take_next(self.base if highest is None or highest < self.base else highest + 1,
                                    _holder(app))

    def _reassign(self, app: str, other: Claim) -> None:
        with self.sessions.begin() as db:
            uid = self._take(app, db.scalar(select(func.max(AppUid.uid))))
            db.get(AppUid, app).uid = uid
        log.warning("%s ran as uid %d, which %s holds: it runs as uid %d from now on", _holder(app), other.uid,
                    other.describe(), uid)


def _holder(app: str) -> str:
    if app == ROUTER:
        return "the router"
    if app.startswith(RETIRED):
        return "a destroyed app"
    return f"app {app}"
