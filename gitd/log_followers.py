"""Who is following a log (`logs -f`) right now: each follower holds a connection and polls a file for as long
as it likes, so their number is bounded, in all and per user."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gitd.errors import TooMany
from pipeline.limits import Limits


class LogFollowers:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._per_user: dict[str, int] = {}

    def admit(self, user: str, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """`lines`, counted as one follower of `user`'s until it ends; refused at once past a limit."""
        if self._per_user.get(user, 0) >= self.limits.max_log_followers_per_user:
            raise TooMany(str(self.limits.refuse("max_log_followers_per_user",
                                                 f"{user} follows {self._per_user[user]} logs already")))
        if sum(self._per_user.values()) >= self.limits.max_log_followers:
            raise TooMany(str(self.limits.refuse("max_log_followers", "too many logs are being followed")))
        self._per_user[user] = self._per_user.get(user, 0) + 1
        return self._counted(user, lines)

    async def _counted(self, user: str, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for line in lines:
                yield line
        finally:
            self._per_user[user] -= 1
            if not self._per_user[user]:
                del self._per_user[user]
