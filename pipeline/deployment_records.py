"""Deployment rows and their state machine: queued -> building -> releasing -> live | failed | cancelled.

Exactly one deployment of an app is `live`: the one whose build the live release runs. When another
build goes live (a push, or a rollback to an older build) the previous one becomes `inactive`, as GitHub's
deployment statuses do. The methods are synchronous: async callers run them in a thread.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.schema import Deployment

UNFINISHED = ("queued", "building", "releasing")


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class DeploymentRecords:
    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def create(self, app: str, commit: str, user: str) -> int:
        with self.sessions.begin() as db:
            row = Deployment(app=app, commit=commit, user=user, state="queued", stage="", error="", timings={},
                             created_at=now())
            db.add(row)
            db.flush()
            return row.id

    def enter(self, deployment_id: int, state: str, stage: str) -> None:
        with self.sessions.begin() as db:
            row = db.get(Deployment, deployment_id)
            row.state, row.stage = state, stage

    def fail(self, deployment_id: int, stage: str, error: str, timings: dict[str, float]) -> None:
        self._finish(deployment_id, state="failed", stage=stage, error=error, timings=timings)

    def cancel(self, deployment_id: int, why: str) -> None:
        self._finish(deployment_id, state="cancelled", error=why)

    def _finish(self, deployment_id: int, **changes) -> None:
        with self.sessions.begin() as db:
            row = db.get(Deployment, deployment_id)
            for key, value in changes.items():
                setattr(row, key, value)
            row.finished_at = now()

    @classmethod
    def went_live(cls, db: Session, deployment_id: int, version: int, timings: dict[str, float]) -> None:
        """In the release's own transaction (ReleaseLedger.record's `then`): a push's build is live as
        `version`; whichever build was live before is not."""
        row = db.get(Deployment, deployment_id)
        row.state, row.stage, row.release_version, row.timings = "live", "", version, timings
        row.finished_at = now()
        cls._only_live(db, row.app, deployment_id)

    @classmethod
    def serving(cls, db: Session, app: str, deployment_id: int | None) -> None:
        """In the release's own transaction: a release of an existing build went live (rollback, config change),
        so that build's deployment is the live one again. None: the build predates deployment records."""
        if deployment_id is not None:
            db.execute(update(Deployment).where(Deployment.id == deployment_id, Deployment.app == app,
                                                Deployment.state.in_(("live", "inactive")))
                       .values(state="live"))
        cls._only_live(db, app, deployment_id)

    @staticmethod
    def _only_live(db: Session, app: str, deployment_id: int | None) -> None:
        db.execute(update(Deployment).where(Deployment.app == app, Deployment.state == "live",
                                            Deployment.id != deployment_id).values(state="inactive"))

    def fail_interrupted(self) -> list[tuple[str, int]]:
        """At start: what a previous daemon left unfinished did not go live. Returns (app, id) of each."""
        with self.sessions.begin() as db:
            rows = db.execute(select(Deployment.app, Deployment.id).where(Deployment.state.in_(UNFINISHED))).all()
            db.execute(update(Deployment).where(Deployment.state.in_(UNFINISHED))
                       .values(state="failed", error="the daemon stopped during this deployment", finished_at=now()))
            return [(app, deployment_id) for app, deployment_id in rows]

    def history(self, app: str, limit: int = 20) -> list[dict]:
        with self.sessions() as db:
            rows = db.scalars(select(Deployment).where(Deployment.app == app)
                              .order_by(Deployment.id.desc()).limit(limit))
            return [{"id": r.id, "commit": r.commit[:12], "user": r.user, "state": r.state, "stage": r.stage,
                     "release": f"v{r.release_version}" if r.release_version else None,
                     "seconds": round(sum(r.timings.values()), 2) if r.timings else None, "timings": r.timings,
                     "error": r.error, "created_at": r.created_at.isoformat(timespec="seconds")} for r in rows]

    def prune(self, app: str, keep: int) -> list[int]:
        """Past the newest `keep`, finished deployments go (never the live one); returns their ids."""
        with self.sessions.begin() as db:
            newest = select(Deployment.id).where(Deployment.app == app).order_by(Deployment.id.desc()).limit(keep)
            old = list(db.scalars(select(Deployment.id).where(
                Deployment.app == app, Deployment.id.not_in(newest), Deployment.state.not_in(("live", *UNFINISHED)))))
            if old:
                db.execute(delete(Deployment).where(Deployment.id.in_(old)))
            return old

    def forget(self, app: str) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(Deployment).where(Deployment.app == app))
