"""The common exchange read without the parser: a request with no body, a response with a Content-Length.

Each head arrives whole in one read (the request's alone, the response's with its body or the start of it) and
carries no header the router must act on, so two regular expressions (C code) check and read it at once, where
the parser calls back into Python for every header. On a small machine that interpreted work, not the kernel,
is most of the CPU the router spends on a request, and the CPU it takes from the apps beside it is most of the
latency it adds (scripts/benchmarks/router.py).

Anything else (a body, pipelining, a Connection header but keep-alive, a head split over reads, an unusual byte)
returns None and goes through the parser, which stays the reference: what is accepted here is what it accepts,
and more strictly (tests/test_simple_heads.py holds the two side by side).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from runtime.router.headers import NOTED_REQUEST, NOTED_RESPONSE, Request, forwarded_fields, new_request_id

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# A field line of RFC 9112 with no obs-fold: name, colon, value and whitespace of visible bytes, SP and HTAB.
_FIELDS = rb"((?:" + _TOKEN + rb":[\t -~\x80-\xff]*\r\n)*)\r\n"
# A request is the whole read (fullmatch); a response's body follows its head (match), and must end the read.
_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (/[!-~]*) HTTP/1\.1\r\n" + _FIELDS)
_RESPONSE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9]) [\t -~\x80-\xff]*\r\n" + _FIELDS)


def _noted(names: Iterable[bytes]) -> re.Pattern[bytes]:
    """The fields the parser's head builders act on (runtime.router.headers), with their values and any trailing
    whitespace. Searched from the newline before the first field: the engine skips from newline to newline,
    where `^` in multi-line mode would be tried at every byte."""
    return re.compile(rb"\n(" + b"|".join(map(re.escape, names)) + rb"):[ \t]*([^\r]*)", re.I)


_REQUEST_NOTED = _noted(NOTED_REQUEST)
_RESPONSE_NOTED = _noted(NOTED_RESPONSE)
# `Connection: keep-alive` (browsers, httpx, Node's responses) says what HTTP/1.1 means anyway; it and a Keep-Alive
# field are hop-by-hop all the same, so they are dropped.
# Each goes with the line break before it, so a head's last field line keeps its own.
_KEEP_ALIVE_FIELDS = re.compile(rb"\r\n(?:connection|keep-alive):[^\r]*", re.I)


def _says_keep_alive(name: bytes, value: bytes) -> bool:
    return name == b"keep-alive" or (name == b"connection" and value.rstrip(b" \t").lower() == b"keep-alive")


def simple_request(data: bytes, peer: bytes, proto: bytes) -> Request | None:
    """`data` as a request for an app, with the head to forward, if it is exactly one simple request."""
    match = _REQUEST.fullmatch(data)
    if match is None:
        return None
    host = b""
    as_html = has_request_id = drop = False
    for name, value in _REQUEST_NOTED.findall(data, match.start(3) - 1):
        name = name.lower()
        if name == b"host" and not host and (value := value.rstrip(b" \t")):
            host = value
        elif name == b"accept":
            as_html = b"text/html" in value  # the last one, as the parser's builder reads it
        elif name == b"x-request-id" and not has_request_id:
            has_request_id = True
        elif _says_keep_alive(name, value):
            drop = True
        else:
            return None
    if not host:
        return None
    head = data[:-2]  # all but the blank line, which comes after the fields added here
    request = Request(match[1], http11=True, keep_alive=True, upgrade=False)
    request.host = host.decode("latin-1")
    request.as_html = as_html
    request.head = b"%s%s%s" % (_KEEP_ALIVE_FIELDS.sub(b"", head) if drop else head,
                                b"" if has_request_id else b"X-Request-Id: %s\r\n" % new_request_id(),
                                forwarded_fields(peer, proto, host))
    return request


def simple_response(data: bytes) -> tuple[bytes, int] | None:
    """`data` for the client, and how many bytes of its body are still to come, if it starts a simple response:
    HTTP/1.1, a status with a body, one Content-Length and no hop-by-hop field but keep-alive ones, nothing after
    its end."""
    match = _RESPONSE.match(data)
    if match is None or match[1] == b"204" or match[1] == b"304":
        return None
    end = match.end(2)
    length = b""
    drop = False
    for name, value in _RESPONSE_NOTED.findall(data, match.start(2) - 1, end):
        name = name.lower()
        if name == b"content-length" and not length and (value := value.rstrip(b" \t")).isdigit():
            length = value
        elif _says_keep_alive(name, value):
            drop = True
        else:
            return None
    if not length:
        return None
    rest = match.end() + int(length) - len(data)
    if rest < 0:
        return None
    if drop:
        return _KEEP_ALIVE_FIELDS.sub(b"", data[:end]) + data[end:], rest
    return data, rest
