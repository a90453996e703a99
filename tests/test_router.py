"""The built-in router against real app servers: stdlib HTTP servers and a websockets server on loopback.

The router runs on its own event loop thread (asyncio's and uvloop's), driven by httpx, the websockets
client and raw sockets, as browsers and curl would drive it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, TypeVar

import httpx
import pytest
import uvloop
from conftest import free_port
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from runtime.router.builtin_impl import BuiltinRouter
from runtime.router.config import RouterConfig
from runtime.router.routes import RouteTable

MiB = 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB of a pattern, so truncation or reordering shows in the digest
WAIT = 20  # seconds any single wait may take before the test fails, never a speed assertion
T = TypeVar("T")


# --- apps ------------------------------------------------------------------------------------------------


class AppServer(ThreadingHTTPServer):
    """A stdlib HTTP/1.1 app on a free port; `stop` closes its connections too, so every thread ends."""

    daemon_threads = False  # server_close joins the handler threads

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), AppHandler)
        self.name = name
        self.port = self.server_address[1]
        self.connections: set[socket.socket] = set()
        self.sse_acks: list[threading.Event] = []
        self.sse_timeouts = 0
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self.serve_forever, name=f"app-{name}")
        self.thread.start()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.shutdown()
        self.thread.join(WAIT)
        with self.lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.server_close()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client the router cut off (timeouts, aborted exchanges) is expected here


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # head and body in one write: unbuffered, Nagle and delayed ACKs cost 40 ms a request
    server: AppServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle_expect_100(self) -> bool:
        super().handle_expect_100()
        self.wfile.flush()
        return True

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "1234")
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/download":
            size = int(self.path.partition("=")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for offset in range(0, size, len(BLOCK)):
                self.wfile.write(BLOCK[: min(len(BLOCK), size - offset)])
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"alpha,", b"beta,", b"gamma"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/until-close":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"read me until the connection closes")
            self.close_connection = True
        elif path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only ten b")
            self.close_connection = True
        elif path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, ack in enumerate(self.server.sse_acks):
                event = f"data: event {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if not ack.wait(WAIT):  # the client has not seen this event: the router held it back
                    self.server.sse_timeouts += 1
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.reply({"app": self.server.name, "method": self.command, "path": self.path,
                        "headers": [[k, v] for k, v in self.headers.items()], "peer_port": self.client_address[1]})

    def do_POST(self) -> None:
        digest, size = hashlib.sha256(), 0
        for chunk in self.body():
            digest.update(chunk)
            size += len(chunk)
        self.reply({"app": self.server.name, "size": size, "sha256": digest.hexdigest(),
                    "chunked": "chunked" in self.headers.get("Transfer-Encoding", ""),
                    "peer_port": self.client_address[1]})

    def body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0], 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            return
        remaining = int(self.headers.get("Content-Length", 0))
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def reply(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class EchoWebSocketApp:
    def __init__(self) -> None:
        self.server = ws_serve(self.echo, "127.0.0.1", 0, compression=None)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="app-ws")
        self.thread.start()

    @staticmethod
    def echo(conn: ServerConnection) -> None:
        for message in conn:
            conn.send(message)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(WAIT)


class RawApp:
    """An app written with bare sockets, for misbehaviour the stdlib server will not produce."""

    def __init__(self, serve: Callable[[socket.socket, BinaryIO], None]) -> None:
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self.accept, name="app-raw")
        self.thread.start()

    def accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self.handle, args=(conn,))
            thread.start()
            self.threads.append(thread)

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with conn, conn.makefile("rb") as f:
            try:
                self.serve(conn, f)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(WAIT)
        self.listener.close()
        for thread in self.threads:
            thread.join(WAIT)


def read_request_head(f: BinaryIO) -> bytes:
    head = b""
    while (line := f.readline()) not in (b"\r\n", b""):
        head += line
    return head


# --- the router on its own loop --------------------------------------------------------------------------


class RouterThread:
    """A BuiltinRouter on its own event loop thread, as the daemon's loop would run it, stopped by `stop`."""

    def __init__(self, loop_name: str, config: RouterConfig) -> None:
        self.loop = uvloop.new_event_loop() if loop_name == "uvloop" else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"router-{loop_name}")
        self.thread.start()
        self.router = BuiltinRouter("127.0.0.1", 0, config=config)
        self.run(self.router.start())
        self.port = self.router.port

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def stop(self) -> None:
        self.run(self.router.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()

    def client(self, host: str) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers={"Host": host}, timeout=WAIT)

    def socket(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)


CONFIG = RouterConfig(head_timeout=1.0, body_timeout=1.0)


@pytest.fixture(scope="module")
def apps() -> Iterator[tuple[AppServer, AppServer]]:
    one, two = AppServer("one"), AppServer("two")
    yield one, two
    one.stop()
    two.stop()


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def proxy(request: pytest.FixtureRequest, apps: tuple[AppServer, AppServer]) -> Iterator[RouterThread]:
    router = RouterThread(request.param, CONFIG)
    one, _ = apps
    router.router.set_app("web", ["web.localhost", "www.example.test"], [("127.0.0.1", one.port)])
    yield router
    router.stop()


def read_response(f: BinaryIO, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response from a raw connection, leaving any that follow in the buffer."""
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("the router closed the connection")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head or status < 200 or status in (204, 304):
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().split(b";")[0], 16):
            body += f.read(size)
            f.readline()
        f.readline()
        return status, headers, body
    return status, headers, f.read()


def header(payload: dict, name: str) -> list[str]:
    return [v for k, v in payload["headers"] if k.lower() == name.lower()]


# --- routing ---------------------------------------------------------------------------------------------


def test_routes_by_host_case_insensitive_and_without_port(proxy: RouterThread) -> None:
    for host in ("web.localhost", "WEB.LocalHost", f"web.localhost:{proxy.port}", "www.example.test.",
                 "Www.Example.Test:80"):
        with proxy.client(host) as client:
            response = client.get("/hello?x=1")
        assert response.status_code == 200, host
        assert response.json()["app"] == "one"
        assert response.json()["path"] == "/hello?x=1"


def test_a_host_as_sent_follows_route_changes(proxy: RouterThread, apps: tuple[AppServer, AppServer]) -> None:
    """The router remembers how each Host header as sent resolves; a route change must forget it."""
    one, two = (("127.0.0.1", app.port) for app in apps)
    try:
        with proxy.client(f"Moving.LocalHost:{proxy.port}") as client:
            assert client.get("/").status_code == 404
            proxy.router.set_app("moving-a", ["moving.localhost"], [two])
            assert client.get("/").json()["app"] == "two"
            proxy.router.set_app("moving-b", ["moving.localhost"], [one])
            assert client.get("/").json()["app"] == "one"
            proxy.router.remove_app("moving-b")
            proxy.router.remove_app("moving-a")
            assert client.get("/").status_code == 404
    finally:
        proxy.router.remove_app("moving-a")
        proxy.router.remove_app("moving-b")


def test_only_host_names_that_can_exist_are_remembered() -> None:
    """A client sending made-up Host headers of 64 KiB each must not make the router keep them."""
    table = RouteTable()
    table.set_app("one", ["one.localhost"], [("127.0.0.1", 1)])
    assert table.lookup("x" * 60_000 + ".localhost") is None
    assert table.lookup("ONE.localhost:8080").app == "one"
    assert list(table._table[1]) == ["ONE.localhost:8080"]

def test_unknown_host_gets_a_clear_404(proxy: RouterThread) -> None:
    with proxy.client("nope.localhost") as client:
        text = client.get("/")
        page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert text.status_code == 404
    assert text.text == "no app is served at nope.localhost\n"
    assert text.headers["content-type"].startswith("text/plain")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "no app is served at nope.localhost" in page.text


def test_app_without_upstream_gets_503(proxy: RouterThread) -> None:
    proxy.router.set_app("sleepy", ["sleepy.localhost"], [])
    with proxy.client("sleepy.localhost") as client:
        response = client.get("/")
    assert response.status_code == 503
    assert response.text == "sleepy has no healthy web process\n"


def test_every_upstream_refusing_gets_502(proxy: RouterThread) -> None:
    proxy.router.set_app("down", ["down.localhost"], [("127.0.0.1", free_port()), ("127.0.0.1", free_port())])
    with proxy.client("down.localhost") as client:
        first, second = client.get("/"), client.get("/")
    assert first.status_code == second.status_code == 502
    assert "down is not answering" in first.text


def test_refused_replica_is_skipped(proxy: RouterThread, apps: tuple[AppServer, AppServer]) -> None:
    proxy.router.set_app("half", ["half.localhost"], [("127.0.0.1", free_port()), ("127.0.0.1", apps[1].port)])
    with proxy.client("half.localhost") as client:
        responses = [client.get("/") for _ in range(6)]
    assert [r.status_code for r in responses] == [200] * 6
    assert {r.json()["app"] for r in responses} == {"two"}


def test_a_replica_whose_port_another_uid_holds_is_skipped(proxy: RouterThread,
                                                          apps: tuple[AppServer, AppServer]) -> None:
    """The route names the app's uid: a connection a socket of another uid accepted is not used (that tenant
    bound the port while the app's process was down), as if it were refused."""
    mine, theirs = os.geteuid(), os.geteuid() + 1
    proxy.router.set_app("owned", ["owned.localhost"], [("127.0.0.1", apps[0].port)], owner=theirs)
    with proxy.client("owned.localhost") as client:
        assert client.get("/").status_code == 502
    proxy.router.set_app("owned", ["owned.localhost"], [("127.0.0.1", apps[0].port), ("127.0.0.1", apps[1].port)],
                         owner=mine)
    with proxy.client("owned.localhost") as client:
        assert {client.get("/").json()["app"] for _ in range(4)} == {"one", "two"}


def test_balances_round_robin_over_replicas(proxy: RouterThread, apps: tuple[AppServer, AppServer]) -> None:
    proxy.router.set_app("pair", ["pair.localhost"], [("127.0.0.1", apps[0].port), ("127.0.0.1", apps[1].port)])
    with proxy.client("pair.localhost") as client:
        seen = Counter(client.get("/").json()["app"] for _ in range(10))
    assert seen == {"one": 5, "two": 5}


def test_remove_app_stops_routing(proxy: RouterThread, apps: tuple[AppServer, AppServer]) -> None:
    proxy.router.set_app("gone", ["gone.localhost"], [("127.0.0.1", apps[0].port)])
    with proxy.client("gone.localhost") as client:
        assert client.get("/").status_code == 200
        proxy.router.remove_app("gone")
        assert client.get("/").status_code == 404


# --- headers ---------------------------------------------------------------------------------------------


def test_forwarded_headers_reach_the_app(proxy: RouterThread) -> None:
    with proxy.client("Web.localhost:8080") as client:
        plain = client.get("/").json()
        forwarded = client.get("/", headers={"X-Forwarded-For": "203.0.113.7", "X-Request-Id": "req-42",
                                             "X-Forwarded-Proto": "https", "Connection": "keep-alive, X-Secret",
                                             "X-Secret": "hop"}).json()
    assert header(plain, "X-Forwarded-For") == ["127.0.0.1"]
    assert header(plain, "X-Forwarded-Proto") == ["http"]
    assert header(plain, "X-Forwarded-Host") == ["Web.localhost:8080"]
    assert header(plain, "Host") == ["Web.localhost:8080"]
    assert len(header(plain, "X-Request-Id")[0]) == 32
    assert header(forwarded, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert header(forwarded, "X-Request-Id") == ["req-42"]
    assert header(forwarded, "X-Forwarded-Proto") == ["http"]
    assert header(forwarded, "X-Secret") == [] and header(forwarded, "Connection") == []


# --- connections -----------------------------------------------------------------------------------------


def test_keep_alive_reuses_client_and_upstream_connections(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        ports = set()
        for _ in range(3):
            sock.sendall(b"GET /keep HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
            status, headers, body = read_response(f)
            assert status == 200 and "connection" not in headers
            ports.add(json.loads(body)["peer_port"])
    assert len(ports) == 1  # the app saw one connection from the router for all three


def test_a_request_with_a_body_reuses_only_a_recently_used_connection(apps: tuple[AppServer, AppServer]) -> None:
    """A body cannot go twice, so it never rides a connection the app may be closing for being idle too long;
    a request that can go again (no body) reuses the connection whatever its idle time."""
    proxy = RouterThread("uvloop", RouterConfig(safe_reuse_idle=0.3))
    proxy.router.set_app("web", ["web.localhost"], [("127.0.0.1", apps[0].port)])
    try:
        with proxy.client("web.localhost") as client:
            first = client.get("/keep").json()["peer_port"]
            assert client.post("/", content=b"soon").json()["peer_port"] == first
            time.sleep(0.5)
            later = client.post("/", content=b"later").json()["peer_port"]
            time.sleep(0.5)
            again = client.get("/keep").json()["peer_port"]
    finally:
        proxy.stop()
    assert later != first and again == later


def test_http10_client_gets_close_delimited_body(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /chunked HTTP/1.0\r\nHost: web.localhost\r\n\r\n")
        status, headers, body = read_response(f)
    assert status == 200 and headers["connection"] == "close" and "transfer-encoding" not in headers
    assert body == b"alpha,beta,gamma"


@pytest.mark.parametrize(("request_bytes", "connection", "stays_open"), [
    (b"GET /keep HTTP/1.0\r\nHost: web.localhost\r\nConnection: keep-alive\r\n\r\n", "keep-alive", True),
    (b"GET /keep HTTP/1.0\r\nHost: web.localhost\r\n\r\n", "close", False),
    (b"GET /keep HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n", "close", False),
])
def test_the_client_hears_whether_its_connection_stays_open(proxy: RouterThread, request_bytes: bytes,
                                                            connection: str, stays_open: bool) -> None:
    """The app answers each with a plain Content-Length response, which alone does not tell the client."""
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(request_bytes)
        status, headers, body = read_response(f)
        assert status == 200 and headers["connection"] == connection and json.loads(body)["path"] == "/keep"
        if stays_open:
            sock.sendall(request_bytes)
            assert read_response(f)[0] == 200
        else:
            assert f.read() == b""  # the router closed it


def test_pipelined_requests_are_answered_in_order(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: web.localhost\r\n\r\n"
                     b"GET /b HTTP/1.1\r\nHost: nope.localhost\r\n\r\n"
                     b"POST /c HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 3\r\n\r\nabc"
                     b"GET /d HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        responses = [read_response(f) for _ in range(4)]
    assert [status for status, _, _ in responses] == [200, 404, 200, 200]
    assert json.loads(responses[0][2])["path"] == "/a"
    assert json.loads(responses[2][2])["size"] == 3
    assert json.loads(responses[3][2])["path"] == "/d"


def test_the_rest_of_a_request_is_never_read_as_a_new_one(proxy: RouterThread) -> None:
    """A read that starts where a request head broke off continues it, even when it looks like a whole request
    the router could send on without its parser."""
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: web.localhost\r\n\r\nGET /b HTTP/1.1\r\nX-Part: ")
        assert json.loads(read_response(f)[2])["path"] == "/a"
        sock.sendall(b"GET /c HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        payload = json.loads(read_response(f)[2])
    assert payload["path"] == "/b" and header(payload, "X-Part") == ["GET /c HTTP/1.1"]


def test_head_response_does_not_confuse_the_next_one(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        for _ in range(2):
            sock.sendall(b"HEAD / HTTP/1.1\r\nHost: web.localhost\r\n\r\n"
                         b"GET /after HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
            status, headers, _ = read_response(f, head=True)
            assert status == 200 and headers["content-length"] == "1234"
            status, _, body = read_response(f)
            assert status == 200 and json.loads(body)["path"] == "/after"


def test_a_body_on_a_get_cannot_poison_the_next_request(proxy: RouterThread) -> None:
    """The stdlib app ignores a GET's body, so on a reused connection the body would be the next request."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: web.localhost\r\n\r\n"
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(smuggled), smuggled))
        assert json.loads(read_response(f)[2])["path"] == "/first"
        sock.sendall(b"GET /second HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        assert json.loads(read_response(f)[2])["path"] == "/second"


def test_expect_100_continue_is_relayed(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert read_response(f)[0] == 100
        sock.sendall(b"hello")
        status, _, body = read_response(f)
    assert status == 200 and json.loads(body)["sha256"] == hashlib.sha256(b"hello").hexdigest()


# --- bodies ----------------------------------------------------------------------------------------------


def test_streams_a_large_upload_with_content_length(proxy: RouterThread) -> None:
    data = BLOCK * (20 * MiB // len(BLOCK))
    with proxy.client("web.localhost") as client:
        result = client.post("/upload", content=data).json()
    assert (result["app"], result["size"], result["chunked"]) == ("one", len(data), False)
    assert result["sha256"] == hashlib.sha256(data).hexdigest()


def test_streams_a_large_chunked_upload(proxy: RouterThread) -> None:
    parts = 20 * MiB // len(BLOCK)
    with proxy.client("web.localhost") as client:
        result = client.post("/upload", content=(BLOCK for _ in range(parts))).json()
    assert result["size"] == 20 * MiB and result["chunked"]
    assert result["sha256"] == hashlib.sha256(BLOCK * parts).hexdigest()


def test_streams_a_large_download(proxy: RouterThread) -> None:
    size = 20 * MiB + 123
    digest, received = hashlib.sha256(), 0
    with proxy.client("web.localhost") as client, client.stream("GET", f"/download?size={size}") as response:
        assert response.headers["content-length"] == str(size)
        for chunk in response.iter_raw():
            digest.update(chunk)
            received += len(chunk)
    expected = hashlib.sha256((BLOCK * (size // len(BLOCK) + 1))[:size]).hexdigest()
    assert received == size and digest.hexdigest() == expected


def test_slow_reader_is_not_buffered_in_full(proxy: RouterThread) -> None:
    size = 20 * MiB

    async def buffered() -> int:  # what the router holds for its clients, beyond the kernel's socket buffers
        return max(conn.transport.get_write_buffer_size() for conn in proxy.router._connections)

    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(f"GET /download?size={size} HTTP/1.1\r\nHost: web.localhost\r\n\r\n".encode())
        time.sleep(1)  # time for a router without backpressure to take in the whole body
        assert proxy.run(buffered()) < MiB
        status, _, body = read_response(f)
    assert status == 200 and len(body) == size


def test_chunked_and_until_close_responses(proxy: RouterThread) -> None:
    with proxy.client("web.localhost") as client:
        chunked = client.get("/chunked")
        until_close = client.get("/until-close")
        after = client.get("/after")
    assert chunked.text == "alpha,beta,gamma" and chunked.headers["transfer-encoding"] == "chunked"
    assert until_close.text == "read me until the connection closes"
    assert until_close.headers["transfer-encoding"] == "chunked"  # so the client connection stays open
    assert after.status_code == 200


def test_truncated_response_is_not_passed_off_as_complete(proxy: RouterThread) -> None:
    with proxy.client("web.localhost") as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/truncated")
        assert client.get("/after").status_code == 200


def test_server_sent_events_arrive_one_by_one(proxy: RouterThread, apps: tuple[AppServer, AppServer]) -> None:
    one = apps[0]
    one.sse_acks, one.sse_timeouts = [threading.Event() for _ in range(3)], 0
    events = []
    with proxy.client("web.localhost") as client, client.stream("GET", "/sse") as response:
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                one.sse_acks[len(events) - 1].set()  # the app sends the next event only after this
    assert events == ["data: event 0", "data: event 1", "data: event 2"]
    assert one.sse_timeouts == 0


def test_websocket_echo_through_the_router(proxy: RouterThread) -> None:
    app = EchoWebSocketApp()
    try:
        proxy.router.set_app("ws", ["ws.localhost"], [("127.0.0.1", app.port)])
        with ws_connect(f"ws://ws.localhost:{proxy.port}/socket", sock=proxy.socket(), proxy=None,
                        compression=None, open_timeout=WAIT) as ws:
            for message in ("hello", "x" * 200_000, b"\x00\x01binary"):
                ws.send(message)
                assert ws.recv(WAIT) == message
    finally:
        app.stop()


def test_bytes_after_an_upgrade_request_wait_for_the_switch(proxy: RouterThread) -> None:
    after_refusal: list[bytes] = []

    def serve(conn: socket.socket, f: BinaryIO) -> None:
        if b"/refuse" in read_request_head(f):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
            after_refusal.append(f.read())  # until the router closes: nothing of what followed the request
            return
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        while data := f.read1(1024):
            conn.sendall(data)

    app = RawApp(serve)
    upgrade = b"GET /%s HTTP/1.1\r\nHost: echo.localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    try:
        proxy.router.set_app("echo", ["echo.localhost"], [("127.0.0.1", app.port)])
        with proxy.socket() as sock, sock.makefile("rb") as f:
            sock.sendall(upgrade % b"switch" + b"early")
            assert read_response(f, head=True)[0] == 101
            assert f.read(5) == b"early"
            sock.sendall(b"later")
            assert f.read(5) == b"later"
        with proxy.socket() as sock, sock.makefile("rb") as f:
            sock.sendall(upgrade % b"refuse" + b"GET /smuggled HTTP/1.1\r\nHost: echo.localhost\r\n\r\n")
            status, headers, body = read_response(f)
            assert (status, body, headers["connection"]) == (200, b"no", "close")
            assert f.read() == b""
    finally:
        app.stop()
    assert after_refusal == [b""]


@pytest.mark.parametrize("answer", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"",
])
def test_broken_app_response_gets_502(proxy: RouterThread, answer: bytes) -> None:
    def serve(conn: socket.socket, f: BinaryIO) -> None:
        read_request_head(f)
        conn.sendall(answer)

    app = RawApp(serve)
    try:
        proxy.router.set_app("broken", ["broken.localhost"], [("127.0.0.1", app.port)])
        with proxy.client("broken.localhost") as client:
            assert client.get("/").status_code == 502
    finally:
        app.stop()


def test_a_body_that_comes_in_pieces_is_passed_on_and_bytes_past_its_end_are_not(proxy: RouterThread) -> None:
    def serve(conn: socket.socket, f: BinaryIO) -> None:
        read_request_head(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        time.sleep(0.2)
        conn.sendall(b"-half" + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")  # answers no request
        read_request_head(f)  # the connection is out of step: a request sent on it would get "evil!"
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwrong")

    app = RawApp(serve)
    try:
        proxy.router.set_app("pieces", ["pieces.localhost"], [("127.0.0.1", app.port)])
        with proxy.client("pieces.localhost") as client:
            assert [client.get("/").content for _ in range(2)] == [b"first-half"] * 2
    finally:
        app.stop()


def test_request_is_retried_when_the_app_drops_a_reused_connection(proxy: RouterThread) -> None:
    def serve(conn: socket.socket, f: BinaryIO) -> None:
        """Answer the first request on a connection; close on the second unanswered, as after an idle timeout."""
        head = read_request_head(f)
        if b"Content-Length: 4" in head:
            f.read(4)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        read_request_head(f)

    app = RawApp(serve)
    try:
        proxy.router.set_app("flaky", ["flaky.localhost"], [("127.0.0.1", app.port)])
        with proxy.client("flaky.localhost") as client:
            assert [client.get("/").status_code for _ in range(5)] == [200] * 5
            statuses = {client.post("/", content=b"body").status_code for _ in range(5)}
    finally:
        app.stop()
    assert statuses <= {200, 502}  # a body may have been consumed: never sent twice


def test_a_post_is_never_sent_twice_even_without_a_body(proxy: RouterThread) -> None:
    """The app may have acted on a POST it read before closing the connection: no retry, a 502 instead."""
    seen: list[bytes] = []

    def serve(conn: socket.socket, f: BinaryIO) -> None:
        read_request_head(f)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        seen.append(read_request_head(f).split(b" ", 1)[0])  # the second request on a connection: read, then close

    app = RawApp(serve)
    try:
        proxy.router.set_app("once", ["once.localhost"], [("127.0.0.1", app.port)])
        with proxy.client("once.localhost") as client:
            assert client.get("/").status_code == 200
            assert client.post("/").status_code == 502
    finally:
        app.stop()
    assert seen == [b"POST"]


def test_close_lets_requests_in_flight_finish(apps: tuple[AppServer, AppServer]) -> None:
    one = apps[0]
    one.sse_acks, one.sse_timeouts = [threading.Event() for _ in range(2)], 0
    proxy = RouterThread("uvloop", CONFIG)
    proxy.router.set_app("web", ["web.localhost"], [("127.0.0.1", one.port)])
    closing = threading.Thread(target=proxy.stop)
    events = []
    try:
        with proxy.client("web.localhost") as client, client.stream("GET", "/sse") as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        closing.start()
                        wait_until(lambda: proxy.router._server is None)
                    one.sse_acks[len(events) - 1].set()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{proxy.port}/", headers={"Host": "web.localhost"})
    finally:
        closing.join(WAIT)
    assert events == ["data: event 0", "data: event 1"] and one.sse_timeouts == 0


# --- bad clients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n", 400),
    (b"CONNECT web.localhost:443 HTTP/1.1\r\nHost: web.localhost\r\n\r\n", 405),
    (b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: web.localhost\r\n" + b"X-Many: header\r\n" * 5000 + b"\r\n", 431),
])
def test_bad_requests_get_an_error_and_the_router_carries_on(proxy: RouterThread, request_bytes: bytes,
                                                             status: int) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(request_bytes)
        got, headers, _ = read_response(f)
        assert f.read() == b""  # then the router closes the connection
    assert got == status and headers["connection"] == "close"
    with proxy.client("web.localhost") as client:
        assert client.get("/").status_code == 200


def test_endless_head_gets_431_without_waiting_for_its_end(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Endless: ")
        try:
            for _ in range(200):
                sock.sendall(b"a" * 1024)
        except OSError:
            pass  # the router already answered and closed
        assert read_response(f)[0] == 431


def test_slow_request_head_is_timed_out(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web.lo")
        assert read_response(f)[0] == 408


def test_stalled_request_body_is_timed_out(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 100\r\n\r\nonly some")
        assert read_response(f)[0] == 408


def test_idle_keep_alive_connection_is_closed(proxy: RouterThread) -> None:
    with proxy.socket() as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        assert read_response(f)[0] == 200
        assert f.read() == b""  # closed after head_timeout without a byte sent back


# --- zero downtime ---------------------------------------------------------------------------------------


def test_swap_under_load_fails_no_request(proxy: RouterThread, apps: tuple[AppServer, AppServer]) -> None:
    old = AppServer("old")
    proxy.router.set_app("swap", ["swap.localhost"], [("127.0.0.1", old.port)])
    seen: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def load() -> None:
        with proxy.client("swap.localhost") as client:
            for _ in range(5000):
                try:
                    response = client.get("/")
                    outcome = response.json()["app"] if response.status_code == 200 else f"{response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with lock:
                    seen[outcome] += 1
                    if outcome not in ("old", "new"):
                        failures.append(outcome)
                if done.is_set():
                    return

    def total() -> int:
        with lock:
            return sum(seen.values())

    workers = [threading.Thread(target=load) for _ in range(4)]
    new = AppServer("new")
    try:
        for worker in workers:
            worker.start()
        wait_until(lambda: total() >= 100)
        proxy.router.set_app("swap", ["swap.localhost"], [("127.0.0.1", new.port)])
        time.sleep(0.5)  # the caller's drain grace: requests already sent to the old process finish there
        old.stop()
        after_stop = total()
        wait_until(lambda: total() >= after_stop + 200)
    finally:
        done.set()
        for worker in workers:
            worker.join(WAIT * 3)
        old.stop()
        new.stop()
    assert failures == []
    assert seen["old"] > 0 and seen["new"] >= 200


def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(WAIT * 100):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("the condition did not come true in time")
