"""Host names to apps to upstreams: the table read on every request, replaced whole on every change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

Address = tuple[str, int]
MAX_SENT_HOSTS = 4096
MAX_HOST_LENGTH = 253 + len(":65535")  # a DNS name and a port


def normalize_host(host: str) -> str:
    """`App.LocalHost:8080` and `app.localhost.` both name `app.localhost`; `[::1]:80` names `[::1]`."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    host = host.partition(":")[0]
    return host[:-1] if host.endswith(".") else host


class Route:
    """One app and its healthy web upstreams, balanced round-robin; `owner`, when known, is the uid whose
    sockets alone may take its connections (runtime.router.socket_owners)."""

    __slots__ = ("app", "upstreams", "owner", "_next")

    def __init__(self, app: str, upstreams: Sequence[Address], owner: int | None = None) -> None:
        self.app = app
        self.upstreams: tuple[Address, ...] = tuple((str(host), int(port)) for host, port in upstreams)
        self.owner = owner
        self._next = 0

    def rotation(self) -> tuple[Address, ...]:
        """The upstreams in the order one request tries them; each request starts one further along."""
        upstreams = self.upstreams
        if len(upstreams) < 2:
            return upstreams
        start = self._next % len(upstreams)
        self._next = start + 1
        return upstreams[start:] + upstreams[:start]


class RouteTable:
    """Apps and their host names.

    Every change builds a new host map and swaps it in with one assignment, so a request sees either
    the old routes or the new ones, never a mix, whichever thread made the change.
    """

    def __init__(self) -> None:
        self._apps: dict[str, tuple[tuple[str, ...], Route]] = {}
        self._table: tuple[dict[str, Route], dict[str, Route | None]] = ({}, {})
        """The host map, and Host headers as clients send them (`App.localhost:8080`) resolved with it: one
        attribute, so a lookup never resolves with one map and remembers in the other's successor."""
        self._changing = threading.Lock()  # concurrent changes must not lose one another

    def lookup(self, host: str) -> Route | None:
        """The route for a Host header as sent: any case, with a port or a trailing dot."""
        hosts, sent = self._table
        try:
            return sent[host]
        except KeyError:
            route = hosts.get(normalize_host(host))
            if len(host) <= MAX_HOST_LENGTH:  # no name is longer: a client's junk is not kept
                if len(sent) >= MAX_SENT_HOSTS:  # nor can a scanner's made-up names grow it without end
                    sent.clear()
                sent[host] = route
            return route

    def set_app(self, app: str, hostnames: Sequence[str], upstreams: Sequence[Address],
                owner: int | None = None) -> None:
        hosts = tuple(normalize_host(h) for h in hostnames)
        route = Route(app, upstreams, owner)
        with self._changing:
            for host in hosts:
                owner = self._table[0].get(host)
                if owner is not None and owner.app != app:
                    log.warning("host name %s moves from app %s to app %s", host, owner.app, app)
            apps = {name: entry for name, entry in self._apps.items() if name != app}
            apps[app] = (hosts, route)
            self._install(apps)

    def remove_app(self, app: str) -> None:
        with self._changing:
            self._install({name: entry for name, entry in self._apps.items() if name != app})

    def snapshot(self) -> dict[str, tuple[tuple[str, ...], tuple[Address, ...], int | None]]:
        return {app: (hosts, route.upstreams, route.owner) for app, (hosts, route) in self._apps.items()}

    def addresses(self) -> set[Address]:
        """Every upstream some app still routes to."""
        return {address for _, route in self._apps.values() for address in route.upstreams}

    def _install(self, apps: dict[str, tuple[tuple[str, ...], Route]]) -> None:
        hosts: dict[str, Route] = {}
        for hostnames, route in apps.values():  # the app set last wins a host name two apps claim
            for host in hostnames:
                hosts[host] = route
        self._apps, self._table = apps, (hosts, {})
