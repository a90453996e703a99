"""Apps: names, their repositories, collaborators, and who may do what to them."""

from __future__ import annotations

import fnmatch
import logging
import posixpath
import re
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gitd.errors import Conflict, Forbidden, InvalidInput, NotFound
from gitd.git.repositories import Repositories
from gitd.identity.directory import now
from gitd.identity.roles import Actor, Role
from gitd.schema import App, Collaborator, User
from pipeline.limits import Limits

log = logging.getLogger(__name__)

# An app name becomes a DNS label (<app>.<domain>), a directory and a process name.
APP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,61}[a-z0-9]$|^[a-z]$")


def check_app_name(name: str) -> str:
    if not isinstance(name, str) or not APP_NAME.fullmatch(name) or "--" in name:
        shown = name if isinstance(name, str) and len(name) <= 70 else f"{str(name)[:60]}..."
        raise InvalidInput(
            f"invalid app name {shown!r}: use 1-63 lowercase letters, digits and single dashes, "
            "starting with a letter and not ending with a dash"
        )
    return name


def app_record(app: App, actor: Actor, role: Role | None) -> dict:
    """What anyone with a role on the app may see: its public facts, and the role it has for them."""
    owner = app.owner_id is not None and app.owner_id == actor.user_id
    return {
        "name": app.name,
        "owner": app.owner.name if app.owner else None,
        # The same word `collaborators` uses: the owner is not one admin among others.
        "role": "owner" if owner else role.label if role else None,
        "created_at": app.created_at.isoformat(timespec="seconds"),
    }


class AppRegistry:
    def __init__(self, sessions: sessionmaker, repositories: Repositories, limits: Limits) -> None:
        self.sessions = sessions
        self.repositories = repositories
        self.limits = limits

    def _app(self, db: Session, name: str) -> App:
        app = db.scalar(select(App).where(App.name == check_app_name(name)))
        if app is None:
            raise NotFound(f"app {name!r} does not exist")
        return app

    def _role(self, db: Session, actor: Actor, app: App) -> Role | None:
        if actor.is_admin or app.owner_id == actor.user_id:
            return Role.ADMIN
        collab = db.scalar(
            select(Collaborator).where(Collaborator.app_id == app.id, Collaborator.user_id == actor.user_id)
        )
        return Role.parse(collab.role) if collab else None

    def _authorized(self, db: Session, actor: Actor, name: str, need: Role) -> App:
        app = db.scalar(select(App).where(App.name == check_app_name(name)))
        role = self._role(db, actor, app) if app else None
        if app is None or role is None:
            # Same answer whether the app is missing or hidden, so names do not leak.
            raise NotFound(f"app {name!r} does not exist or you have no access to it")
        if role < need:
            raise Forbidden(f"user {actor.name} has the {role.label} role on {name}; this needs {need.label}")
        return app

    def authorize(self, actor: Actor, name: str, need: Role) -> None:
        with self.sessions() as db:
            self._authorized(db, actor, name, need)

    def role(self, actor: Actor, name: str) -> Role | None:
        with self.sessions() as db:
            app = db.scalar(select(App).where(App.name == check_app_name(name)))
            return self._role(db, actor, app) if app else None

    def readable_repository(self, user: str, app: str, relative_url: str) -> Path | None:
        """What a relative submodule URL of `app` (e.g. ../lib.git) names, if `user` may read it."""
        target = posixpath.normpath(posixpath.join(f"/{app}.git", relative_url)).removeprefix("/").removesuffix(".git")
        if not APP_NAME.fullmatch(target):
            return None
        with self.sessions() as db:
            user_row = db.scalar(select(User).where(User.name == user))
            other = db.scalar(select(App).where(App.name == target))
            if user_row is None or other is None:
                return None
            actor = Actor(user_row.id, user_row.name, user_row.is_admin, user_row.can_create_apps)
            return self.repositories.path(target) if self._role(db, actor, other) is not None else None

    def create(self, actor: Actor, name: str) -> dict:
        check_app_name(name)
        if not actor.can_create_apps:
            raise Forbidden(f"user {actor.name} may not create apps; ask an admin")
        try:
            with self.sessions.begin() as db:
                if db.scalar(select(App).where(App.name == name)) is not None:
                    raise Conflict(f"app {name!r} already exists")
                owned = db.scalar(select(func.count()).select_from(App).where(App.owner_id == actor.user_id))
                if owned >= self.limits.max_apps_per_user:
                    raise InvalidInput(str(self.limits.refuse(
                        "max_apps_per_user", f"user {actor.name} owns {owned} apps already")))
                app = App(name=name, owner_id=actor.user_id, created_at=now(), protected_branches="")
                db.add(app)
                db.flush()
                self.repositories.create(name)
                log.info("app %s created by %s", name, actor.name)
                return app_record(app, actor, Role.ADMIN)
        except IntegrityError:
            raise Conflict(f"app {name!r} already exists") from None

    def ensure_for_push(self, actor: Actor, name: str) -> bool:
        """Authorize a push; create the app if it is missing and the pusher may create apps.

        Returns True when the push created the app.
        """
        with self.sessions() as db:
            exists = db.scalar(select(App.id).where(App.name == check_app_name(name))) is not None
        if exists:
            self.authorize(actor, name, Role.WRITE)
            return False
        if not actor.can_create_apps:
            raise NotFound(f"app {name!r} does not exist, and user {actor.name} may not create apps")
        try:
            self.create(actor, name)
        except Conflict:
            # Another push created it a moment ago.
            self.authorize(actor, name, Role.WRITE)
            return False
        return True

    def list(self, actor: Actor) -> list[dict]:
        with self.sessions() as db:
            result = []
            for app in db.scalars(select(App).order_by(App.name)):
                role = self._role(db, actor, app)
                if role is not None:
                    result.append(app_record(app, actor, role))
            return result

    def info(self, actor: Actor, name: str) -> dict:
        """`read` sees the public facts; `write` also who collaborates and the branch rules; only platform
        admins see where the repository lives on the server."""
        with self.sessions() as db:
            app = self._authorized(db, actor, name, Role.READ)
            role = self._role(db, actor, app)
            record = app_record(app, actor, role)
            if role is not None and role >= Role.WRITE:
                record["protected_branches"] = app.protected_branches.split()
                record["collaborators"] = self._collaborators(db, app)
            if actor.is_admin:
                record["repository"] = str(self.repositories.path(name))
            return record

    def destroy(self, actor: Actor, name: str) -> dict:
        with self.sessions.begin() as db:
            app = self._authorized(db, actor, name, Role.ADMIN)
            record = app_record(app, actor, Role.ADMIN)
            db.delete(app)
        self.repositories.destroy(name)
        log.info("app %s destroyed by %s", name, actor.name)
        return record

    def protected_branches(self, name: str) -> list[str]:
        with self.sessions() as db:
            return self._app(db, name).protected_branches.split()

    def set_protected_branches(self, actor: Actor, name: str, patterns: list[str]) -> dict:
        for pattern in patterns:
            if not re.fullmatch(r"[A-Za-z0-9._/*?\[\]-]+", pattern):
                raise InvalidInput(f"invalid branch pattern {pattern!r}")
        with self.sessions.begin() as db:
            app = self._authorized(db, actor, name, Role.ADMIN)
            app.protected_branches = " ".join(patterns)
            return {**app_record(app, actor, Role.ADMIN), "protected_branches": patterns}

    def is_protected(self, name: str, branch: str) -> bool:
        return any(fnmatch.fnmatchcase(branch, p) for p in self.protected_branches(name))

    # collaborators

    def _collaborators(self, db: Session, app: App) -> list[dict]:
        rows = db.scalars(select(Collaborator).where(Collaborator.app_id == app.id).join(User).order_by(User.name))
        owner = [{"user": app.owner.name, "role": "owner"}] if app.owner else []
        return owner + [{"user": c.user.name, "role": c.role} for c in rows]

    def collaborators(self, actor: Actor, name: str) -> list[dict]:
        with self.sessions() as db:
            return self._collaborators(db, self._authorized(db, actor, name, Role.WRITE))

    def add_collaborator(self, actor: Actor, name: str, user_name: str, role: str) -> dict:
        parsed = Role.parse(role)
        with self.sessions.begin() as db:
            app = self._authorized(db, actor, name, Role.ADMIN)
            user = db.scalar(select(User).where(User.name == user_name))
            if user is None:
                raise NotFound(f"no user named {user_name!r}; add their key first with keys:add --user {user_name}")
            collab = db.scalar(
                select(Collaborator).where(Collaborator.app_id == app.id, Collaborator.user_id == user.id)
            )
            if collab is None:
                count = db.scalar(select(func.count()).select_from(Collaborator).where(Collaborator.app_id == app.id))
                if count >= self.limits.max_collaborators_per_app:
                    raise InvalidInput(str(self.limits.refuse(
                        "max_collaborators_per_app", f"{name} has {count} collaborators already")))
                db.add(Collaborator(app_id=app.id, user_id=user.id, role=parsed.label))
            else:
                collab.role = parsed.label
            return {"app": name, "user": user_name, "role": parsed.label}

    def remove_collaborator(self, actor: Actor, name: str, user_name: str) -> dict:
        with self.sessions.begin() as db:
            app = self._authorized(db, actor, name, Role.ADMIN)
            collab = db.scalar(
                select(Collaborator).join(User).where(Collaborator.app_id == app.id, User.name == user_name)
            )
            if collab is None:
                raise NotFound(f"{user_name} is not a collaborator on {name}")
            db.delete(collab)
            return {"app": name, "user": user_name, "removed": True}
