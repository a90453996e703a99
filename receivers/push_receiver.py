"""Receives push events and hands them to whoever subscribed (the pipeline, from issue 3 on)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from receivers.push_events import PushEvent, Reply

log = logging.getLogger(__name__)

PushHandler = Callable[[PushEvent, Reply], Awaitable[None]]


class PushReceiver:
    def __init__(self) -> None:
        self._handlers: list[PushHandler] = []

    def subscribe(self, handler: PushHandler) -> None:
        self._handlers.append(handler)

    async def receive(self, event: PushEvent, reply: Reply) -> None:
        """Acknowledge the push, then run each handler in order; PushRejected refuses it."""
        log.info("push %s to %s by %s: %s", event.id, event.app, event.user,
                 ", ".join(u.describe() for u in event.updates))
        reply.say(f"DevFlow: {event.app} received {len(event.updates)} ref update(s) from {event.user}")
        for update in event.updates:
            reply.say(f"  {update.describe()}")
        if event.options:
            reply.say(f"  push options: {', '.join(event.options)}")
        for handler in self._handlers:
            await handler(event, reply)
