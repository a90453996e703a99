"""The app log's line format, `TIMESTAMP SOURCE | TEXT`, written by the daemon and by every supervisor, and the
cutting of a process's output into such lines.

Its own small module so the supervisors, started at each deploy, import it without asyncio.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

LINE = re.compile(r"^(\S+) (\S+) \| ")
MAX_LINE_BYTES = 64 * 1024
"""The longest line taken from a process's output; a longer one goes on in pieces of this size."""


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def prefix(source: str) -> str:
    """What goes before the text: the time and the line's source (`build`, `web.1`, ...)."""
    return f"{timestamp()} {source} | "


class LineSplitter:
    """A process's output, read in chunks of at most `max_bytes`, as lines without their newline, none longer
    than `max_bytes`: what waits for a newline stays bounded however long the process's line, and a process
    that never ends its line is still heard, in pieces."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        *ended, self._pending = (self._pending + chunk).split(b"\n")
        lines = [piece for line in ended for piece in self._pieces(line)]
        while len(self._pending) > self.max_bytes:
            lines.append(self._pending[:self.max_bytes])
            self._pending = self._pending[self.max_bytes:]
        return lines

    def end(self) -> list[bytes]:
        """What is left once the output closed: a last line without its newline."""
        rest, self._pending = self._pending, b""
        return self._pieces(rest) if rest else []

    def _pieces(self, line: bytes) -> list[bytes]:
        if len(line) <= self.max_bytes:
            return [line]
        return [line[at:at + self.max_bytes] for at in range(0, len(line), self.max_bytes)]
