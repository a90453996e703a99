"""The release ledger: immutable, numbered releases per app (v1, v2, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import PipelineInputError
from pipeline.schema import Release


@dataclass(frozen=True)
class ReleaseRecord:
    app: str
    version: int
    commit: str
    artifact: str
    deployment_id: int | None
    processes: dict[str, str]
    build_env: dict[str, str]
    config: dict[str, str]
    app_json: dict
    user: str
    reason: str
    description: str
    created_at: datetime

    def summary(self) -> dict:
        """What `releases` shows: never the config values."""
        return {
            "version": f"v{self.version}", "commit": self.commit[:12], "user": self.user, "reason": self.reason,
            "description": self.description, "created_at": self.created_at.isoformat(timespec="seconds"),
            "config_keys": sorted(self.config),
        }


def _record(row: Release) -> ReleaseRecord:
    return ReleaseRecord(
        row.app, row.version, row.commit, row.artifact, row.deployment_id, dict(row.processes), dict(row.build_env),
        dict(row.config), dict(row.app_json), row.user, row.reason, row.description, row.created_at,
    )


def parse_version(text: str) -> int:
    digits = text.lower().removeprefix("v")
    if not digits.isdigit() or int(digits) < 1:
        raise PipelineInputError(f"invalid release {text!r}; name one like v3")
    return int(digits)


class ReleaseLedger:
    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def apps(self) -> list[str]:
        """Every app with a release, whether or not its build directory is still where it was."""
        with self.sessions() as db:
            return list(db.scalars(select(Release.app).distinct().order_by(Release.app)))

    def latest(self, app: str) -> ReleaseRecord | None:
        with self.sessions() as db:
            row = db.scalar(select(Release).where(Release.app == app).order_by(Release.version.desc()).limit(1))
            return _record(row) if row else None

    def get(self, app: str, version: int) -> ReleaseRecord:
        with self.sessions() as db:
            row = db.scalar(select(Release).where(Release.app == app, Release.version == version))
            if row is None:
                raise PipelineInputError(f"{app} has no release v{version}")
            return _record(row)

    def list(self, app: str, limit: int = 50) -> list[ReleaseRecord]:
        with self.sessions() as db:
            rows = db.scalars(select(Release).where(Release.app == app).order_by(Release.version.desc()).limit(limit))
            return [_record(r) for r in rows]

    def record(self, *, app: str, commit: str, artifact: str, deployment_id: int | None, processes: dict[str, str],
               build_env: dict[str, str], config: dict[str, str], app_json: dict, user: str, reason: str,
               description: str, then: Callable[[Session, int], None] = lambda db, version: None) -> ReleaseRecord:
        """`then(db, version)` runs in the same transaction: what must be true exactly when the release is
        (its deployment is the live one) commits with it, or neither does."""
        for _ in range(5):
            try:
                with self.sessions.begin() as db:
                    version = (db.scalar(select(func.max(Release.version)).where(Release.app == app)) or 0) + 1
                    row = Release(app=app, version=version, commit=commit, artifact=artifact,
                                  deployment_id=deployment_id, processes=processes,
                                  build_env=build_env, config=config, app_json=app_json, user=user, reason=reason,
                                  description=description[:512], created_at=datetime.now(UTC).replace(tzinfo=None))
                    db.add(row)
                    db.flush()
                    then(db, version)
                    return _record(row)
            except IntegrityError:
                continue  # another release took the number; take the next
        raise RuntimeError(f"could not number a new release of {app}")

    def artifacts_in_use(self, app: str, keep: int) -> set[str]:
        """Artifacts of the newest `keep` releases: rollback targets whose builds must stay on disk."""
        return {r.artifact for r in self.list(app, keep)}

    def prune(self, app: str, keep: int) -> None:
        """Past the newest `keep`, releases go: numbers are never reused (the newest always stays)."""
        with self.sessions.begin() as db:
            newest = select(Release.version).where(Release.app == app).order_by(Release.version.desc()).limit(keep)
            db.execute(delete(Release).where(Release.app == app, Release.version.not_in(newest)))

    def forget(self, app: str) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(Release).where(Release.app == app))
