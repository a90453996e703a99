"""The responses the router gives itself: unknown host, no healthy process, unreachable app, bad request."""

from __future__ import annotations

import html
from http import HTTPStatus


def page(status: int, message: str, *, as_html: bool, keep_alive: bool) -> bytes:
    """A complete response saying what went wrong: HTML for browsers, one line of text for curl and scripts."""
    title = f"{status} {HTTPStatus(status).phrase}"
    if as_html:
        body = (f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>'
                f"<body><h1>{title}</h1><p>{html.escape(message)}</p><hr><p>DevFlow router</p></body></html>\n")
        kind = "text/html; charset=utf-8"
    else:
        body = f"{message}\n"
        kind = "text/plain; charset=utf-8"
    data = body.encode()
    connection = "" if keep_alive else "Connection: close\r\n"
    head = (f"HTTP/1.1 {title}\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n"
            f"Cache-Control: no-store\r\n{connection}\r\n")
    return head.encode() + data


def unknown_host(host: str, *, as_html: bool, keep_alive: bool) -> bytes:
    return page(404, f"no app is served at {host}", as_html=as_html, keep_alive=keep_alive)


def no_upstream(app: str, *, as_html: bool, keep_alive: bool) -> bytes:
    return page(503, f"{app} has no healthy web process", as_html=as_html, keep_alive=keep_alive)


def bad_gateway(app: str, *, as_html: bool, keep_alive: bool) -> bytes:
    return page(502, f"{app} is not answering: no web process accepted the request", as_html=as_html,
                keep_alive=keep_alive)
