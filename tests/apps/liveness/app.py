"""'/alive' answers until '/wedge' is requested; then the process stays up but answers 500 (a wedged app)."""
import http.server
import os

wedged = False


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global wedged
        if self.path == "/wedge":
            wedged = True
        status, body = (500, "wedged") if wedged and self.path == "/alive" else (200, f"alive pid {os.getpid()}")
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
