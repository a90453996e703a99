"""A stdlib web app whose one dependency (six) pipenv installs from the committed lockfile."""
import http.server
import os

import six


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        data = f"pipenv v1 with six {six.__version__}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
