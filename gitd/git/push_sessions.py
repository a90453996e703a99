"""Pushes in flight: the pack process gets a session id, and its hook reports under it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gitd.identity.roles import Actor


@dataclass(frozen=True)
class PushSession:
    id: str
    app: str
    actor: Actor
    transport: str


class PushSessions:
    def __init__(self) -> None:
        self._open: dict[str, PushSession] = {}

    @contextmanager
    def open(self, app: str, actor: Actor, transport: str) -> Iterator[PushSession]:
        # The id is unguessable: only the pack process we started learns it.
        session = PushSession(secrets.token_urlsafe(18), app, actor, transport)
        self._open[session.id] = session
        try:
            yield session
        finally:
            del self._open[session.id]

    def get(self, session_id: str) -> PushSession | None:
        return self._open.get(session_id)
