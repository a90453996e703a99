"""Deployments: a commit (or a config change, rollback, scale) becomes a live release.

Stages, in order: export, detect, build, release phase, health checks, cutover. One
deployment per app at a time, in order; a newer push supersedes one still queued; a
global semaphore bounds concurrent builds. Whatever fails, the live release keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import sessionmaker

from pipeline.app_json import AppJson
from pipeline.app_uids import AppUids
from pipeline.builders import Builder, BuildError
from pipeline.config_vars import ConfigVars
from pipeline.deploy_settings import DeploySettings
from pipeline.detect import DetectError, detect
from pipeline.errors import DeployFailed, PipelineInputError
from pipeline.release_ledger import ReleaseLedger, ReleaseRecord
from pipeline.schema import Deployment
from pipeline.tree_export import LocalRepo, export_tree
from runtime.health import Check
from runtime.local.app_user import nobody_uid
from runtime.local.scheduler import LocalScheduler
from runtime.process_logs import ProcessLogs
from runtime.rollout import ReleaseSpec, Rollout, RolloutFailed

log = logging.getLogger(__name__)

Say = Callable[[str], None]
KEEP_BUILDS = 5
OWNER_RECORD = "owner"
"""In an app's directory, root's: the uid its builds and caches belong to."""


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Platform:
    """What the platform tells every process about where it runs."""

    domain: str
    router_port: int

    def url(self, app: str) -> str:
        port = "" if self.router_port == 80 else f":{self.router_port}"
        return f"http://{app}.{self.domain}{port}"


class Deployments:
    def __init__(self, sessions: sessionmaker, ledger: ReleaseLedger, config_vars: ConfigVars,
                 settings: DeploySettings, builder: Builder, rollout: Rollout, scheduler: LocalScheduler,
                 logs: ProcessLogs, workspace: Path, platform: Platform, uids: AppUids, max_builds: int = 2,
                 ) -> None:
        self.sessions = sessions
        self.ledger = ledger
        self.config_vars = config_vars
        self.settings = settings
        self.builder = builder
        self.rollout = rollout
        self.scheduler = scheduler
        self.logs = logs
        self.workspace = workspace
        self.platform = platform
        self.uids = uids
        self._builds = asyncio.Semaphore(max_builds)
        self._locks: dict[str, asyncio.Lock] = {}
        self._newest_push: dict[str, int] = {}
        self._background: set[asyncio.Task] = set()

    # records

    def _create(self, app: str, commit: str, user: str) -> int:
        with self.sessions.begin() as db:
            row = Deployment(app=app, commit=commit, user=user, state="queued", stage="", error="", timings={},
                             created_at=now())
            db.add(row)
            db.flush()
            return row.id

    def _forget_deployments(self, app: str) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(Deployment).where(Deployment.app == app))

    def fail_interrupted(self) -> list[tuple[str, int]]:
        """At start: deployments a previous daemon left unfinished did not go live; (app, id) of each."""
        unfinished = Deployment.state.in_(("queued", "building", "releasing"))
        with self.sessions.begin() as db:
            interrupted = list(db.execute(select(Deployment.app, Deployment.id).where(unfinished)).tuples())
            db.execute(update(Deployment).where(unfinished)
                       .values(state="failed", error="the daemon stopped during this deployment", finished_at=now()))
        return interrupted

    def _update(self, deployment_id: int, **changes) -> None:
        with self.sessions.begin() as db:
            row = db.get(Deployment, deployment_id)
            for key, value in changes.items():
                setattr(row, key, value)

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    def add_domain(self, app: str, domain: str) -> list[str]:
        """A custom name may not sit under the platform domain (that is another app's) nor be another app's."""
        name = domain.strip().lower().rstrip(".")
        if name.endswith(f".{self.platform.domain}") or name == self.platform.domain:
            raise PipelineInputError(f"{name} is under the platform domain {self.platform.domain}; "
                                     f"{app} already answers at {app}.{self.platform.domain}")
        owner = self.settings.domain_owner(name)
        if owner is not None and owner != app:
            raise PipelineInputError(f"{name} is already a domain of another app")
        return self.settings.add_domain(app, name)

    def hostnames(self, app: str) -> list[str]:
        return [f"{app}.{self.platform.domain}", *self.settings.domains(app)]

    def _log_path(self, app: str, deployment_id: int) -> Path:
        path = self.workspace / app / "logs" / f"deploy-{deployment_id}.log"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # build output is the app's business only
        return path

    def history(self, app: str, limit: int = 20) -> list[dict]:
        with self.sessions() as db:
            rows = db.scalars(select(Deployment).where(Deployment.app == app)
                              .order_by(Deployment.id.desc()).limit(limit))
            return [{"id": r.id, "commit": r.commit[:12], "user": r.user, "state": r.state, "stage": r.stage,
                     "release": f"v{r.release_version}" if r.release_version else None,
                     "seconds": round(sum(r.timings.values()), 2) if r.timings else None, "timings": r.timings,
                     "error": r.error, "created_at": r.created_at.isoformat(timespec="seconds")} for r in rows]

    # pushes

    async def deploy_push(self, app: str, commit: str, user: str, object_env: dict[str, str], say: Say,
                          detach: bool = False, local_repo: LocalRepo = lambda url: None) -> None:
        """Deploy a pushed commit; raises DeployFailed. With detach, returns once queued."""
        deployment_id = await asyncio.to_thread(self._create, app, commit, user)
        say(f"-----> Deployment #{deployment_id} of {app} at {commit[:12]}")
        build_dir = self.workspace / app / "builds" / f"{deployment_id}"
        started = time.monotonic()
        try:
            notes = await asyncio.to_thread(export_tree, object_env, commit, build_dir, local_repo)
        except Exception as exc:
            if not isinstance(exc, DeployFailed):
                log.exception("exporting %s of %s failed", commit[:12], app)
                exc = DeployFailed("export", f"internal error ({type(exc).__name__}); the daemon log has the details")
            await asyncio.to_thread(shutil.rmtree, build_dir, ignore_errors=True)
            await asyncio.to_thread(self._update, deployment_id, state="failed", stage="export", error=exc.message,
                                    finished_at=now())
            raise exc from None
        for note in notes:
            say(f"-----> {note}")
        self._newest_push[app] = deployment_id  # only an exported push may supersede a queued one
        timings = {"export": round(time.monotonic() - started, 3)}
        if detach:
            task = asyncio.create_task(self._run_detached(app, deployment_id, commit, user, build_dir, timings))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            say(f"-----> Queued; follow it with: logs {app} -f")
            return
        await self._run_push(app, deployment_id, commit, user, build_dir, timings, say)

    async def _run_detached(self, app: str, deployment_id: int, commit: str, user: str, build_dir: Path,
                            timings: dict) -> None:
        try:
            await self._run_push(app, deployment_id, commit, user, build_dir, timings, lambda line: None)
        except DeployFailed as exc:
            log.info("detached deployment #%s of %s failed: %s", deployment_id, app, exc)

    async def _run_push(self, app: str, deployment_id: int, commit: str, user: str, build_dir: Path,
                        timings: dict, say: Say) -> None:
        log_file = self._log_path(app, deployment_id).open("a")

        def emit(line: str) -> None:
            say(line)
            log_file.write(line + "\n")
            log_file.flush()
            self.logs.write(app, "build", line)

        stage = "queued"

        def enter(name: str, state: str) -> float:
            nonlocal stage
            stage = name
            self._update(deployment_id, state=state, stage=name)
            return time.monotonic()

        try:
            async with self._lock(app):
                if self._newest_push.get(app) != deployment_id:
                    self._update(deployment_id, state="cancelled", error="superseded by a newer push",
                                 finished_at=now())
                    raise DeployFailed("queued", "superseded by a newer push")
                t = enter("detect", "building")
                detection = await asyncio.to_thread(detect, build_dir)
                for note in detection.notes:
                    emit(f"-----> {note}")
                timings["detect"] = round(time.monotonic() - t, 3)
                t = enter("build", "building")
                cache = self.workspace / app / "cache"
                sandbox = self.scheduler.sandbox(app)
                if sandbox is not None:
                    await self._adopt_trees(app)
                    await asyncio.to_thread(sandbox.hand_over_tree, build_dir)
                async with self._builds, self.scheduler.build_sandbox(app, deployment_id) as build_sandbox:
                    result = await self.builder.build(build_dir, detection, cache,
                                                      {**self.scheduler.base_env(app), "HOME": str(cache / "home")},
                                                      lambda line: emit(f"       {line}"), build_sandbox)
                timings["build"] = round(time.monotonic() - t, 3)
                processes = dict(result.processes)
                release_command = processes.pop("release", None)
                record = await self._release(
                    app, user, "push", f"deploy {commit[:12]}", emit, timings, enter,
                    commit=commit, artifact=str(build_dir), processes=processes, build_env=dict(result.env),
                    config=self.config_vars.get_all(app), app_json=_app_json_dict(detection.app_json),
                    release_command=release_command,
                )
                self._update(deployment_id, state="live", stage="", timings=timings,
                             release_version=record.version, finished_at=now())
                emit(f"-----> Released v{record.version} in {sum(timings.values()):.1f}s")
                emit(f"=====> {app} is live at {self.platform.url(app)}")
                await asyncio.to_thread(self._prune_builds, app, deployment_id)
        except Exception as exc:
            failed_stage = getattr(exc, "stage", stage)
            message = getattr(exc, "message", str(exc))
            if not isinstance(exc, (DetectError, BuildError, PipelineInputError, DeployFailed, RolloutFailed)):
                log.exception("deployment #%s of %s failed unexpectedly at %s", deployment_id, app, stage)
                message = f"internal error ({type(exc).__name__}); the daemon log has the details"
            if not (isinstance(exc, DeployFailed) and exc.stage == "queued"):
                self._update(deployment_id, state="failed", stage=failed_stage, error=message, timings=timings,
                             finished_at=now())
            for line in message.splitlines():
                emit(f" !     {line}")
            emit(f" !     Deployment #{deployment_id} failed at {failed_stage}; the live release keeps serving")
            shutil.rmtree(build_dir, ignore_errors=True)
            raise DeployFailed(failed_stage, message.splitlines()[0] if message else failed_stage) from None
        finally:
            log_file.close()

    # releases of an existing artifact: config changes, rollback, scale, restart

    async def _release(self, app: str, user: str, reason: str, description: str, emit: Say, timings: dict,
                       enter: Callable[[str, str], float], *, commit: str, artifact: str,
                       processes: dict[str, str], build_env: dict[str, str], config: dict[str, str],
                       app_json: dict, release_command: str | None = None) -> ReleaseRecord:
        """Run the release phase, roll out, then record the release. Caller holds the app lock."""
        latest = self.ledger.latest(app)
        version = (latest.version if latest else 0) + 1
        env = self._process_env(app, version, artifact, build_env, config, app_json)
        cwd = Path(artifact)
        t = enter("release", "releasing")
        for name, command in (("release", release_command), ("predeploy", app_json.get("predeploy"))):
            if command:
                emit(f"-----> Running {name}: {command}")
                code = await self.scheduler.run_once(app, name, command, cwd, env, lambda line: emit(f"       {line}"))
                if code != 0:
                    raise DeployFailed("release phase", f"{name} command exited with status {code}")
        timings["release"] = round(time.monotonic() - t, 3)
        t = enter("health checks", "releasing")
        await self.rollout.deploy(self._spec(app, version, cwd, processes, env, app_json),
                                  lambda line: emit(f"       {line}"))
        self.settings.set_stopped(app, False)
        timings["health checks"] = round(time.monotonic() - t, 3)
        record = self.ledger.record(app=app, commit=commit, artifact=artifact, processes=processes,
                                    build_env=build_env, config=config, app_json=app_json, user=user, reason=reason,
                                    description=description)
        if app_json.get("postdeploy"):
            emit(f"-----> Running postdeploy: {app_json['postdeploy']}")
            code = await self.scheduler.run_once(app, "postdeploy", app_json["postdeploy"], cwd, env,
                                                 lambda line: emit(f"       {line}"))
            if code != 0:
                emit(f" !     postdeploy exited with status {code}; v{version} is live regardless")
        return record

    async def rerelease(self, app: str, user: str, reason: str, description: str, say: Say, *,
                        config: dict[str, str] | None = None,
                        source: ReleaseRecord | None = None) -> ReleaseRecord | None:
        """A new release of an existing build: config change, rollback, scale, restart. None if never deployed."""
        async with self._lock(app):
            base = source or self.ledger.latest(app)
            if base is None:
                return None
            if not Path(base.artifact).is_dir():
                raise PipelineInputError(f"the build of v{base.version} is no longer on disk; push again to rebuild")
            await self._adopt_trees(app)

            def emit(line: str) -> None:
                say(line)
                self.logs.write(app, "release", line)

            try:
                record = await self._release(
                    app, user, reason, description, emit, {}, lambda stage, state: time.monotonic(),
                    commit=base.commit, artifact=base.artifact,
                    processes=base.processes, build_env=base.build_env,
                    config=self.config_vars.get_all(app) if config is None else config, app_json=base.app_json,
                )
            except RolloutFailed as exc:
                raise DeployFailed(exc.stage, exc.message) from None
            emit(f"-----> Released v{record.version} ({reason}); live at {self.platform.url(app)}")
            return record

    async def restart(self, app: str, say: Say) -> ReleaseRecord | None:
        """Fresh processes of the live release, rolled out like a deploy; no new release."""
        async with self._lock(app):
            latest = self.ledger.latest(app)
            if latest is None:
                return None
            await self._adopt_trees(app)
            env = self._process_env(app, latest.version, latest.artifact, latest.build_env, latest.config,
                                    latest.app_json)
            try:
                await self.rollout.deploy(self._spec(app, latest.version, Path(latest.artifact), latest.processes,
                                                     env, latest.app_json), say)
            except RolloutFailed as exc:
                raise DeployFailed(exc.stage, exc.message) from None
            self.settings.set_stopped(app, False)
            return latest

    async def stop(self, app: str) -> None:
        """ps:stop: the processes stop, and stay stopped across daemon restarts until ps:start or a deploy."""
        async with self._lock(app):
            self.settings.set_stopped(app, True)
            await self.rollout.stop_app(app, self.hostnames(app))

    async def rollback(self, app: str, version: int, user: str, say: Say) -> ReleaseRecord | None:
        """As on Heroku, the old release's config comes back too, and stays for later releases."""
        target = self.ledger.get(app, version)
        record = await self.rerelease(app, user, "rollback", f"rollback to v{version}", say,
                                      config=target.config, source=target)
        await asyncio.to_thread(self.config_vars.replace, app, target.config)
        return record

    async def restore(self) -> None:
        """At daemon start: what a previous daemon left unfinished fails, its processes are killed and its builds
        removed; then route to app processes that kept running, restart the rest at their last release."""
        interrupted = await asyncio.to_thread(self.fail_interrupted)
        await self.scheduler.stop_leftover_tasks()
        await asyncio.to_thread(self._remove_builds, interrupted)
        for app in await asyncio.to_thread(self.ledger.apps):
            latest = self.ledger.latest(app)
            if latest is None:
                continue
            if self.settings.stopped(app):
                await self.rollout.stop_app(app, self.hostnames(app))
                continue
            # Processes running as another user than the app's now are restarted, not adopted: its files change
            # hands before the new processes start.
            if not self._owner_changed(app) and await self.rollout.adopt(app, latest.version, self.hostnames(app),
                                                                         _checks(latest.app_json)):
                log.info("re-adopted the running processes of %s v%s", app, latest.version)
                continue
            try:
                await self.restart(app, lambda line: None)
            except (DeployFailed, PipelineInputError) as exc:
                log.error("could not bring %s back at v%s: %s", app, latest.version, exc)

    def _remove_builds(self, deployments: list[tuple[str, int]]) -> None:
        """The build directories of interrupted deployments, unless a release took one (the daemon stopped between
        recording the release and marking the deployment live)."""
        for app, deployment_id in deployments:
            build = self.workspace / app / "builds" / str(deployment_id)
            if build.is_dir() and str(build) not in self.ledger.artifacts_in_use(app, KEEP_BUILDS):
                shutil.rmtree(build, ignore_errors=True)
                log.info("removed the build of deployment #%s of %s, which the daemon's stop interrupted",
                         deployment_id, app)

    async def destroy(self, app: str) -> None:
        async with self._lock(app):
            await self.rollout.stop_app(app)
            shutil.rmtree(self.workspace / app, ignore_errors=True)
            for store in (self.config_vars, self.settings, self.ledger, self.logs, self.uids):
                await asyncio.to_thread(store.forget, app)
            await asyncio.to_thread(self._forget_deployments, app)
        self._locks.pop(app, None)
        self._newest_push.pop(app, None)

    # helpers

    async def _adopt_trees(self, app: str) -> None:
        """The app's builds and caches become its user's if another user made them: DevFlow ran every app as
        `nobody` before apps had uids of their own, and `--app-user` may change. A record the app cannot write
        says whose they are."""
        user = self.scheduler.sandbox(app)
        previous = self._recorded_owner(app)
        if user is None or previous == user.uid:
            return
        if previous is None:  # made before the record: by the one user every app ran as then
            previous = nobody_uid()
        for tree in [self.workspace / app / "cache", *(self.workspace / app / "builds").glob("*")]:
            if tree.is_dir() and not tree.is_symlink():
                await asyncio.to_thread(user.hand_over_tree, tree, previous)
        record = self.workspace / app / OWNER_RECORD
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{user.uid}\n")

    def _owner_changed(self, app: str) -> bool:
        """The app's trees belong to another user than the one it runs as now (see `_adopt_trees`)."""
        user = self.scheduler.sandbox(app)
        return user is not None and self._recorded_owner(app) != user.uid

    def _recorded_owner(self, app: str) -> int | None:
        try:
            return int((self.workspace / app / OWNER_RECORD).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _process_env(self, app: str, version: int, artifact: str, build_env: dict[str, str],
                     config: dict[str, str], app_json: dict) -> dict[str, str]:
        # HOME is the app's own directory, as on Heroku (/app): its uid may have no passwd entry to find one.
        env = {**self.scheduler.base_env(app), "HOME": self.scheduler.home(artifact), **app_json.get("env", {}),
               **build_env, **config}
        env.update(DEVFLOW_APP=app, DEVFLOW_RELEASE=f"v{version}", DEVFLOW_URL=self.platform.url(app))
        return env

    def _spec(self, app: str, version: int, cwd: Path, processes: dict[str, str], env: dict[str, str],
              app_json: dict) -> ReleaseSpec:
        return ReleaseSpec(app=app, version=version, cwd=cwd, processes=processes, env=env,
                           formation=self._formation(app, processes, app_json), hostnames=self.hostnames(app),
                           healthchecks=_checks(app_json), limits=self.settings.resources(app))

    def _formation(self, app: str, processes: dict[str, str], app_json: dict) -> dict[str, int]:
        formation = {kind: 1 if kind == "web" else 0 for kind in processes}
        formation.update({k: v for k, v in app_json.get("formation", {}).items() if k in processes})
        formation.update({k: v for k, v in self.settings.formation(app).items() if k in processes})
        return formation

    def _prune_builds(self, app: str, newest: int) -> None:
        """Keep the builds of recent releases (rollback targets); never touch queued newer ones."""
        keep = self.ledger.artifacts_in_use(app, KEEP_BUILDS)
        for build in (self.workspace / app / "builds").glob("*"):
            if build.name.isdigit() and int(build.name) < newest and str(build) not in keep:
                shutil.rmtree(build, ignore_errors=True)


def _app_json_dict(app_json: AppJson) -> dict:
    """The parts of app.json a release keeps, as plain JSON."""
    return {
        "healthchecks": {kind: [asdict(c) for c in checks] for kind, checks in app_json.healthchecks.items()},
        "predeploy": app_json.predeploy,
        "postdeploy": app_json.postdeploy,
        "formation": dict(app_json.formation),
        "env": dict(app_json.env),
    }


def _checks(app_json: dict) -> dict[str, list[Check]]:
    """A release's health checks by process type, from the app.json it keeps."""
    return {kind: [Check(**c) for c in entries] for kind, entries in app_json.get("healthchecks", {}).items()}
