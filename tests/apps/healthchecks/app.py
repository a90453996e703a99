"""Answers its app.json health check on '/health'; '/hooks' shows which deploy hooks ran."""
import http.server
import os
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = "ok"
        elif self.path == "/hooks":
            body = ",".join(name for name in ("predeploy", "postdeploy") if Path(f"{name}.stamp").exists())
        elif self.path.startswith("/env/"):
            body = os.environ.get(self.path[5:], "")
        else:
            body = "healthchecks v1"
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
