"""What a repository URL a user named (a submodule's, say) stands for, as the pipeline fetches it.

Either an app on this DevFlow, whose repository the daemon reads itself once the user's read permission
is checked, or a network remote, fetched only as the app's own user over network transports. Anything
else is refused. gitd decides (it knows this daemon's addresses, repositories and permissions); the
pipeline only sees this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class LocalApp:
    """An app on this DevFlow: its repository is root's and trusted, so the daemon reads it directly."""

    app: str
    git_dir: Path


@dataclass(frozen=True)
class NetworkRemote:
    """A URL of another host (https, http, ssh or git): fetched as the app's user, never by the daemon."""

    url: str


Remote = LocalApp | NetworkRemote


class RemoteRefused(Exception):
    """The URL names nothing the user may fetch; the message is safe to show (it says nothing of the host)."""


class RemoteResolver(Protocol):
    """Resolves URLs for one user (whose permissions decide which apps they may name)."""

    def resolve(self, url: str, base: Remote) -> Remote:
        """`url` as written in a repository that came from `base`: a relative URL is relative to it.
        Raises RemoteRefused."""
        ...

