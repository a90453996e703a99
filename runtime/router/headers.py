"""Rewriting heads between client and app: drop hop-by-hop headers, add X-Forwarded-*, choose body framing.

Each direction reads the headers once and builds the forwarded head in the same pass.
"""

from __future__ import annotations

import itertools
import os

from httptools import HttpParserInvalidURLError, parse_url

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
REPLACED = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})

# What the head builders do with a header, by lower-case name; any other header is forwarded as is (as is any
# header in runtime.router.simple_heads, which leaves a message with one of these to the parser).
(_HOST, _FORWARDED_FOR, _TRANSFER_ENCODING, _UPGRADE, _CONNECTION, _DROP, _CONTENT_LENGTH, _ACCEPT,
 _REQUEST_ID) = range(9)
NOTED_REQUEST = {
    b"host": _HOST, b"x-forwarded-for": _FORWARDED_FOR, b"transfer-encoding": _TRANSFER_ENCODING,
    b"upgrade": _UPGRADE, b"connection": _CONNECTION, b"content-length": _CONTENT_LENGTH, b"accept": _ACCEPT,
    b"x-request-id": _REQUEST_ID,
    **dict.fromkeys((b"keep-alive", b"proxy-connection", b"te", b"trailer", b"x-forwarded-proto",
                     b"x-forwarded-host"), _DROP),
}

NOTED_RESPONSE = {
    b"content-length": _CONTENT_LENGTH, b"transfer-encoding": _TRANSFER_ENCODING, b"upgrade": _UPGRADE,
    b"connection": _CONNECTION, **dict.fromkeys((b"keep-alive", b"proxy-connection", b"te", b"trailer"), _DROP),
}

# X-Request-Id for requests without one: unique per router process and cheap (no syscall per request).
_ID_PREFIX = os.urandom(8).hex().encode()
_ids = itertools.count()

# How the response body goes to the client.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE, TUNNEL = range(5)


class Request:
    """What the router needs from one client request, and the head to send upstream."""

    __slots__ = ("method", "host", "http11", "keep_alive", "upgrade", "chunked", "has_body", "as_html",
                 "head", "error")

    def __init__(self, method: bytes, http11: bool, keep_alive: bool, upgrade: bool) -> None:
        self.method = method
        self.host = ""
        self.http11 = http11
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.chunked = False
        self.has_body = False
        self.as_html = False
        self.head = b""
        self.error: tuple[int, str] | None = None


def read_request(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], http11: bool,
                 keep_alive: bool, upgrade: bool, peer: bytes, proto: bytes) -> Request:
    """Parse a request head (httptools has checked its syntax) and build the head forwarded to the app."""
    request = Request(method, http11, keep_alive, upgrade)
    if method == b"CONNECT":
        request.error = (405, "the router does not tunnel CONNECT requests")
        return request
    out: list[bytes] = []
    host = b""
    hosts = 0
    forwarded_for = b""
    has_request_id = False
    upgrade_to = b""
    nominated = b""
    for name, value in headers:
        noted = NOTED_REQUEST.get(name.lower())
        if noted is None:
            out += (name, b": ", value, b"\r\n")
        elif noted == _HOST:
            host, hosts = value.rstrip(b" \t"), hosts + 1  # llhttp leaves trailing whitespace in a value
        elif noted == _FORWARDED_FOR:
            forwarded_for += value + b", "
        elif noted == _TRANSFER_ENCODING:
            request.chunked = request.has_body = True
        elif noted == _UPGRADE:
            upgrade_to = value
        elif noted == _CONNECTION:
            nominated += value + b","
        elif noted != _DROP:
            if noted == _CONTENT_LENGTH:
                request.has_body = request.has_body or value.strip(b" \t0") != b""
            elif noted == _ACCEPT:
                request.as_html = b"text/html" in value
            else:
                has_request_id = True
            out += (name, b": ", value, b"\r\n")
    if nominated and (extra := _nominated(nominated)):
        out = _forwardable(headers, HOP_BY_HOP | REPLACED | extra)
    target = url
    if url[:1] != b"/" and (url[:7].lower() == b"http://" or url[:8].lower() == b"https://"):
        # absolute form: its host wins (RFC 9112 3.2.2)
        try:
            parsed = parse_url(url)
        except HttpParserInvalidURLError:
            request.error = (400, "the request target is not a valid URL")
            return request
        host, hosts = parsed.host + (b":%d" % parsed.port if parsed.port else b""), 1
        target = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
    if hosts != 1 or not host:
        request.error = (400, "the request needs exactly one Host header")
        return request
    request.host = host.decode("latin-1")
    if not has_request_id:
        out += (b"X-Request-Id: ", new_request_id(), b"\r\n")
    if request.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade:
        out += (b"Connection: upgrade\r\nUpgrade: ", upgrade_to, b"\r\n")
    request.head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s" % (method, target, host, b"".join(out),
                                                          forwarded_fields(forwarded_for + peer, proto, host))
    return request


def new_request_id() -> bytes:
    """An X-Request-Id for a request that came without one, so an app's logs can name it."""
    return b"%s%016x" % (_ID_PREFIX, next(_ids))


def forwarded_fields(forwarded_for: bytes, proto: bytes, host: bytes) -> bytes:
    """The X-Forwarded-* fields that end every head the router sends an app, and the head's end."""
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n\r\n" % (
        forwarded_for, proto, host)


def _nominated(connection: bytes) -> frozenset[bytes]:
    """Header names a Connection header lists besides its options (close, keep-alive, upgrade)."""
    return frozenset(t.strip().lower() for t in connection.split(b",")) - CONNECTION_OPTIONS - {b""}


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], request: Request,
                  ) -> tuple[bytes, int, bool, bool]:
    """The response head for the client.

    Also returns how the body is framed for the client, whether the client connection stays open, and
    whether the app's body runs until it closes the connection (neither Content-Length nor chunked).
    """
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    has_length = chunked = False
    upgrade_to = nominated = b""
    for name, value in headers:
        noted = NOTED_RESPONSE.get(name.lower())
        if noted is None:
            out += (name, b": ", value, b"\r\n")
        elif noted == _CONTENT_LENGTH:
            has_length = True
            out += (name, b": ", value, b"\r\n")
        elif noted == _TRANSFER_ENCODING:
            chunked = True
        elif noted == _UPGRADE:
            upgrade_to = value
        elif noted == _CONNECTION:
            nominated += value + b","
    if nominated and (extra := _nominated(nominated)):
        out = [out[0], *_forwardable(headers, HOP_BY_HOP | extra)]
    keep_alive = request.keep_alive and not request.upgrade
    if status == 101:
        out += (b"Connection: upgrade\r\nUpgrade: ", upgrade_to, b"\r\n\r\n")
        return b"".join(out), TUNNEL, False, False
    if status < 200:
        out.append(b"\r\n")
        return b"".join(out), NO_BODY, keep_alive, False
    until_close = False
    if request.method == b"HEAD" or status == 204 or status == 304:
        framing = NO_BODY
    elif has_length:
        framing = LENGTH
    else:
        until_close = not chunked
        if request.http11:
            framing = CHUNKED
            out.append(b"Transfer-Encoding: chunked\r\n")
        else:
            framing, keep_alive = UNTIL_CLOSE, False
    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif not request.http11:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), framing, keep_alive, until_close


def _forwardable(headers: list[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> list[bytes]:
    """The headers again without those a Connection header named as hop-by-hop (RFC 9110 7.6.1); rare."""
    return [piece for name, value in headers if name.lower() not in dropped for piece in (name, b": ", value, b"\r\n")]
