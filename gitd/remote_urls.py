"""What a repository URL a user named stands for on this DevFlow: one of its apps, a network remote, or nothing.

One rule wherever DevFlow fetches something a user named (a submodule's URL): a URL that reaches this
DevFlow's own repositories (a relative URL, an absolute path, file://, an ssh:// or http:// URL of this
daemon's host and ports, scp-like `git@host:app.git` when SSH is on port 22) names one of its apps, and
only an app the user can read is accepted; any other URL is a network remote over https, http, ssh or git,
which the pipeline fetches as the app's user. Everything else (a local path that is not an app, file: of
another host, ext::, fd:: and other remote helpers, what git would take for an option) is refused with the
same message whatever exists on the host, and no path is ever looked at.

Host names are matched without DNS: the --host value, localhost, this machine's name and any loopback or
unspecified address. A URL of this daemon spelt otherwise is fetched as a network remote by the app's user,
who holds no key or token of the pusher's: DevFlow refuses it, which tells nothing.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

from gitd.apps import AppRegistry
from gitd.errors import InvalidInput
from gitd.git.git_service import app_from_repo_path
from pipeline.remotes import LocalApp, NetworkRemote, Remote, RemoteRefused

MAX_URL = 2048
SHOWN_URL = 200
# Default ports, for telling whether a URL reaches this daemon's SSH or HTTP server.
SSH_SCHEMES = {"ssh": 22, "git+ssh": 22, "ssh+git": 22}
HTTP_SCHEMES = {"http": 80, "https": 443}
NETWORK_SCHEMES = {*SSH_SCHEMES, *HTTP_SCHEMES, "git"}
REMOTE_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")  # git's <transport>::<address>
SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]/]+\]|[^:/\[\]@]+):(?P<path>.*)$", re.DOTALL)


def _shown(url: str) -> str:
    """The URL as the push output can show it: on one line, cut short."""
    shown = url.encode("unicode_escape").decode() if not url.isprintable() else url
    return shown if len(shown) <= SHOWN_URL else f"{shown[:SHOWN_URL]}..."


def _joined(base_path: str, relative: str) -> str | None:
    """git's relative submodule URL: `relative` against the superproject's path taken as a directory;
    None when it climbs above the root."""
    joined = posixpath.normpath(posixpath.join(base_path.strip("/") or ".", relative))
    if joined == ".." or joined.startswith("../"):
        return None
    return "" if joined == "." else joined


class RemoteUrls:
    """The resolver of this daemon: where it serves repositories, and who may read which app."""

    def __init__(self, apps: AppRegistry, host: str, ssh_port: int, http_port: int) -> None:
        self.apps = apps
        self.repos_dir = apps.repositories.root
        self.ssh_port = ssh_port
        self.http_port = http_port
        self.names = {name.lower().rstrip(".") for name in (host, "localhost", socket.gethostname()) if name}

    def for_user(self, user: str) -> UserRemotes:
        return UserRemotes(self, user)

    def is_this_host(self, host: str) -> bool:
        host = host.lower().rstrip(".").removeprefix("[").removesuffix("]")
        if host in self.names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None) or address
        return mapped.is_loopback or mapped.is_unspecified or str(mapped) in self.names


class UserRemotes:
    """Resolves URLs for one user: the apps they may name are the ones they can read."""

    def __init__(self, urls: RemoteUrls, user: str) -> None:
        self.urls = urls
        self.user = user

    def resolve(self, url: str, base: Remote) -> Remote:
        if not url or len(url) > MAX_URL or any(c.isspace() or not c.isprintable() for c in url):
            raise RemoteRefused(f"{_shown(url)} is not a repository URL")
        if url.startswith(("./", "../")):
            return self._relative(url, base)
        if url.startswith("-"):
            raise RemoteRefused(f"{_shown(url)} is not a repository URL")
        if REMOTE_HELPER.match(url):
            raise RemoteRefused(f"{_shown(url)}: remote helpers (transport::address) are not fetched; "
                                "use an https, http, ssh or git URL")
        if "://" in url:
            return self._url(url)
        if url.startswith("/"):
            return self._local_path(url, url)
        scp = SCP_LIKE.match(url)
        if scp:
            return self._scp(url, scp)
        raise self._not_an_app(url)

    def _relative(self, url: str, base: Remote) -> Remote:
        if isinstance(base, LocalApp):
            path = _joined(f"{base.app}.git", url)
            if path is None:
                raise self._not_an_app(url)
            return self._app(path, url)
        scp = None if "://" in base.url else SCP_LIKE.match(base.url)
        if scp is not None:
            path = _joined(scp["path"], url)
            prefix = base.url[:scp.start("path")]
        else:
            parts = urlsplit(base.url)
            path = _joined(parts.path, url)
            prefix = f"{parts.scheme}://{parts.netloc}/"
        if path is None:
            raise RemoteRefused(f"{_shown(url)} climbs above the host of {_shown(base.url)}")
        return self.resolve(prefix + path, base)

    def _url(self, url: str) -> Remote:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise RemoteRefused(f"{_shown(url)} is not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise self._not_an_app(url)
            return self._local_path(unquote(parts.path), url)
        if scheme not in NETWORK_SCHEMES:
            raise RemoteRefused(f"{_shown(url)}: only https, http, ssh and git URLs are fetched")
        host = parts.hostname or ""
        if not host or host.startswith("-") or (parts.username or "").startswith("-"):
            raise RemoteRefused(f"{_shown(url)} is not a valid URL")
        service = self._service_port(scheme)
        default = SSH_SCHEMES.get(scheme) or HTTP_SCHEMES.get(scheme)
        if service is not None and (port or default) == service and self.urls.is_this_host(host):
            return self._app_at(unquote(parts.path), url)
        return NetworkRemote(url)

    def _scp(self, url: str, scp: re.Match[str]) -> Remote:
        host, user, path = scp["host"], scp["user"] or "", scp["path"]
        if host.startswith("-") or user.startswith("-") or path.startswith("-"):
            raise RemoteRefused(f"{_shown(url)} is not a repository URL")
        if self.urls.ssh_port == 22 and self.urls.is_this_host(host):
            return self._app_at(path, url)
        return NetworkRemote(url)

    def _service_port(self, scheme: str) -> int | None:
        if scheme in SSH_SCHEMES:
            return self.urls.ssh_port
        return self.urls.http_port if scheme in HTTP_SCHEMES else None

    def _app_at(self, path: str, url: str) -> LocalApp:
        """The repository path of a URL of this daemon (`/app.git`, `app.git`, `~/app`)."""
        try:
            return self._app(app_from_repo_path(path), url)
        except InvalidInput:
            raise self._not_an_app(url) from None

    def _local_path(self, path: str, url: str) -> LocalApp:
        normalized = Path("/" + posixpath.normpath(path).lstrip("/"))
        if normalized.parent != self.urls.repos_dir:
            raise self._not_an_app(url)
        return self._app(normalized.name, url)

    def _app(self, path: str, url: str) -> LocalApp:
        name = path.removesuffix(".git")
        git_dir = self.urls.apps.readable_repository(self.user, name)
        if git_dir is None:
            raise self._not_an_app(url)
        return LocalApp(name, git_dir)

    def _not_an_app(self, url: str) -> RemoteRefused:
        return RemoteRefused(f"{_shown(url)} is not an app you can read on this DevFlow, nor a network URL "
                             "(https, http, ssh or git)")
