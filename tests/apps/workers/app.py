"""Web process of an app with a worker and a release phase: '/release' shows what the release phase wrote."""
import http.server
import os
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/release":
            stamp = Path("release.stamp")
            body = stamp.read_text() if stamp.exists() else "release phase did not run"
        elif self.path.startswith("/env/"):
            body = os.environ.get(self.path[5:], "")
        else:
            body = "workers v1"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
