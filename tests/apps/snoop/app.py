"""An app that tries to read what belongs to others: '/read?path=P' answers the file or the error's name."""
import http.server
import os
import urllib.parse


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/read":
            path = urllib.parse.parse_qs(url.query)["path"][0]
            try:
                with open(path, "rb") as f:
                    body = f.read(65536)
            except OSError as exc:
                body = type(exc).__name__.encode()
        elif url.path == "/list":
            path = urllib.parse.parse_qs(url.query)["path"][0]
            try:
                body = "\n".join(sorted(os.listdir(path))).encode()
            except OSError as exc:
                body = type(exc).__name__.encode()
        else:
            body = f"uid {os.getuid()} gid {os.getgid()} home {os.environ.get('HOME')}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
