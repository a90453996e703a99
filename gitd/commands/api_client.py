"""Operations served by a running daemon's REST API: what the `devflow` CLI talks to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from gitd.errors import Conflict, DevflowError, Forbidden, InvalidInput, NotFound, Unauthorized

ERRORS = {400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}


class ApiClient:
    def __init__(self, url: str, token: str, transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/") + "/api/", transport=transport, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"})

    def _call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> Any:
        try:
            response = self.http.request(method, path, json=body,
                                         params={k: v for k, v in (params or {}).items() if v is not None})
        except httpx.HTTPError as exc:
            raise DevflowError(f"cannot reach the DevFlow daemon at {self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            self._raise_for(response)
        return response.json()

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}: {response.text[:200]}"
        raise ERRORS.get(response.status_code, DevflowError)(message)

    def whoami(self) -> dict:
        return self._call("GET", "whoami")

    def apps_list(self) -> list[dict]:
        return self._call("GET", "apps")

    def apps_create(self, name: str) -> dict:
        return self._call("POST", "apps", {"name": name})

    def apps_info(self, name: str) -> dict:
        return self._call("GET", f"apps/{quote(name, safe='')}")

    def apps_destroy(self, name: str) -> dict:
        return self._call("DELETE", f"apps/{quote(name, safe='')}")

    def apps_set(self, name: str, setting: str, value: str) -> dict:
        return self._call("PUT", f"apps/{quote(name, safe='')}/settings/{quote(setting, safe='')}", {"value": value})

    def keys_add(self, key_text: str, user: str | None = None) -> dict:
        return self._call("POST", "keys", {"key": key_text, "user": user})

    def keys_list(self, user: str | None = None) -> list[dict]:
        return self._call("GET", "keys", params={"user": user})

    def keys_remove(self, fingerprint: str) -> dict:
        return self._call("DELETE", f"keys/{quote(fingerprint, safe=':')}")

    def tokens_create(self, user: str | None = None, description: str = "", expires_days: int | None = None) -> dict:
        return self._call("POST", "tokens", {"user": user, "description": description, "expires_days": expires_days})

    def tokens_list(self, user: str | None = None) -> list[dict]:
        return self._call("GET", "tokens", params={"user": user})

    def tokens_revoke(self, token_id: int) -> dict:
        return self._call("DELETE", f"tokens/{int(token_id)}")

    def collaborators_list(self, app: str) -> list[dict]:
        return self._call("GET", f"apps/{quote(app, safe='')}/collaborators")

    def collaborators_add(self, app: str, user: str, role: str) -> dict:
        return self._call("PUT", f"apps/{quote(app, safe='')}/collaborators/{quote(user, safe='')}", {"role": role})

    def collaborators_remove(self, app: str, user: str) -> dict:
        return self._call("DELETE", f"apps/{quote(app, safe='')}/collaborators/{quote(user, safe='')}")

    def _app(self, app: str, rest: str = "") -> str:
        return f"apps/{quote(app, safe='')}{rest}"

    def config_show(self, app: str) -> dict:
        return self._call("GET", self._app(app, "/config"))

    def config_get(self, app: str, key: str) -> dict:
        return self._call("GET", self._app(app, f"/config/{quote(key, safe='')}"))

    def config_set(self, app: str, pairs: list[str], encoded: bool = False, restart: bool = True) -> dict:
        return self._call("PATCH", self._app(app, "/config"), {"set": pairs, "encoded": encoded, "restart": restart})

    def config_unset(self, app: str, keys: list[str], restart: bool = True) -> dict:
        return self._call("PATCH", self._app(app, "/config"), {"unset": keys, "restart": restart})

    def releases(self, app: str) -> list[dict]:
        return self._call("GET", self._app(app, "/releases"))

    def rollback(self, app: str, version: str) -> dict:
        return self._call("POST", self._app(app, "/releases"), {"rollback": version})

    def deployments_list(self, app: str) -> list[dict]:
        return self._call("GET", self._app(app, "/deploys"))

    def ps(self, app: str) -> list[dict]:
        return self._call("GET", self._app(app, "/processes"))

    def ps_scale(self, app: str, pairs: list[str]) -> dict:
        return self._call("PATCH", self._app(app, "/formation"), {"scale": pairs})

    def ps_restart(self, app: str) -> dict:
        return self._call("POST", self._app(app, "/processes/restart"))

    def ps_stop(self, app: str) -> dict:
        return self._call("POST", self._app(app, "/processes/stop"))

    def ps_start(self, app: str) -> dict:
        return self._call("POST", self._app(app, "/processes/start"))

    def logs(self, app: str, tail: int = 100, process: str | None = None) -> list[str]:
        return self._call("GET", self._app(app, "/logs"), params={"tail": tail, "process": process})

    def follow_logs(self, app: str, tail: int = 100, process: str | None = None) -> Iterator[str]:
        """The tail, then lines as the daemon writes them; ends only when the daemon closes the stream."""
        params = {k: v for k, v in {"follow": "1", "tail": tail, "process": process}.items() if v is not None}
        try:
            with self.http.stream("GET", self._app(app, "/logs"), params=params,
                                  timeout=httpx.Timeout(30, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise DevflowError(f"lost the log stream from {self.http.base_url}: {exc}") from None

    def resources(self, app: str) -> dict:
        return self._call("GET", self._app(app, "/resources"))

    def resources_set(self, app: str, pairs: list[str]) -> dict:
        return self._call("PUT", self._app(app, "/resources"), {"set": pairs})

    def resources_clear(self, app: str) -> dict:
        return self._call("DELETE", self._app(app, "/resources"))

    def domains_list(self, app: str) -> list[dict]:
        return self._call("GET", self._app(app, "/domains"))

    def domains_add(self, app: str, domain: str) -> dict:
        return self._call("PUT", self._app(app, f"/domains/{quote(domain, safe='')}"))

    def domains_remove(self, app: str, domain: str) -> dict:
        return self._call("DELETE", self._app(app, f"/domains/{quote(domain, safe='')}"))

    def users_list(self) -> list[dict]:
        return self._call("GET", "users")

    def users_set(self, name: str, flag: str, value: bool) -> dict:
        return self._call("PATCH", f"users/{quote(name, safe='')}", {"flag": flag, "value": value})
