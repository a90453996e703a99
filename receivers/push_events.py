"""A push as the rest of DevFlow sees it: who pushed which ref updates to which app."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

ZERO_OID = "0" * 40


@dataclass(frozen=True)
class RefUpdate:
    ref: str
    old: str
    new: str

    @property
    def created(self) -> bool:
        return self.old == ZERO_OID

    @property
    def deleted(self) -> bool:
        return self.new == ZERO_OID

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix("refs/tags/") if self.ref.startswith("refs/tags/") else None

    def describe(self) -> str:
        name = self.branch or self.tag or self.ref
        if self.created:
            return f"{name}: new at {self.new[:7]}"
        if self.deleted:
            return f"{name}: deleted (was {self.old[:7]})"
        return f"{name}: {self.old[:7]}..{self.new[:7]}"


@dataclass(frozen=True)
class PushEvent:
    """Sent while the push is still open, before its refs move.

    `object_env` names the git object directories (including the push's quarantine)
    in which the pushed commits can be read, as GIT_* environment variables.
    """

    id: str
    app: str
    user: str
    transport: str
    updates: tuple[RefUpdate, ...]
    options: tuple[str, ...] = ()
    object_env: dict[str, str] = field(default_factory=dict)


class PushRejected(Exception):
    """Raised by a push handler to refuse the whole push; the reason reaches the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reply(Protocol):
    """Lines written here appear in the client's push output as `remote:` lines."""

    def say(self, line: str) -> None: ...
