"""Per-app deploy settings: the deploy branch, the formation (ps:scale) and custom domains."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pipeline.errors import PipelineInputError
from pipeline.limits import Limits
from pipeline.schema import AppDeploySettings
from runtime.local import cgroups

DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
BRANCH = re.compile(r"^(?!.*\.\.)(?!/)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<![/.])$")


class DeploySettings:
    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def _row(self, db, app: str) -> AppDeploySettings:
        row = db.get(AppDeploySettings, app)
        if row is None:
            row = AppDeploySettings(app=app, deploy_branch=None, formation={}, domains=[], resources={},
                                    stopped=False)
            db.add(row)
        return row

    def deploy_branch(self, app: str, existing_branches: set[str] | None = None) -> str:
        """The configured branch, else main, else master (when only master exists)."""
        with self.sessions() as db:
            row = db.get(AppDeploySettings, app)
            if row is not None and row.deploy_branch:
                return row.deploy_branch
        if existing_branches and "main" not in existing_branches and "master" in existing_branches:
            return "master"
        return "main"

    def set_deploy_branch(self, app: str, branch: str) -> str:
        if not BRANCH.fullmatch(branch):
            raise PipelineInputError(f"invalid branch name {branch[:80]!r}")
        with self.sessions.begin() as db:
            self._row(db, app).deploy_branch = branch
        return branch

    def formation(self, app: str) -> dict[str, int]:
        with self.sessions() as db:
            row = db.get(AppDeploySettings, app)
            return dict(row.formation) if row else {}

    def scale(self, app: str, counts: dict[str, int]) -> dict[str, int]:
        """Store counts the caller checked against the release and the limits (release_env.check_scale)."""
        with self.sessions.begin() as db:
            row = self._row(db, app)
            row.formation = {**(row.formation or {}), **counts}
            return dict(row.formation)

    def resources(self, app: str) -> cgroups.Limits:
        with self.sessions() as db:
            row = db.get(AppDeploySettings, app)
            return cgroups.Limits(**row.resources) if row and row.resources else cgroups.Limits()

    def set_resources(self, app: str, values: dict[str, str], bounds: Limits) -> cgroups.Limits:
        """resources:set: memory within the platform's ceiling per process (--max-process-memory)."""
        try:
            limits = cgroups.Limits.parse(values)
        except ValueError as exc:
            raise PipelineInputError(str(exc)) from None
        if limits.memory and limits.memory > bounds.max_process_memory:
            raise bounds.refuse("max_process_memory", f"memory={values['memory']} for each process of {app}")
        with self.sessions.begin() as db:
            self._row(db, app).resources = {} if limits.empty else limits.as_dict()
        return limits

    def stopped(self, app: str) -> bool:
        with self.sessions() as db:
            row = db.get(AppDeploySettings, app)
            return bool(row and row.stopped)

    def set_stopped(self, app: str, stopped: bool) -> None:
        with self.sessions.begin() as db:
            self._row(db, app).stopped = stopped

    def domains(self, app: str) -> list[str]:
        with self.sessions() as db:
            row = db.get(AppDeploySettings, app)
            return list(row.domains) if row else []

    def add_domain(self, app: str, domain: str, limits: Limits) -> list[str]:
        domain = domain.strip().lower().rstrip(".")
        if not DOMAIN.fullmatch(domain):
            raise PipelineInputError(f"invalid domain name {domain[:80]!r}")
        with self.sessions.begin() as db:
            row = self._row(db, app)
            if domain not in row.domains:
                if len(row.domains) >= limits.max_domains_per_app:
                    raise limits.refuse("max_domains_per_app", f"{app} has {len(row.domains)} domains already")
                row.domains = [*row.domains, domain]
            return list(row.domains)

    def domain_owner(self, domain: str) -> str | None:
        with self.sessions() as db:
            for row in db.scalars(select(AppDeploySettings)):
                if domain in (row.domains or []):
                    return row.app
        return None

    def remove_domain(self, app: str, domain: str) -> list[str]:
        with self.sessions.begin() as db:
            row = self._row(db, app)
            if domain not in row.domains:
                raise PipelineInputError(f"{domain} is not a domain of {app}")
            row.domains = [d for d in row.domains if d != domain]
            return list(row.domains)

    def forget(self, app: str) -> None:
        with self.sessions.begin() as db:
            row = db.get(AppDeploySettings, app)
            if row is not None:
                db.delete(row)
