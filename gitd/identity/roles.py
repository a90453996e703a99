"""Per-app roles and what each allows."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from gitd.errors import InvalidInput


class Role(IntEnum):
    """Ordered: each role can do what the ones below it can."""

    READ = 1  # clone and fetch
    WRITE = 2  # push
    ADMIN = 3  # manage the app and its collaborators

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise InvalidInput(f"unknown role {text!r}; use read, write or admin") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Actor:
    """An authenticated user, as every permission check sees them."""

    user_id: int
    name: str
    is_admin: bool
    can_create_apps: bool
    via: str = ""  # "ssh-key SHA256:...", "token dfp_abcd", "local"
