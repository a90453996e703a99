"""The web process of static-site apps: serves one directory on $PORT.

Unlike `python -m http.server` it lists no directories and serves no dotfiles or symlinks
that lead out of the site, since a pushed tree is whatever the user committed.
Run as `python -I static_server.py <directory>`; it only needs the standard library.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO


class StaticHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send_head(self) -> BinaryIO | None:
        path = self.translate_path(self.path)
        root = os.path.realpath(self.directory)
        relative = os.path.relpath(path, self.directory)
        hidden = any(part.startswith(".") for part in relative.split(os.sep) if part not in (".", ""))
        outside = os.path.commonpath([root, os.path.realpath(path)]) != root
        if hidden or outside:
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        return super().send_head()

    def list_directory(self, path: str) -> None:
        self.send_error(HTTPStatus.NOT_FOUND)
        return None


def main() -> None:
    directory = sys.argv[1] if len(sys.argv) > 1 else "."
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "5000"))),
                                 partial(StaticHandler, directory=directory))
    # Stop accepting on SIGTERM and let the runtime's graceful stop finish.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"serving {os.path.abspath(directory)} on port {server.server_port}", flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
