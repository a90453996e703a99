"""One log file per app: build output and every process's lines, each timestamped and named."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

LINE = re.compile(r"^(\S+) (\S+) \| ")


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ProcessLogs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, app: str) -> Path:
        directory = self.root / app
        directory.mkdir(parents=True, exist_ok=True)
        return directory / "app.log"

    def write(self, app: str, source: str, text: str) -> None:
        with self.path(app).open("a") as log:
            for line in text.splitlines() or [""]:
                log.write(f"{timestamp()} {source} | {line}\n")

    @staticmethod
    def _matches(line: str, process: str | None) -> bool:
        if process is None:
            return True
        match = LINE.match(line)
        return bool(match) and (match.group(2) == process or match.group(2).split(".")[0] == process)

    def tail(self, app: str, lines: int = 100, process: str | None = None) -> list[str]:
        path = self.path(app)
        if not path.exists():
            return []
        with path.open(errors="replace") as log:
            kept = [line.rstrip("\n") for line in log if self._matches(line, process)]
        return kept[-lines:] if lines else kept

    async def follow(self, app: str, process: str | None = None,
                     stop: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
        """New lines as they are written, until `stop()` says the reader went away."""
        path = self.path(app)
        path.touch()
        with path.open(errors="replace") as log:
            log.seek(0, 2)
            while not stop():
                line = log.readline()
                if not line:
                    await asyncio.sleep(0.2)
                    continue
                if self._matches(line, process):
                    yield line.rstrip("\n")

    def forget(self, app: str) -> None:
        path = self.root / app / "app.log"
        path.unlink(missing_ok=True)
