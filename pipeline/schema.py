"""pipeline's tables: per-app deploy settings, config vars, deployments and releases."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class AppDeploySettings(Base):
    __tablename__ = "pipeline_apps"

    app: Mapped[str] = mapped_column(String(63), primary_key=True)
    deploy_branch: Mapped[str | None] = mapped_column(String(255))
    formation: Mapped[dict] = mapped_column(JSON, default=dict)  # process type -> count, set by ps:scale
    domains: Mapped[list] = mapped_column(JSON, default=list)
    resources: Mapped[dict] = mapped_column(JSON, default=dict)  # memory, cpu limits per process
    stopped: Mapped[bool] = mapped_column(default=False)  # ps:stop; stays stopped across restarts


class AppUid(Base):
    """The uid an app's builds and processes run as under a root daemon. A destroyed app's row is retired,
    not deleted, so a uid is never handed to another app, even one of the same name (files a destroyed app
    left in /tmp stay out of the new one's reach)."""

    __tablename__ = "pipeline_app_uids"

    app: Mapped[str] = mapped_column(String(63), primary_key=True)
    uid: Mapped[int] = mapped_column(unique=True)


class ConfigVar(Base):
    __tablename__ = "config_vars"

    app: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Release(Base):
    """Immutable once written: what ran, built from what, configured how, and why."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("app", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    app: Mapped[str] = mapped_column(String(63), index=True)
    version: Mapped[int]
    commit: Mapped[str] = mapped_column(String(64))
    artifact: Mapped[str] = mapped_column(String(1024))  # build directory (native) or image digest
    deployment_id: Mapped[int | None]  # the deployment that built the artifact (None: built before records)
    processes: Mapped[dict] = mapped_column(JSON)  # process type -> command
    build_env: Mapped[dict] = mapped_column(JSON)  # what the builder says processes need (PATH, ...)
    config: Mapped[dict] = mapped_column(JSON)  # the app's config vars at release time
    app_json: Mapped[dict] = mapped_column(JSON)  # healthchecks, scripts, formation as deployed
    user: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(32))  # push, config, rollback, scale, deploy
    description: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime]


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(primary_key=True)
    app: Mapped[str] = mapped_column(String(63), index=True)
    commit: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # queued building releasing live inactive failed cancelled
    stage: Mapped[str] = mapped_column(String(32), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    timings: Mapped[dict] = mapped_column(JSON, default=dict)  # stage -> seconds
    release_version: Mapped[int | None]
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
