"""Git's smart HTTP protocol: info/refs, git-upload-pack and git-receive-pack, streamed both ways."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gitd.errors import DevflowError
from gitd.git.git_service import GitService
from gitd.git.pack_backend import Service
from gitd.http.auth import REALM, authenticate
from gitd.identity.directory import Directory

log = logging.getLogger(__name__)

SERVICES: dict[str, Service] = {"git-upload-pack": "upload-pack", "git-receive-pack": "receive-pack"}
NO_CACHE = {"Cache-Control": "no-cache, max-age=0, must-revalidate", "Pragma": "no-cache",
            "Expires": "Fri, 01 Jan 1980 00:00:00 GMT"}


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield


def pkt_line(text: str) -> bytes:
    data = text.encode()
    return f"{len(data) + 4:04x}".encode() + data


class PackResponse:
    """An ASGI response that feeds the request body to the pack program while streaming its output.

    Starlette's StreamingResponse would read (and drop) the request body while it listens for a
    disconnect, so this small response owns `receive` itself.
    """

    def __init__(self, git: GitService, request: Request, app: str, service: Service, advertise: bool) -> None:
        self.git = git
        self.request = request
        self.app = app
        self.service = service
        self.advertise = advertise

    async def _body(self, receive: Receive) -> AsyncIterator[bytes]:
        gzipped = self.request.headers.get("content-encoding", "").lower() in ("gzip", "x-gzip")
        inflate = zlib.decompressobj(wbits=31) if gzipped else None
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if chunk:
                yield inflate.decompress(chunk) if inflate else chunk
            if not message.get("more_body", False):
                break
        if inflate:
            yield inflate.flush()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = "advertisement" if self.advertise else "result"
        headers = {**NO_CACHE, "Content-Type": f"application/x-git-{self.service}-{kind}"}
        protocol = self.git.protocol(self.request.headers.get("git-protocol"))
        actor = self.request.state.actor
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})
        stderr: list[bytes] = []
        async with self.git.exchange(
            actor, self.app, self.service, "http", protocol=protocol, stateless=True,
            advertise=self.advertise, on_stderr=stderr.append,
        ) as pack:
            if self.advertise and "version=2" not in (protocol or ""):
                await send({"type": "http.response.body", "more_body": True,
                            "body": pkt_line(f"# service=git-{self.service}\n") + b"0000"})
            # The request body streams in while the answer streams out: large pushes never sit in memory.
            feeder = asyncio.create_task(pack.feed(self._body(receive) if not self.advertise else _nothing()))
            try:
                async for chunk in pack.output():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                code = await pack.wait()
            finally:
                feeder.cancel()
        if code != 0:
            log.warning("git %s for %s exited %s: %s", self.service, self.app, code,
                        b"".join(stderr).decode(errors="replace").strip()[-500:])
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def git_routes(git: GitService, directory: Directory) -> list[Route]:
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
        return PackResponse(git, request, *prepared, advertise=True)

    async def rpc(request: Request) -> Response | PackResponse:
        service_name = request.path_params["service"]
        expected = f"application/x-{service_name}-request"
        if request.headers.get("content-type") != expected:
            return PlainTextResponse(f"expected Content-Type {expected}\n", status_code=415)
        prepared = await prepare(request, service_name)
        if isinstance(prepared, Response):
            return prepared
        return PackResponse(git, request, *prepared, advertise=False)

    return [
        Route("/{repo:path}/info/refs", info_refs, methods=["GET"]),
        Route("/{repo:path}/{service:str}", rpc, methods=["POST"]),
    ]
