"""The status page at / and the health endpoint: what this daemon serves and how to push to it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


@dataclass(frozen=True)
class ServiceInfo:
    version: str
    host: str
    ssh_port: int
    http_url: str
    host_key_fingerprint: str
    git_backend: str
    known_hosts_line: str


def status_routes(info: ServiceInfo) -> list[Route]:
    TEMPLATES.get_template("status.html")  # read from disk now, not on the event loop at the first request
    async def page(request: Request) -> Response:
        return TEMPLATES.TemplateResponse(request, "status.html", asdict(info))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **asdict(info)})

    return [Route("/", page), Route("/healthz", health)]
