"""Deployments: a commit (or a config change, rollback, scale) becomes a live release.

Stages, in order: export, detect, build, release phase, health checks, cutover, postdeploy. One
deployment per app at a time, in order; a newer push supersedes one still queued; a global
semaphore bounds concurrent builds. Whatever fails, the live release keeps serving.

Everything here runs on the daemon's event loop: the database, the disk and the logs are reached
through threads (asyncio.to_thread, ProcessLogs.post), never directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from pipeline.app_uids import AppUids
from pipeline.app_workspace import KEEP_BUILDS, AppWorkspace
from pipeline.builders import Builder, BuildError, BuildResult, Sandbox
from pipeline.config_vars import ConfigVars, check_config, check_key, check_value
from pipeline.deploy_settings import DeploySettings
from pipeline.deployment_records import DeploymentRecords
from pipeline.detect import DetectError, detect
from pipeline.disk_usage import shown_size, within_disk_limit
from pipeline.errors import DeployFailed, PipelineInputError
from pipeline.limits import Limits
from pipeline.release_env import (
    Platform,
    app_json_record,
    check_environment,
    check_formation,
    check_scale,
    checks,
    formation,
    process_env,
)
from pipeline.release_ledger import ReleaseLedger, ReleaseRecord
from pipeline.remotes import RemoteResolver
from pipeline.tree_export import ExportedTree, TreeExporter
from runtime.local.scheduler import LocalScheduler
from runtime.process_logs import ProcessLogs
from runtime.rollout import ReleaseSpec, Rollout, RolloutFailed

log = logging.getLogger(__name__)

Say = Callable[[str], None]
Enter = Callable[[str, str], Awaitable[None]]
EXPECTED = (DetectError, BuildError, PipelineInputError, DeployFailed, RolloutFailed)


@dataclass(frozen=True)
class ConfigChange:
    """What a config command changed, and the release that put it live (None: stored only)."""

    changed: list[str]
    release: ReleaseRecord | None
    note: str = ""


@dataclass(frozen=True)
class _Build:
    """What a release runs: a build (an artifact and what it needs) with a config."""

    commit: str
    artifact: str
    deployment_id: int | None
    processes: dict[str, str]
    build_env: dict[str, str]
    app_json: dict

    @classmethod
    def of(cls, release: ReleaseRecord) -> _Build:
        return cls(release.commit, release.artifact, release.deployment_id, release.processes, release.build_env,
                   release.app_json)


class Deployments:
    def __init__(self, sessions: sessionmaker, ledger: ReleaseLedger, config_vars: ConfigVars,
                 settings: DeploySettings, builder: Builder, rollout: Rollout, scheduler: LocalScheduler,
                 logs: ProcessLogs, workspace: Path, platform: Platform, uids: AppUids, limits: Limits,
                 max_builds: int = 2) -> None:
        self.records = DeploymentRecords(sessions)
        self.ledger = ledger
        self.config_vars = config_vars
        self.settings = settings
        self.builder = builder
        self.rollout = rollout
        self.scheduler = scheduler
        self.logs = logs
        self.workspace = AppWorkspace(workspace)
        self.platform = platform
        self.uids = uids
        self.limits = limits
        self._builds = asyncio.Semaphore(max_builds)
        self.exporter = TreeExporter(limits, max_builds)
        self._locks: dict[str, asyncio.Lock] = {}
        self._newest_push: dict[str, int] = {}
        self._background: set[asyncio.Task] = set()

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    @asynccontextmanager
    async def _now(self, app: str) -> AsyncIterator[None]:
        """The app's lock for a command, which does not queue behind a deployment under way: it is refused, so
        that no command (and no thread serving one) waits as long as a deploy may take."""
        lock = self._lock(app)
        if lock.locked():
            raise PipelineInputError(f"a deployment of {app} is under way; try again once it is done "
                                     f"(`logs {app} -f` follows it)")
        async with lock:
            yield

    # what management commands read and set (in their own threads)

    def history(self, app: str, limit: int = 20) -> list[dict]:
        return self.records.history(app, limit)

    def add_domain(self, app: str, domain: str) -> list[str]:
        """A custom name may not sit under the platform domain (that is another app's) nor be another app's."""
        name = domain.strip().lower().rstrip(".")
        if name.endswith(f".{self.platform.domain}") or name == self.platform.domain:
            raise PipelineInputError(f"{name} is under the platform domain {self.platform.domain}; "
                                     f"{app} already answers at {app}.{self.platform.domain}")
        owner = self.settings.domain_owner(name)
        if owner is not None and owner != app:
            raise PipelineInputError(f"{name} is already a domain of another app")
        return self.settings.add_domain(app, name, self.limits)

    def hostnames(self, app: str) -> list[str]:
        return [f"{app}.{self.platform.domain}", *self.settings.domains(app)]

    # pushes

    async def deploy_push(self, app: str, commit: str, user: str, object_env: dict[str, str], say: Say,
                          detach: bool = False, *, remotes: RemoteResolver) -> None:
        """Deploy a pushed commit; raises DeployFailed. With detach, returns once queued. `remotes` resolves
        the URLs of its submodules, for the pusher."""
        deployment_id = await asyncio.to_thread(self.records.create, app, commit, user)
        say(f"-----> Deployment #{deployment_id} of {app} at {commit[:12]}")
        # The deployment's build unit holds all it runs, from the export's submodule git to the end of its build,
        # so that is killed whole, also by the next daemon if this one dies; a detached push's task owns it then.
        async with contextlib.AsyncExitStack() as unit:
            build_dir = self.workspace.build_dir(app, deployment_id)
            started = time.monotonic()
            try:
                # A new app's uid is allocated here (host-wide, with an fsync): in a thread, as every lookup.
                build_sandbox = await unit.enter_async_context(self.scheduler.build_sandbox(app, deployment_id))
                exported = await self.exporter.export(
                    app, commit, object_env, app_dir=self.workspace.root / app, target=build_dir, remotes=remotes,
                    sandbox=build_sandbox, env=await asyncio.to_thread(self.scheduler.base_env, app))
            except Exception as exc:
                if not isinstance(exc, DeployFailed):
                    log.exception("exporting %s of %s failed", commit[:12], app)
                    exc = DeployFailed("export", f"internal error ({type(exc).__name__}); the daemon log has the "
                                                 "details")
                await asyncio.to_thread(self.workspace.remove_build, app, deployment_id)
                await asyncio.to_thread(self.records.fail, deployment_id, "export", exc.message, {})
                raise exc from None
            for note in exported.notes:
                say(f"-----> {note}")
            self._newest_push[app] = deployment_id  # only an exported push may supersede a queued one
            timings = {"export": round(time.monotonic() - started, 3)}
            if detach:
                task = asyncio.create_task(self._run_detached(app, deployment_id, commit, user, exported, timings,
                                                              build_sandbox, unit.pop_all()))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                say(f"-----> Queued; follow it with: logs {app} -f")
                return
            await self._run_push(app, deployment_id, commit, user, exported, timings, say, build_sandbox)

    async def _run_detached(self, app: str, deployment_id: int, commit: str, user: str, exported: ExportedTree,
                            timings: dict, build_sandbox: Sandbox, unit: contextlib.AsyncExitStack) -> None:
        async with unit:
            try:
                await self._run_push(app, deployment_id, commit, user, exported, timings, lambda line: None,
                                     build_sandbox)
            except DeployFailed as exc:
                log.info("detached deployment #%s of %s failed: %s", deployment_id, app, exc)

    async def _run_push(self, app: str, deployment_id: int, commit: str, user: str, exported: ExportedTree,
                        timings: dict, say: Say, build_sandbox: Sandbox) -> None:
        build_dir = exported.root

        def emit(line: str) -> None:
            say(line)
            self.logs.post(app, "build", line, deployment_id)

        stage = "queued"

        async def enter(name: str, state: str) -> None:
            nonlocal stage
            stage = name
            await asyncio.to_thread(self.records.enter, deployment_id, state, name)

        serving = None
        try:
            async with self._lock(app):
                serving = await self._serving(app)
                if self._newest_push.get(app) != deployment_id:
                    await asyncio.to_thread(self.records.cancel, deployment_id, "superseded by a newer push")
                    raise DeployFailed("queued", "superseded by a newer push")
                t = time.monotonic()
                await enter("detect", "building")
                detection = await asyncio.to_thread(detect, build_dir, self.limits)
                for note in detection.notes:
                    emit(f"-----> {note}")
                timings["detect"] = round(time.monotonic() - t, 3)
                t = time.monotonic()
                await enter("build", "building")
                sandbox = await asyncio.to_thread(self.scheduler.sandbox, app)
                if sandbox is not None:
                    await asyncio.to_thread(self.workspace.adopt_trees, app, sandbox)
                    await asyncio.to_thread(sandbox.hand_over_tree, build_dir)
                cache = self.workspace.cache(app)
                # As on Heroku, the build sees the app's config vars (Django's collectstatic needs its settings);
                # the platform's PATH and locale win over them.
                build_env = {**await asyncio.to_thread(self.config_vars.get_all, app),
                             **await asyncio.to_thread(self.scheduler.base_env, app), "HOME": str(cache / "home")}

                async def run_build() -> BuildResult:
                    await exported.check_out()  # network submodules, as the app's user, into its tree
                    await exported.discard()
                    return await self.builder.build(build_dir, detection, cache, build_env,
                                                    lambda line: emit(f"       {line}"), build_sandbox)

                def over_disk(used: int) -> DeployFailed:
                    return DeployFailed("build", str(self.limits.refuse(
                        "max_disk_bytes", f"the builds and caches of {app} take {shown_size(used)}")))

                async with self._builds:
                    result = await within_disk_limit(self.workspace.root / app, self.limits.max_disk_bytes,
                                                     run_build(), over_disk)
                timings["build"] = round(time.monotonic() - t, 3)
                processes = dict(result.processes)
                release_command = processes.pop("release", None)
                config = await asyncio.to_thread(self.config_vars.get_all, app)
                build = _Build(commit, str(build_dir), deployment_id, processes, dict(result.env),
                               app_json_record(detection.app_json))
                record = await self._release(app, user, "push", f"deploy {commit[:12]}", emit, timings, enter,
                                             build, config, release_command=release_command)
                emit(f"-----> Released v{record.version} in {sum(timings.values()):.1f}s")
                emit(self._live_line(app, record))
        except Exception as exc:
            failed_stage = getattr(exc, "stage", stage)
            message = getattr(exc, "message", str(exc))
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                message = f"the disk that holds the app builds is full ({exc.strerror})"
            elif not isinstance(exc, EXPECTED):
                log.exception("deployment #%s of %s failed unexpectedly at %s", deployment_id, app, stage)
                message = f"internal error ({type(exc).__name__}); the daemon log has the details"
            if not (isinstance(exc, DeployFailed) and exc.stage == "queued"):
                await asyncio.to_thread(self.records.fail, deployment_id, failed_stage, message, timings)
            for line in message.splitlines():
                emit(f" !     {line}")
            emit(f" !     Deployment #{deployment_id} failed at {failed_stage}; {_still(serving)}")
            await asyncio.to_thread(self.workspace.remove_build, app, deployment_id)
            raise DeployFailed(failed_stage, message.splitlines()[0] if message else failed_stage) from None
        finally:
            await exported.discard()

    def _live_line(self, app: str, record: ReleaseRecord) -> str:
        if "web" in record.processes:
            return f"=====> {app} is live at {self.platform.url(app)}"
        kinds = ", ".join(sorted(record.processes)) or "no processes"
        return f"=====> {app} v{record.version} runs {kinds}; it has no web process, so nothing is routed to it"

    async def _serving(self, app: str) -> ReleaseRecord | None:
        """The release that keeps serving if what is under way fails: None when nothing runs."""
        latest = await asyncio.to_thread(self.ledger.latest, app)
        stopped = await asyncio.to_thread(self.settings.stopped, app)
        return None if latest is None or stopped else latest

    # releases

    async def _release(self, app: str, user: str, reason: str, description: str, emit: Say, timings: dict,
                       enter: Enter, build: _Build, config: Mapping[str, str], *,
                       release_command: str | None = None) -> ReleaseRecord:
        """Run the release phase, roll out, run postdeploy, then record the release. Caller holds the app lock.

        The release is recorded only once its processes serve and postdeploy passed: a failure at any stage
        leaves the ledger, the router and the processes as they were."""
        latest = await asyncio.to_thread(self.ledger.latest, app)
        version = (latest.version if latest else 0) + 1
        env = process_env(await asyncio.to_thread(self.scheduler.base_env, app), self.platform, app, version,
                          self.scheduler.home(build.artifact), build.build_env, config, build.app_json)
        check_environment(env)
        cwd = Path(build.artifact)
        t = time.monotonic()
        await enter("release", "releasing")
        for name, command in (("release", release_command), ("predeploy", build.app_json.get("predeploy"))):
            if command:
                emit(f"-----> Running {name}: {command}")
                code = await self.scheduler.run_once(app, name, command, cwd, env, lambda line: emit(f"       {line}"))
                if code != 0:
                    raise DeployFailed("release phase", f"{name} command exited with status {code}")
        timings["release"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        await enter("health checks", "releasing")
        spec = await asyncio.to_thread(self._spec, app, version, cwd, build.processes, env, build.app_json, None)
        cutover = await self.rollout.deploy(spec, lambda line: emit(f"       {line}"))
        timings["health checks"] = round(time.monotonic() - t, 3)
        try:
            await self._postdeploy(app, build, cwd, env, latest, emit, timings, enter)

            def mark(db: Session, number: int) -> None:
                if reason == "push" and build.deployment_id is not None:
                    self.records.went_live(db, build.deployment_id, number, timings)
                else:
                    self.records.serving(db, app, build.deployment_id)

            record = await asyncio.to_thread(
                self.ledger.record, app=app, commit=build.commit, artifact=build.artifact,
                deployment_id=build.deployment_id, processes=build.processes, build_env=build.build_env,
                config=dict(config), app_json=build.app_json, user=user, reason=reason, description=description,
                then=mark)
        except BaseException:
            # Whatever stopped the release (postdeploy, a database error, the daemon stopping): the router goes
            # back to what served, and the new processes stop.
            await cutover.revert()
            raise
        cutover.finish()
        # Live from here: what follows is tidying, which cannot fail the release or touch its build.
        try:
            await asyncio.to_thread(self.settings.set_stopped, app, False)
            await asyncio.to_thread(self._prune, app, build.deployment_id or 0)
        except Exception:
            log.exception("tidying up after v%s of %s failed", record.version, app)
        return record

    async def _postdeploy(self, app: str, build: _Build, cwd: Path, env: dict[str, str],
                          latest: ReleaseRecord | None, emit: Say, timings: dict, enter: Enter) -> None:
        postdeploy = build.app_json.get("postdeploy")
        if not postdeploy:
            return
        t = time.monotonic()
        await enter("postdeploy", "releasing")
        emit(f"-----> Running postdeploy: {postdeploy}")
        code = await self.scheduler.run_once(app, "postdeploy", postdeploy, cwd, env,
                                             lambda line: emit(f"       {line}"))
        if code != 0:
            back = f"routed back to v{latest.version}" if latest else "stopped the new processes"
            raise DeployFailed("postdeploy", f"postdeploy exited with status {code}; {back}")
        timings["postdeploy"] = round(time.monotonic() - t, 3)

    async def _rerelease(self, app: str, user: str, reason: str, description: str, say: Say, source: ReleaseRecord,
                         config: Mapping[str, str]) -> ReleaseRecord:
        """A new release of an existing build. Caller holds the app lock."""
        if not await asyncio.to_thread(Path(source.artifact).is_dir):
            raise PipelineInputError(f"the build of v{source.version} is no longer on disk; push again to rebuild")
        await self._adopt_trees(app)

        def emit(line: str) -> None:
            say(line)
            self.logs.post(app, "release", line)

        async def enter(stage: str, state: str) -> None:
            return None

        try:
            record = await self._release(app, user, reason, description, emit, {}, enter, _Build.of(source), config)
        except RolloutFailed as exc:
            raise DeployFailed(exc.stage, exc.message) from None
        emit(f"-----> Released v{record.version} ({reason}); live at {self.platform.url(app)}")
        return record

    async def change_config(self, app: str, user: str, values: Mapping[str, str], unset: list[str], say: Say,
                            release: bool = True) -> ConfigChange:
        """Set and unset config vars. They become the app's config only once a release with them is live: if
        that release fails, the app keeps the config its live release has, and this raises DeployFailed."""
        new_values = {check_key(k): check_value(k, v) for k, v in values.items()}
        async with self._now(app):
            current = await asyncio.to_thread(self.config_vars.get_all, app)
            config = {**current, **new_values}
            for key in unset:
                config.pop(key, None)
            check_config(config, self.limits)
            changed = sorted(k for k in {*config, *current} if config.get(k) != current.get(k))
            if not changed:
                return ConfigChange([], None, "no change: the config already has these values")
            live = await self._serving(app)
            if not release or live is None:
                await asyncio.to_thread(self.config_vars.replace, app, config)
                why = "stored, as asked (--no-restart)" if not release else \
                    "stored; nothing runs, so the next deploy or ps:start releases it"
                return ConfigChange(changed, None, why)
            description = ", ".join(f"{'unset' if k not in config else 'set'} {k}" for k in changed)
            record = await self._rerelease(app, user, "config", description, say, live, config)
            await asyncio.to_thread(self.config_vars.replace, app, config)
            return ConfigChange(changed, record)

    async def rollback(self, app: str, version: int, user: str, say: Say) -> ReleaseRecord:
        """As on Heroku, the old release's config comes back too, and stays for later releases."""
        async with self._now(app):
            target = await asyncio.to_thread(self.ledger.get, app, version)
            record = await self._rerelease(app, user, "rollback", f"rollback to v{version}", say, target,
                                           target.config)
            await asyncio.to_thread(self.config_vars.replace, app, target.config)
            return record

    async def restart(self, app: str, say: Say, user: str = "platform") -> ReleaseRecord | None:
        """Fresh processes of the live release, rolled out like a deploy; None if never deployed. Config stored
        with --no-restart (or while the app was stopped) goes live now, as a new release."""
        async with self._now(app):
            latest = await asyncio.to_thread(self.ledger.latest, app)
            if latest is None:
                return None
            config = await asyncio.to_thread(self.config_vars.get_all, app)
            if config != latest.config:
                return await self._rerelease(app, user, "config", "config stored earlier", say, latest, config)
            await self._restart(app, latest, say)
            return latest

    async def _restart(self, app: str, latest: ReleaseRecord, say: Say,
                       formation_override: Mapping[str, int] | None = None) -> None:
        await self._adopt_trees(app)
        env = process_env(await asyncio.to_thread(self.scheduler.base_env, app), self.platform, app,
                          latest.version, self.scheduler.home(latest.artifact), latest.build_env, latest.config,
                          latest.app_json)
        spec = await asyncio.to_thread(self._spec, app, latest.version, Path(latest.artifact), latest.processes,
                                       env, latest.app_json, formation_override)
        try:
            cutover = await self.rollout.deploy(spec, say)
        except RolloutFailed as exc:
            raise DeployFailed(exc.stage, exc.message) from None
        cutover.finish()
        await asyncio.to_thread(self.settings.set_stopped, app, False)

    async def scale(self, app: str, counts: Mapping[str, int], say: Say) -> tuple[dict[str, int], bool]:
        """ps:scale: the formation (only the live release's process types, within the limits), rolled out
        without downtime and stored once it runs; no new release, as on Heroku. Returns it, and whether
        anything changed."""
        async with self._now(app):
            latest = await asyncio.to_thread(self.ledger.latest, app)
            if latest is None:
                raise PipelineInputError(f"{app} has not been deployed yet: push it first, then scale")
            scaled = await asyncio.to_thread(self.settings.formation, app)
            before = formation(latest.processes, latest.app_json, scaled)
            check_scale(counts, latest.processes, before, self.limits)
            after = formation(latest.processes, latest.app_json, {**scaled, **counts})
            if after == before:
                return after, False
            if await self._serving(app) is not None:
                await self._restart(app, latest, say, formation_override=after)
            await asyncio.to_thread(self.settings.scale, app, counts)
            return after, True

    async def stop(self, app: str) -> None:
        """ps:stop: the processes stop, and stay stopped across daemon restarts until ps:start or a deploy."""
        async with self._now(app):
            await asyncio.to_thread(self.settings.set_stopped, app, True)
            await self.rollout.stop_app(app, await asyncio.to_thread(self.hostnames, app))

    async def restore(self) -> None:
        """At daemon start: what a previous daemon left unfinished fails, its processes are killed and its builds
        removed; then route to app processes that kept running, restart the rest at their last release."""
        interrupted = await asyncio.to_thread(self.records.fail_interrupted)
        await self.scheduler.stop_leftover_tasks()
        for app, deployment_id in interrupted:
            await asyncio.to_thread(self.workspace.remove_build, app, deployment_id)
        for app in await asyncio.to_thread(self.ledger.apps):
            latest = await asyncio.to_thread(self.ledger.latest, app)
            if latest is None:
                continue
            hostnames = await asyncio.to_thread(self.hostnames, app)
            if await asyncio.to_thread(self.settings.stopped, app):
                await self.rollout.stop_app(app, hostnames)
                continue
            # Processes running as another user than the app's now are restarted, not adopted: its files change
            # hands before the new processes start.
            sandbox = await asyncio.to_thread(self.scheduler.sandbox, app)
            owner_changed = await asyncio.to_thread(self.workspace.owner_changed, app, sandbox)
            if not owner_changed and await self.rollout.adopt(app, latest.version, hostnames,
                                                              checks(latest.app_json)):
                log.info("re-adopted the running processes of %s v%s", app, latest.version)
                continue
            try:
                await self.restart(app, lambda line: None)
            except (DeployFailed, PipelineInputError) as exc:
                log.error("could not bring %s back at v%s: %s", app, latest.version, exc)

    async def destroy(self, app: str) -> None:
        async with self._lock(app):
            await self.rollout.stop_app(app)
            await asyncio.to_thread(self.workspace.remove, app)
            for store in (self.config_vars, self.settings, self.ledger, self.logs, self.uids, self.records):
                await asyncio.to_thread(store.forget, app)
        self._locks.pop(app, None)
        self._newest_push.pop(app, None)

    # helpers

    def _prune(self, app: str, newest: int) -> None:
        """From a thread: old builds (but rollback targets), deployments and their logs, releases."""
        in_use = self.ledger.artifacts_in_use(app, KEEP_BUILDS)
        self.workspace.prune_builds(app, newest, in_use)
        self.logs.forget_deployments(app, self.records.prune(app, self.limits.max_history))
        self.ledger.prune(app, self.limits.max_history)

    async def _adopt_trees(self, app: str) -> None:
        sandbox = await asyncio.to_thread(self.scheduler.sandbox, app)
        await asyncio.to_thread(self.workspace.adopt_trees, app, sandbox)

    def _spec(self, app: str, version: int, cwd: Path, processes: dict[str, str], env: dict[str, str],
              app_json: dict, formation_override: Mapping[str, int] | None) -> ReleaseSpec:
        """From a thread: it reads the app's settings."""
        counts = formation_override or formation(processes, app_json, self.settings.formation(app))
        check_formation(counts, self.limits)
        return ReleaseSpec(app=app, version=version, cwd=cwd, processes=processes, env=env, formation=counts,
                           hostnames=self.hostnames(app), healthchecks=checks(app_json),
                           limits=self.settings.resources(app))


def _still(serving: ReleaseRecord | None) -> str:
    if serving is None:
        return "nothing was running before, so nothing is served"
    return f"the live release v{serving.version} keeps serving"
