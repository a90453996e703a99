"""Daemon settings: flags, then DEVFLOW_* environment variables, then defaults."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.limits import Limits


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "devflow"


class Settings(BaseSettings, Limits):
    """The limits (pipeline.limits) are settings too: `--max-config-bytes`, `DEVFLOW_MAX_CONFIG_BYTES`, ..."""

    model_config = SettingsConfigDict(env_prefix="DEVFLOW_", extra="ignore", frozen=False)

    data_dir: Path = Field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    ssh_port: int = Field(default=2222, ge=0, le=65535)
    http_port: int = Field(default=8000, ge=0, le=65535)
    router_port: int = Field(default=8080, ge=0, le=65535)
    domain: str = "localhost"
    database_url: str | None = None
    # "auto" uses C git when it is installed, dulwich's pure-Python handlers otherwise.
    git_backend: str = "auto"
    # PEM file of extra CA certificates builds trust (pip, npm, go), for TLS-intercepting proxies.
    extra_ca_certs: Path | None = None
    # Builds running at once, over all apps.
    max_concurrent_builds: int = Field(default=2, ge=1, le=64)
    # When the daemon runs as root, each app's builds and processes run as a uid of their own, counted up
    # from app_uid_base; naming an app_user runs every app as that one user instead.
    app_user: str | None = None
    app_uid_base: int = Field(default=700_000_000, ge=1000, le=4_000_000_000)
    # The host-wide record of which DevFlow holds each uid (root daemons; pipeline.host_uids): shared by every
    # daemon on the host, so none gives out a uid another has. reassign_uids gives this daemon's apps whose uid
    # another daemon holds a fresh one at start, instead of refusing to start.
    uids_dir: Path = Path("/var/lib/devflow/uids")
    reassign_uids: bool = False
    # Where builds and dependency caches live; they must be reachable by the app user.
    apps_dir: Path | None = None

    @field_validator("extra_ca_certs")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"{value} is not a file")
        return value.expanduser().resolve() if value else None

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("uids_dir")
    @classmethod
    def _absolute_unresolved(cls, value: Path) -> Path:
        """Absolute, with links left in place: the daemon refuses a link on the way rather than follow it."""
        return Path(os.path.abspath(value.expanduser()))

    @field_validator("git_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in ("auto", "cgit", "dulwich"):
            raise ValueError("git_backend must be auto, cgit or dulwich")
        return value

    def limits(self) -> Limits:
        return Limits(**{name: getattr(self, name) for name in Limits.model_fields})

    @property
    def repos_dir(self) -> Path:
        return self.data_dir / "repos"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    def apps_root(self, reachable: Callable[[Path], bool]) -> Path:
        """data_dir/apps, unless the app user cannot reach into the data dir (a root daemon whose data lives
        under /root or a private temp dir): then a directory of its own under /var/lib/devflow."""
        if self.apps_dir is not None:
            return self.apps_dir.expanduser().resolve()
        if reachable(self.data_dir):
            return self.data_dir / "apps"
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path("/var/lib/devflow") / digest / "apps"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def host_key_path(self) -> Path:
        return self.data_dir / "ssh_host_ed25519_key"

    @property
    def state_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'state.db'}"
