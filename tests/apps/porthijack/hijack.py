"""Binds the port $TARGET names (another app's) the moment it is free, and answers whatever comes, saying what
came: what a hostile tenant does while that app's process restarts."""

import http.server
import os
import socket
import time

port = int(os.environ["TARGET"])
while True:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        break
    except OSError:
        sock.close()
        time.sleep(0.0005)
sock.listen(64)
print("bound the port", flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("got a request for", self.headers.get("Host"), "with", self.headers.get("Cookie"), flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "8")
        self.end_headers()
        self.wfile.write(b"hijacked")

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", port), Handler, bind_and_activate=False)
server.socket = sock
server.serve_forever()
