"""Decides whether a push may land: gitd's own ref rules, then the receivers."""

from __future__ import annotations

import asyncio
import logging

from gitd.apps import AppRegistry
from gitd.git.pack_backend import PackBackend
from gitd.git.push_sessions import PushSession
from receivers.push_events import PushEvent, PushRejected, RefUpdate, Reply
from receivers.push_receiver import PushReceiver

log = logging.getLogger(__name__)


class PushGate:
    def __init__(self, apps: AppRegistry, backend: PackBackend, receiver: PushReceiver) -> None:
        self.apps = apps
        self.backend = backend
        self.receiver = receiver

    async def check(
        self, session: PushSession, updates: list[RefUpdate], options: list[str],
        object_env: dict[str, str], reply: Reply,
    ) -> None:
        """Raise PushRejected with a reason the pusher can act on."""
        for update in updates:
            await self._check_protected(session.app, update, object_env)
        event = PushEvent(
            id=session.id, app=session.app, user=session.actor.name, transport=session.transport,
            updates=tuple(updates), options=tuple(options), object_env=object_env,
        )
        await self.receiver.receive(event, reply)

    async def _check_protected(self, app: str, update: RefUpdate, object_env: dict[str, str]) -> None:
        if update.branch is None or update.created:
            return
        if not await asyncio.to_thread(self.apps.is_protected, app, update.branch):
            return
        if update.deleted:
            raise PushRejected(f"branch {update.branch} is protected and cannot be deleted")
        repo = self.apps.repositories.path(app)
        if not await self.backend.is_ancestor(repo, update.old, update.new, object_env):
            raise PushRejected(
                f"branch {update.branch} is protected: non-fast-forward updates are refused; "
                "pull and merge (or rebase) first"
            )
