"""A push to an app's deploy branch means a production deployment, decided while the push is open."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from dulwich.repo import Repo

from pipeline.deploy_settings import DeploySettings
from pipeline.deployments import Deployments
from pipeline.errors import DeployFailed
from receivers.push_events import PushEvent, PushRejected, Reply


def _server_branches(git_dir: str | None) -> set[str]:
    if not git_dir:
        return set()
    with Repo(git_dir) as repo:
        return {ref.decode() for ref in repo.refs.keys(base=b"refs/heads/")}


class DeployOnPush:
    def __init__(self, deployments: Deployments, settings: DeploySettings,
                 sibling_repo: Callable[[str, str, str], Path | None]) -> None:
        """`sibling_repo(user, app, url)`: the repository a relative submodule URL names, if the user can read it."""
        self.deployments = deployments
        self.settings = settings
        self.sibling_repo = sibling_repo

    async def __call__(self, event: PushEvent, reply: Reply) -> None:
        pushed = {u.branch for u in event.updates if u.branch}
        existing = await asyncio.to_thread(_server_branches, event.object_env.get("GIT_DIR"))
        branch = await asyncio.to_thread(self.settings.deploy_branch, event.app, pushed | existing)
        for update in event.updates:
            if update.branch != branch:
                continue
            if update.deleted:
                raise PushRejected(f"{branch} is the deploy branch of {event.app}; "
                                   f"to take the app down use apps:destroy {event.app}")
            try:
                await self.deployments.deploy_push(
                    event.app, update.new, event.user, event.object_env, reply.say, detach="detach" in event.options,
                    local_repo=lambda url: self.sibling_repo(event.user, event.app, url))
            except DeployFailed as exc:
                raise PushRejected(f"deploy failed at {exc.stage}: {exc.message}") from None
