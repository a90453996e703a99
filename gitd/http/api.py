"""The REST API under /api: the management operations as resources, Bearer-token authenticated."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gitd.commands.command_threads import CommandThreads
from gitd.errors import DevflowError, InvalidInput
from gitd.http.auth import authenticate
from gitd.http.request_body import PayloadTooLarge, RequestBody
from gitd.identity.directory import Directory
from gitd.identity.roles import Actor
from gitd.management import Management
from pipeline.limits import Limits

log = logging.getLogger(__name__)

Handler = Callable[[Management, Request, dict], Any]


async def _json_body(request: Request, limits: Limits) -> dict:
    if request.method in ("GET", "DELETE"):
        return {}
    raw = await RequestBody(request.headers, limits, "max_api_body_bytes").read(request.receive)
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


def _field(body: dict, name: str, kind: type = str, required: bool = True) -> Any:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidInput(f"field {name!r} must be a {kind.__name__}")
    return value


def _strings(body: dict, name: str) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"field {name!r} must be a list of strings")
    return value


def _int(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not text.isdigit():
        raise InvalidInput(f"expected a whole number, got {text[:20]!r}")
    return int(text)


def _config_change(m: Management, request: Request, body: dict) -> dict:
    app = request.path_params["app"]
    restart = body.get("restart", True) is not False
    if "set" in body:
        return m.config_set(app, _strings(body, "set"), body.get("encoded") is True, restart)
    if "unset" in body:
        return m.config_unset(app, _strings(body, "unset"), restart)
    raise InvalidInput("give 'set' (a list of KEY=VALUE) or 'unset' (a list of keys)")


def _process_action(m: Management, request: Request, body: dict) -> dict:
    actions = {"restart": m.ps_restart, "stop": m.ps_stop, "start": m.ps_start}
    action = actions.get(request.path_params["action"])
    if action is None:
        raise InvalidInput("the process actions are restart, stop and start")
    return action(request.path_params["app"])


def api_routes(directory: Directory, management_for: Callable[[Actor], Management], limits: Limits,
               commands: CommandThreads) -> list[Route]:
    def endpoint(handler: Handler, status: int = 200) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def run(request: Request) -> JSONResponse:
            try:
                actor = await authenticate(request, directory)
                body = await _json_body(request, limits)
                result = await commands.run(actor.name, handler, management_for(actor), request, body)
            except PayloadTooLarge as exc:
                # The rest of the body is not worth reading: the connection closes after the answer.
                return JSONResponse({"error": exc.message}, status_code=exc.status, headers={"Connection": "close"})
            except DevflowError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            return JSONResponse(result, status_code=status)

        return run

    async def follow_logs(request: Request) -> Response:
        """`?follow=1`: the tail, then new lines as they are written, streamed until the client hangs up."""
        try:
            actor = await authenticate(request, directory)
            app, process = request.path_params["app"], request.query_params.get("process")
            tail = _int(request.query_params.get("tail"), 100)
            lines = await management_for(actor).follow_logs(app, tail, process)
        except DevflowError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

        async def body() -> AsyncIterator[str]:
            async for line in lines:
                yield line + "\n"

        return StreamingResponse(body(), media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    tail_logs = endpoint(lambda m, r, b: m.logs(p(r, "app"), _int(q(r, "tail"), 100), q(r, "process")))

    async def logs(request: Request) -> Response:
        if request.query_params.get("follow") in ("1", "true"):
            return await follow_logs(request)
        return await tail_logs(request)

    def p(request: Request, name: str) -> str:
        return request.path_params[name]

    def q(request: Request, name: str) -> str | None:
        return request.query_params.get(name)

    return [
        Route("/api/whoami", endpoint(lambda m, r, b: m.whoami())),
        Route("/api/apps", endpoint(lambda m, r, b: m.apps_list())),
        Route("/api/apps", endpoint(lambda m, r, b: m.apps_create(_field(b, "name")), 201), methods=["POST"]),
        Route("/api/apps/{app}", endpoint(lambda m, r, b: m.apps_info(p(r, "app")))),
        Route("/api/apps/{app}", endpoint(lambda m, r, b: m.apps_destroy(p(r, "app"))), methods=["DELETE"]),
        Route("/api/apps/{app}/settings/{setting}",
              endpoint(lambda m, r, b: m.apps_set(p(r, "app"), p(r, "setting"), _field(b, "value"))), methods=["PUT"]),
        Route("/api/apps/{app}/collaborators", endpoint(lambda m, r, b: m.collaborators_list(p(r, "app")))),
        Route("/api/apps/{app}/collaborators/{user}",
              endpoint(lambda m, r, b: m.collaborators_add(p(r, "app"), p(r, "user"), _field(b, "role"))),
              methods=["PUT"]),
        Route("/api/apps/{app}/collaborators/{user}",
              endpoint(lambda m, r, b: m.collaborators_remove(p(r, "app"), p(r, "user"))), methods=["DELETE"]),
        Route("/api/apps/{app}/config", endpoint(lambda m, r, b: m.config_show(p(r, "app")))),
        Route("/api/apps/{app}/config/{key}", endpoint(lambda m, r, b: m.config_get(p(r, "app"), p(r, "key")))),
        Route("/api/apps/{app}/config", endpoint(_config_change), methods=["PATCH"]),
        Route("/api/apps/{app}/releases", endpoint(lambda m, r, b: m.releases(p(r, "app")))),
        Route("/api/apps/{app}/releases", endpoint(lambda m, r, b: m.rollback(p(r, "app"), _field(b, "rollback")),
                                                   201), methods=["POST"]),
        Route("/api/apps/{app}/deploys", endpoint(lambda m, r, b: m.deployments_list(p(r, "app")))),
        Route("/api/apps/{app}/processes", endpoint(lambda m, r, b: m.ps(p(r, "app")))),
        Route("/api/apps/{app}/formation", endpoint(lambda m, r, b: m.ps_scale(p(r, "app"), _strings(b, "scale"))),
              methods=["PATCH"]),
        Route("/api/apps/{app}/processes/{action:str}", endpoint(_process_action), methods=["POST"]),
        Route("/api/apps/{app}/logs", logs),
        Route("/api/apps/{app}/resources", endpoint(lambda m, r, b: m.resources(p(r, "app")))),
        Route("/api/apps/{app}/resources", endpoint(lambda m, r, b: m.resources_set(p(r, "app"), _strings(b, "set"))),
              methods=["PUT"]),
        Route("/api/apps/{app}/resources", endpoint(lambda m, r, b: m.resources_clear(p(r, "app"))),
              methods=["DELETE"]),
        Route("/api/apps/{app}/domains", endpoint(lambda m, r, b: m.domains_list(p(r, "app")))),
        Route("/api/apps/{app}/domains/{domain}", endpoint(lambda m, r, b: m.domains_add(p(r, "app"), p(r, "domain"))),
              methods=["PUT"]),
        Route("/api/apps/{app}/domains/{domain}",
              endpoint(lambda m, r, b: m.domains_remove(p(r, "app"), p(r, "domain"))), methods=["DELETE"]),
        Route("/api/keys", endpoint(lambda m, r, b: m.keys_list(q(r, "user")))),
        Route("/api/keys", endpoint(lambda m, r, b: m.keys_add(_field(b, "key"), _field(b, "user", required=False)),
                                    201), methods=["POST"]),
        Route("/api/keys/{fingerprint:path}", endpoint(lambda m, r, b: m.keys_remove(p(r, "fingerprint"))),
              methods=["DELETE"]),
        Route("/api/tokens", endpoint(lambda m, r, b: m.tokens_list(q(r, "user")))),
        Route("/api/tokens", endpoint(lambda m, r, b: m.tokens_create(
            _field(b, "user", required=False), b.get("description") or "",
            _field(b, "expires_days", int, required=False)), 201), methods=["POST"]),
        Route("/api/tokens/{id:int}", endpoint(lambda m, r, b: m.tokens_revoke(p(r, "id"))), methods=["DELETE"]),
        Route("/api/users", endpoint(lambda m, r, b: m.users_list())),
        Route("/api/users/{name}", endpoint(lambda m, r, b: m.users_set(
            p(r, "name"), _field(b, "flag"), _field(b, "value", bool))), methods=["PATCH"]),
    ]
