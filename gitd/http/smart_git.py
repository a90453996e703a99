"""Git's smart HTTP protocol: info/refs, git-upload-pack and git-receive-pack, streamed both ways."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gitd.errors import DevflowError
from gitd.git.git_service import GitService
from gitd.git.pack_backend import Service
from gitd.git.pack_process import PackProcess
from gitd.http.auth import REALM, authenticate
from gitd.http.request_body import RequestBody
from gitd.identity.directory import Directory
from pipeline.limits import Limits

log = logging.getLogger(__name__)

SERVICES: dict[str, Service] = {"git-upload-pack": "upload-pack", "git-receive-pack": "receive-pack"}
STDERR_TAIL = 500
NO_CACHE = {"Cache-Control": "no-cache, max-age=0, must-revalidate", "Pragma": "no-cache",
            "Expires": "Fri, 01 Jan 1980 00:00:00 GMT"}


def pkt_line(text: str) -> bytes:
    data = text.encode()
    return f"{len(data) + 4:04x}".encode() + data


class PackResponse:
    """An ASGI response that feeds the request body to the pack program while streaming its output.

    Starlette's StreamingResponse would read (and drop) the request body while it listens for a
    disconnect, so this small response owns `receive` itself. The status goes out with the program's
    first output, so a body refused before then (too large, not gzip) still gets a 4xx.
    """

    def __init__(self, git: GitService, request: Request, app: str, service: Service,
                 body: RequestBody | None) -> None:
        """`body` None: the advertisement (info/refs), which reads none."""
        self.git = git
        self.request = request
        self.app = app
        self.service = service
        self.body = body
        self.hung_up = False

    async def _feed(self, pack: PackProcess, receive: Receive) -> None:
        """The body to the program; once it is in, a client that hangs up stops the program."""
        await pack.feed(self._body(pack, receive))
        while (await receive())["type"] != "http.disconnect":
            pass
        self.hung_up = True
        pack.kill()

    async def _body(self, pack: PackProcess, receive: Receive) -> AsyncIterator[bytes]:
        if self.body is None:
            return
        try:
            async for chunk in self.body.chunks(receive):
                yield chunk
        except DevflowError:
            pack.kill()  # before the program sees its input end and answers that
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        advertise = self.body is None
        kind = "advertisement" if advertise else "result"
        headers = {**NO_CACHE, "Content-Type": f"application/x-git-{self.service}-{kind}"}
        protocol = self.git.protocol(self.request.headers.get("git-protocol"))
        actor = self.request.state.actor
        started = False

        async def start() -> None:
            nonlocal started
            if not started:
                started = True
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})

        stderr = bytearray()

        async def keep_tail(chunk: bytes) -> None:
            """Only for the daemon's log, should the program fail: its last words."""
            stderr.extend(chunk)
            del stderr[:-STDERR_TAIL]

        async with self.git.exchange(
            actor, self.app, self.service, "http", protocol=protocol, stateless=True,
            advertise=advertise, on_stderr=keep_tail,
        ) as pack:
            if advertise and "version=2" not in (protocol or ""):
                await start()
                await send({"type": "http.response.body", "more_body": True,
                            "body": pkt_line(f"# service=git-{self.service}\n") + b"0000"})
            # The request body streams in while the answer streams out: large pushes never sit in memory.
            feeder = asyncio.create_task(self._feed(pack, receive))
            try:
                async for chunk in pack.output():
                    await start()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                code = await pack.wait()
            finally:
                feeder.cancel()
                (fed,) = await asyncio.gather(feeder, return_exceptions=True)
        refused = isinstance(fed, DevflowError)
        if refused:
            log.info("git %s request for %s refused: %s", self.service, self.app, fed.message)
            if not started:
                await PlainTextResponse(fed.message + "\n", status_code=fed.status,
                                        headers={"Connection": "close"})(scope, receive, send)
                return
            # The answer has begun, so its status cannot change: the pack stream ends short, which git reports.
        elif isinstance(fed, Exception):
            # Writing to a program that has exited and closed its input (uvloop raises RuntimeError there).
            log.info("feeding git %s for %s stopped: %r", self.service, self.app, fed)
        if code != 0 and not (refused or self.hung_up):
            log.warning("git %s for %s exited %s: %s", self.service, self.app, code,
                        stderr.decode(errors="replace").strip())
        await start()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def git_routes(git: GitService, directory: Directory, limits: Limits) -> list[Route]:
    async def prepare(request: Request, service_name: str | None) -> tuple[str, Service] | Response:
        service = SERVICES.get(service_name or "")
        if service is None:
            return PlainTextResponse("only git's smart HTTP protocol is served; use git 1.6.6 or newer\n",
                                     status_code=403)
        try:
            request.state.actor = await authenticate(request, directory)
            app = await git.authorize(request.state.actor, request.path_params["repo"], service)
        except DevflowError as exc:
            headers = {"WWW-Authenticate": REALM} if exc.status == 401 else None
            return PlainTextResponse(exc.message + "\n", status_code=exc.status, headers=headers)
        return app, service

    async def info_refs(request: Request) -> Response | PackResponse:
        prepared = await prepare(request, request.query_params.get("service"))
        if isinstance(prepared, Response):
            return prepared
        return PackResponse(git, request, *prepared, body=None)

    async def rpc(request: Request) -> Response | PackResponse:
        service_name = request.path_params["service"]
        expected = f"application/x-{service_name}-request"
        if request.headers.get("content-type") != expected:
            return PlainTextResponse(f"expected Content-Type {expected}\n", status_code=415)
        prepared = await prepare(request, service_name)
        if isinstance(prepared, Response):
            return prepared
        app, service = prepared
        try:
            if service == "upload-pack":
                body = RequestBody(request.headers, limits, "max_fetch_request_bytes", "the fetch request is too large")
            else:  # the pack program bounds a push's pack itself (max_push_bytes), in git's own words
                body = RequestBody(request.headers, limits)
        except DevflowError as exc:
            return PlainTextResponse(exc.message + "\n", status_code=exc.status, headers={"Connection": "close"})
        return PackResponse(git, request, app, service, body)

    return [
        Route("/{repo:path}/info/refs", info_refs, methods=["GET"]),
        Route("/{repo:path}/{service:str}", rpc, methods=["POST"]),
    ]
