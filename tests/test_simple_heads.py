"""The router's parser-free reading of the common exchange, against the parser it stands in for.

Whatever `simple_request` or `simple_response` accepts, llhttp (through httptools) must accept as exactly one
whole message, and what the router sends on must say the same either way. Hypothesis builds the messages from
pieces that sit on the edges: folded and padded fields, control and non-ASCII bytes, hop-by-hop and framing
fields, other versions and target forms, bytes after the message.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from httptools import HttpParserError, HttpRequestParser, HttpResponseParser

from runtime.router.headers import LENGTH, Request, read_request, response_head
from runtime.router.simple_heads import simple_request, simple_response

PEER, PROTO = b"127.0.0.9", b"https"
EXAMPLES = settings(max_examples=2000, derandomize=True, deadline=None)


class Message:
    """What the parser reports of the messages in some bytes."""

    def __init__(self) -> None:
        self.begun = self.complete = 0
        self.url = self.reason = self.body = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parser: HttpRequestParser | HttpResponseParser | None = None
        self.keep_alive = False

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # as the router asks: llhttp forgets it at the end

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def fields(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A head's first line, and its fields as (lower-case name, value without whitespace), sorted."""
    first, *lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
    pairs = []
    for line in lines:
        name, _, value = line.partition(b":")
        pairs.append((name.lower(), value.strip(b" \t")))
    return first, sorted(pairs)


def without_request_id(pairs: list[tuple[bytes, bytes]], sent: bool) -> list[tuple[bytes, bytes]]:
    """The fields less an X-Request-Id the router made up (its numbers differ from call to call)."""
    return [pair for pair in pairs if sent or pair[0] != b"x-request-id"]


def parsed_request(data: bytes) -> Request | None:
    message = Message()
    parser = message.parser = HttpRequestParser(message)
    try:
        parser.feed_data(data)
    except HttpParserError:
        return None
    if message.begun != 1 or message.complete != 1:
        return None
    return read_request(parser.get_method(), message.url, message.headers, parser.get_http_version() == "1.1",
                        message.keep_alive, parser.should_upgrade(), PEER, PROTO)


def mostly(usual: list[bytes], odd: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of `usual` nine times in ten, else one of `odd`: most messages stay near the simple form, so the
    comparison runs often, and one odd piece at a time shows which the reader must refuse."""
    return st.sampled_from(usual * (9 * len(odd)) + odd * len(usual)) if odd else st.sampled_from(usual)


SEPARATORS = mostly([b":", b": ", b":\t", b":  "], [b" :", b"::", b":\x00"])
ENDS = mostly([b"\r\n"], [b"\n", b"\r", b"\r\n "])
HOST_NAMES = mostly([b"Host", b"host", b"HOST"], [b"Host ", b" Host", b"Ho st", b"X-Host", b"Hosts"])
HOSTS = mostly([b"web.localhost", b"Web.LocalHost:8080", b"[::1]:80"], [b"", b"a\x00b", b"a\x7fb", b"caf\xc3\xa9",
                                                                        b"web.localhost\r\n folded", b"a\rb"])
USUAL_FIELDS = st.tuples(mostly([b"Accept", b"User-Agent", b"X-Custom", b"Cookie", b"Accept-Encoding"],
                                [b"", b"X\x00", b"Caf\xc3\xa9", b"X Y", b"X\x7f", b"X-Forwarded"]),
                         SEPARATORS,
                         st.one_of(mostly([b"text/html,*/*", b"*/*", b"a=b; c=d", b"  padded\t", b"caf\xc3\xa9", b"",
                                           b"\tx y\t"], [b"\x00", b"\x7f", b"a\rb", b"a\nb"]),
                                   st.binary(max_size=4)),
                         ENDS)
# Fields the router acts on, with the values that matter: one line in two is one of them.
SPECIAL_FIELDS = st.tuples(
    st.sampled_from([(b"Connection", b"keep-alive"), (b"connection", b"Keep-Alive"), (b"Connection", b"close"),
                     (b"Connection", b"keep-alive, Upgrade"), (b"Connection", b"X-Custom"),
                     (b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"keep-alive"), (b"Content-Length", b"0"),
                     (b"Content-Length", b"5"),
                     (b"Transfer-Encoding", b"chunked"), (b"transfer-encoding", b"gzip, chunked"),
                     (b"Upgrade", b"websocket"), (b"TE", b"trailers"), (b"Trailer", b"X-Checksum"),
                     (b"Expect", b"100-continue"), (b"X-Forwarded-For", b"10.0.0.1"), (b"X-Forwarded-Host", b"evil"),
                     (b"X-Forwarded-Proto", b"https"), (b"X-Request-Id", b"id-1"), (b"X-Request-Id", b""),
                     (b"X-Request-Id", b" "), (b"Accept", b"text/html"), (b"Accept", b"*/*"),
                     (b"Host", b"other.localhost"), (b"Host", b""), (b"Host", b" web.localhost "), (b"Connection", b""),
                     (b"Keep-Alive", b"")]),
    SEPARATORS, ENDS).map(lambda parts: (parts[0][0], parts[1], parts[0][1], parts[2]))
FIELD_LINES = st.lists(st.one_of(USUAL_FIELDS, SPECIAL_FIELDS), max_size=5)
REQUEST_LINES = st.tuples(
    mostly([b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"],
           [b"CONNECT", b"get", b"TRACE", b"G\x00"]),
    mostly([b"/", b"/a/b?c=d&e", b"/%7E~!$&'()*+,;=:@"],
           [b"http://web.localhost/x", b"*", b"/a b", b"/caf\xc3\xa9", b"/\x7f", b"", b"a/b"]),
    mostly([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "]),
    ENDS,
).map(lambda parts: b" ".join(parts[:3]) + parts[3])
AFTER = mostly([b""], [b"abc", b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n", b"\r\n", b"GET /"])


@EXAMPLES
@given(REQUEST_LINES, st.tuples(HOST_NAMES, SEPARATORS, HOSTS, ENDS), FIELD_LINES, st.integers(0, 5), ENDS, AFTER)
@example(b"GET / HTTP/1.1\r\n", (b"Host", b": ", b"web.localhost", b"\r\n"),
         [(b"Accept", b": ", b"text/html", b"\r\n"), (b"Accept", b": ", b"*/*", b"\r\n")], 0, b"\r\n", b"")
def test_a_request_read_without_the_parser_is_one_the_parser_reads_the_same(
        line: bytes, host: tuple[bytes, ...], lines: list[tuple[bytes, ...]], at: int, end: bytes,
        after: bytes) -> None:
    lines.insert(at, host)
    data = line + b"".join(b"".join(parts) for parts in lines) + end + after
    fast = simple_request(data, PEER, PROTO)
    if fast is None:
        return
    slow = parsed_request(data)
    assert slow is not None and slow.error is None, data
    assert (fast.method, fast.host, fast.keep_alive, fast.as_html, fast.has_body, fast.upgrade) == (
        slow.method, slow.host, slow.keep_alive, slow.as_html, slow.has_body, slow.upgrade)
    sent_id = b"x-request-id:" in data.lower()
    fast_line, fast_fields = fields(fast.head)
    slow_line, slow_fields = fields(slow.head)
    assert fast_line == slow_line
    assert without_request_id(fast_fields, sent_id) == without_request_id(slow_fields, sent_id)
    assert [name for name, _ in fast_fields].count(b"x-request-id") == 1


def test_the_requests_of_browsers_and_common_clients_are_read_without_the_parser() -> None:
    for data in (b"GET / HTTP/1.1\r\nHost: web.localhost:8080\r\n\r\n",  # wrk
                 b"GET /a?b=c HTTP/1.1\r\nHost: web.localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: web.localhost\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
                 b"Connection: keep-alive\r\nUser-Agent: python-httpx/0.28.1\r\n\r\n",
                 b"GET /page HTTP/1.1\r\nHost: web.localhost\r\nConnection: keep-alive\r\nUpgrade-Insecure-Requests: "
                 b"1\r\nAccept: text/html,application/xhtml+xml\r\nAccept-Language: en-US,en;q=0.9\r\n"
                 b"Cookie: a=b; c=d\r\n\r\n"):
        request = simple_request(data, PEER, PROTO)
        assert request is not None, data
        assert b"connection" not in request.head.lower()
        assert request.head.endswith(b"X-Forwarded-For: 127.0.0.9\r\nX-Forwarded-Proto: https\r\n"
                                     b"X-Forwarded-Host: %s\r\n\r\n" % request.host.encode())


STATUS_LINES = st.tuples(
    mostly([b"HTTP/1.1"], [b"HTTP/1.0", b"HTTP/1.2", b"http/1.1"]),
    mostly([b"200", b"201", b"404", b"500"], [b"204", b"304", b"101", b"100", b"099", b"2000", b"20"]),
    mostly([b" OK", b" ", b" Not Found"], [b"", b" Caf\xc3\xa9", b" a\x00b", b" \x7f"]),
    ENDS,
).map(lambda parts: b"%s %s%s%s" % parts)
BODIES = mostly([b"", b"abc", b"hello"], [b"hello!", b"0\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"])
LENGTHS = mostly([b"0", b"3", b"5"], [b"007", b"+3", b"3, 3", b" 3 ", b"-1", b"3\x00", b""])
RESPONSE_USUAL_FIELDS = st.tuples(
    mostly([b"Content-Type", b"Date", b"Server", b"Set-Cookie"], [b"Content-Length ", b"X\x00"]), SEPARATORS,
    st.one_of(mostly([b"text/plain", b"Thu, 26 Nov 2026 08:00:00 GMT", b"a=b; Path=/", b""], [b"\x00", b"a\rb"]),
              st.binary(max_size=4)),
    ENDS)
RESPONSE_SPECIAL_FIELDS = st.tuples(
    st.sampled_from([(b"Connection", b"keep-alive"), (b"connection", b"Keep-Alive"), (b"Connection", b"close"),
                     (b"Connection", b"upgrade"), (b"Connection", b"X-Custom"), (b"Keep-Alive", b"timeout=5"),
                     (b"Proxy-Connection", b"keep-alive"), (b"Content-Length", b"3"),
                     (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip"),
                     (b"Upgrade", b"websocket"), (b"TE", b"trailers"), (b"Trailer", b"X-Checksum")]),
    SEPARATORS, ENDS).map(lambda parts: (parts[0][0], parts[1], parts[0][1], parts[2]))
RESPONSE_FIELDS = st.lists(st.one_of(RESPONSE_USUAL_FIELDS, RESPONSE_SPECIAL_FIELDS), max_size=4)


@EXAMPLES
@given(STATUS_LINES, st.tuples(mostly([b"Content-Length", b"content-length"], [b"Content-Length "]), SEPARATORS,
                               LENGTHS, ENDS),
       RESPONSE_FIELDS, st.integers(0, 4), ENDS, BODIES)
def test_a_response_passed_on_without_the_parser_is_one_the_parser_reads_the_same(
        line: bytes, length: tuple[bytes, ...], lines: list[tuple[bytes, ...]], at: int, end: bytes,
        body: bytes) -> None:
    lines.insert(at, length)
    data = line + b"".join(b"".join(parts) for parts in lines) + end + body
    fast = simple_response(data)
    if fast is None:
        return
    response, rest = fast
    message = Message()
    parser = message.parser = HttpResponseParser(message)
    parser.feed_data(data + b"x" * rest)  # raises if llhttp finds the response invalid
    assert message.begun == 1 and message.complete == 1
    assert message.body == response.partition(b"\r\n\r\n")[2] + b"x" * rest
    request = simple_request(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n", PEER, PROTO)
    head, framing, _, _ = response_head(parser.get_status_code(), message.reason, message.headers, request)
    assert framing == LENGTH and message.keep_alive
    assert fields(response)[1] == fields(head)[1]
    assert response.split(b" ", 2)[:2] == head.split(b" ", 2)[:2]


def test_the_responses_of_common_app_servers_are_passed_on_without_the_parser() -> None:
    body = b'{"ok": true}'
    node = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\nDate: Thu, 26 Nov 2026 "
            b"08:00:00 GMT\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n" + body)
    assert simple_response(node) == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
                                     b"Date: Thu, 26 Nov 2026 08:00:00 GMT\r\n\r\n" + body, 0)
    uvicorn = (b"HTTP/1.1 404 Not Found\r\ndate: Thu, 26 Nov 2026 08:00:00 GMT\r\nserver: uvicorn\r\n"
               b"content-length: 12\r\ncontent-type: application/json\r\n\r\n" + body)
    assert simple_response(uvicorn) == (uvicorn, 0)
    assert simple_response(uvicorn[:-5]) == (uvicorn[:-5], 5)  # the rest of the body is counted as it comes
    assert simple_response(uvicorn + b"H") is None  # a byte past the end: the parser's path judges the connection
