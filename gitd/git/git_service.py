"""The git front door shared by SSH and HTTP: resolve the repository, authorize, run the pack program."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from gitd.apps import AppRegistry, check_app_name
from gitd.errors import InvalidInput
from gitd.git.pack_backend import PackBackend, Service
from gitd.git.pack_process import PackProcess
from gitd.git.push_sessions import PushSessions
from gitd.identity.roles import Actor, Role

log = logging.getLogger(__name__)


def app_from_repo_path(path: str) -> str:
    """'/myapp.git', 'myapp.git', '~/myapp' -> 'myapp'; anything else is refused."""
    name = path.strip()
    name = name.removeprefix("~/").lstrip("/").rstrip("/").removesuffix(".git")
    try:
        return check_app_name(name)
    except InvalidInput:
        raise InvalidInput(f"invalid repository path {path[:80]!r}: use /APP.git with a valid app name") from None


class GitService:
    def __init__(self, apps: AppRegistry, backend: PackBackend, sessions: PushSessions, hook_socket: Path) -> None:
        self.apps = apps
        self.backend = backend
        self.sessions = sessions
        self.hook_socket = hook_socket
        self._push_locks: dict[str, asyncio.Lock] = {}

    async def authorize(self, actor: Actor, repo_path: str, service: Service) -> str:
        """Return the app name; a push may create the app (push-to-create)."""
        app = app_from_repo_path(repo_path)
        if service == "receive-pack":
            created = await asyncio.to_thread(self.apps.ensure_for_push, actor, app)
            if created:
                log.info("push by %s created app %s", actor.name, app)
        else:
            await asyncio.to_thread(self.apps.authorize, actor, app, Role.READ)
        return app

    def protocol(self, requested: str | None) -> str | None:
        """The GIT_PROTOCOL value the pack program will honour; clients fall back to v0 without one."""
        return requested if requested and self.backend.protocol_v2 else None

    @asynccontextmanager
    async def exchange(
        self, actor: Actor, app: str, service: Service, transport: str, *,
        protocol: str | None, stateless: bool, advertise: bool, on_stderr: Callable[[bytes], Awaitable[None]],
    ) -> AsyncIterator[PackProcess]:
        repo = self.apps.repositories.path(app)
        env: dict[str, str] = {}
        if protocol := self.protocol(protocol):
            env["GIT_PROTOCOL"] = protocol
        pushing = service == "receive-pack" and not advertise
        async with AsyncExitStack() as stack:
            if pushing:
                # One push per app at a time, from pack to ref update: a deploy that goes live in one
                # push's hook is always followed by that push's own ref update, never by another's.
                await stack.enter_async_context(self._push_locks.setdefault(app, asyncio.Lock()))
                session = stack.enter_context(self.sessions.open(app, actor, transport))
                env.update(DEVFLOW_PUSH_ID=session.id, DEVFLOW_HOOK_SOCKET=str(self.hook_socket))
            argv = self.backend.command(service, repo, stateless=stateless, advertise=advertise)
            process = await PackProcess.start(argv, env, on_stderr)
            try:
                yield process
            finally:
                process.kill()
                await process.wait()
                if pushing:
                    await asyncio.to_thread(self.apps.repositories.point_head_at_existing_branch, app)
