"""Management operations on running apps: config, releases, processes, logs, domains.

Runs in a worker thread like the rest of Management; the pipeline's coroutines are handed
to the daemon's event loop through `run`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gitd.apps import AppRegistry
from gitd.errors import DevflowError, InvalidInput, NotFound
from gitd.identity.roles import Actor, Role
from gitd.log_followers import LogFollowers
from pipeline.deployments import Deployments
from pipeline.errors import DeployFailed, PipelineInputError
from pipeline.release_ledger import parse_version


@dataclass(frozen=True)
class DeployServices:
    deployments: Deployments  # owns the config vars, ledger, settings, rollout and logs it works with
    run: Callable[[Coroutine], Any]  # runs a coroutine on the daemon's loop, from a worker thread
    followers: LogFollowers

    def log_lines(self, tail: int) -> int:
        """What a `logs` answer holds: as asked, all (0) meaning as many as the limit allows."""
        most = self.deployments.limits.max_log_lines
        return min(tail, most) if tail > 0 else most


@contextmanager
def pipeline_errors(unchanged: str = ""):
    """Pipeline refusals as the edge shows them; `unchanged` says what a failed release left as it was."""
    try:
        yield
    except PipelineInputError as exc:
        raise InvalidInput(str(exc)) from None
    except DeployFailed as exc:
        kept = f"{unchanged}; the live release keeps serving" if unchanged else "the live release keeps serving"
        raise DevflowError(f"release failed at {exc.stage}: {exc.message}; {kept}") from None


def parse_assignments(pairs: list[str], encoded: bool) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInput(f"expected KEY=VALUE, got {pair[:60]!r}")
        if encoded:
            try:
                value = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidInput(f"the value of {key} is not valid base64 of UTF-8 text") from None
        values[key] = value
    if not values:
        raise InvalidInput("give at least one KEY=VALUE")
    return values


class DeployManagement:
    apps: AppRegistry
    actor: Actor
    deploys: DeployServices

    def _collect(self) -> tuple[list[str], Callable[[str], None]]:
        lines: list[str] = []
        lock = threading.Lock()

        def say(line: str) -> None:
            with lock:
                lines.append(line)

        return lines, say

    # config

    def config_show(self, app: str) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        return self.deploys.deployments.config_vars.get_all(app)

    def config_get(self, app: str, key: str) -> dict:
        values = self.config_show(app)
        if key not in values:
            raise NotFound(f"{app} has no config var {key}")
        return {"key": key, "value": values[key]}

    def config_set(self, app: str, pairs: list[str], encoded: bool = False, restart: bool = True) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        return self._change_config(app, parse_assignments(pairs, encoded), [], restart)

    def config_unset(self, app: str, keys: list[str], restart: bool = True) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        missing = sorted(set(keys) - set(self.deploys.deployments.config_vars.get_all(app)))
        if missing:
            raise NotFound(f"{app} has no config var {', '.join(missing)}")
        return self._change_config(app, {}, keys, restart)

    def _change_config(self, app: str, values: dict[str, str], unset: list[str], restart: bool) -> dict:
        lines, say = self._collect()
        with pipeline_errors(unchanged="the config is unchanged"):
            change = self.deploys.run(self.deploys.deployments.change_config(
                app, self.actor.name, values, unset, say, release=restart))
        result = {"changed": change.changed, "release": f"v{change.release.version}" if change.release else None}
        return {**result, **({"note": change.note} if change.note else {}), "output": lines}

    # releases

    def releases(self, app: str) -> list[dict]:
        self.apps.authorize(self.actor, app, Role.WRITE)
        return [r.summary() for r in self.deploys.deployments.ledger.list(app)]

    def rollback(self, app: str, version: str) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        lines, say = self._collect()
        with pipeline_errors():
            record = self.deploys.run(self.deploys.deployments.rollback(app, parse_version(version),
                                                                        self.actor.name, say))
        return {"release": f"v{record.version}" if record else None, "rolled_back_to": version, "output": lines}

    def deployments_list(self, app: str) -> list[dict]:
        self.apps.authorize(self.actor, app, Role.WRITE)
        return self.deploys.deployments.history(app)

    # processes

    def ps(self, app: str) -> list[dict]:
        self.apps.authorize(self.actor, app, Role.WRITE)
        return self.deploys.deployments.rollout.processes(app)

    def ps_scale(self, app: str, pairs: list[str]) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        counts = {}
        for kind, value in parse_assignments(pairs, encoded=False).items():
            if not value.isdigit() or len(value) > 6:
                raise InvalidInput(f"{kind}={value[:20]}: the count must be a whole number")
            counts[kind] = int(value)
        lines, say = self._collect()
        with pipeline_errors(unchanged="the formation is unchanged"):
            formation, changed = self.deploys.run(self.deploys.deployments.scale(app, counts, say))
        return {"formation": formation, "changed": changed, "output": lines}

    def ps_restart(self, app: str) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        result = self._restart_if_deployed(app)
        if result["restarted"] is None:
            raise InvalidInput(f"{app} has not been deployed yet")
        return result

    def ps_stop(self, app: str) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        self.deploys.run(self.deploys.deployments.stop(app))
        return {"stopped": app}

    def ps_start(self, app: str) -> dict:
        return self.ps_restart(app)

    def logs(self, app: str, tail: int = 100, process: str | None = None) -> list[str]:
        self.apps.authorize(self.actor, app, Role.WRITE)
        return self.deploys.deployments.logs.tail(app, self.deploys.log_lines(tail), process)

    async def follow_logs(self, app: str, tail: int, process: str | None = None,
                          stop: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
        """`logs -f`: the last `tail` lines (as many as allowed with 0), then new lines as they are written, until
        `stop()` or the reader goes away. Refuses at once (before the first line) a reader who may not read the
        app's logs, or who follows too many already. Runs on the daemon's loop, not in a command thread: it lasts
        as long as the reader."""
        await asyncio.to_thread(self.apps.authorize, self.actor, app, Role.WRITE)
        lines = self.deploys.deployments.logs.follow(app, self.deploys.log_lines(tail), process, stop=stop)
        return self.deploys.followers.admit(self.actor.name, lines)

    def resources(self, app: str) -> dict:
        self.apps.authorize(self.actor, app, Role.WRITE)
        limits = self.deploys.deployments.settings.resources(app)
        return {"app": app, "memory": limits.memory, "cpu": limits.cpu,
                "enforced_by": self.deploys.deployments.rollout.scheduler.limits_enforcement()}

    def resources_set(self, app: str, pairs: list[str]) -> dict:
        self.apps.authorize(self.actor, app, Role.ADMIN)
        with pipeline_errors():
            self.deploys.deployments.settings.set_resources(app, parse_assignments(pairs, encoded=False),
                                                            self.deploys.deployments.limits)
        return {**self.resources(app), **self._restart_if_deployed(app)}

    def resources_clear(self, app: str) -> dict:
        self.apps.authorize(self.actor, app, Role.ADMIN)
        self.deploys.deployments.settings.set_resources(app, {}, self.deploys.deployments.limits)
        return {**self.resources(app), **self._restart_if_deployed(app)}

    def _restart_if_deployed(self, app: str) -> dict:
        lines, say = self._collect()
        with pipeline_errors():
            record = self.deploys.run(self.deploys.deployments.restart(app, say, self.actor.name))
        return {"restarted": f"v{record.version}" if record else None, "output": lines}

    # domains and deploy settings

    def domains_list(self, app: str) -> list[dict]:
        self.apps.authorize(self.actor, app, Role.READ)
        return [{"domain": d} for d in self.deploys.deployments.hostnames(app)]

    def domains_add(self, app: str, domain: str) -> dict:
        self.apps.authorize(self.actor, app, Role.ADMIN)
        with pipeline_errors():
            self.deploys.deployments.add_domain(app, domain)
        return self._reroute(app)

    def domains_remove(self, app: str, domain: str) -> dict:
        self.apps.authorize(self.actor, app, Role.ADMIN)
        with pipeline_errors():
            self.deploys.deployments.settings.remove_domain(app, domain)
        return self._reroute(app)

    def _reroute(self, app: str) -> dict:
        hostnames = self.deploys.deployments.hostnames(app)
        self.deploys.run(self.deploys.deployments.rollout.reroute(app, hostnames))
        return {"app": app, "domains": hostnames}

    def deploy_info(self, app: str, role: Role | None) -> dict:
        """The public facts (its URL and live release); for writers also the branch that deploys."""
        latest = self.deploys.deployments.ledger.latest(app)
        info = {"url": self.deploys.deployments.platform.url(app), "release": f"v{latest.version}" if latest else None}
        if role is not None and role >= Role.WRITE:
            info["deploy_branch"] = self.deploys.deployments.settings.deploy_branch(app)
        return info
