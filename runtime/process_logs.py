"""One log file per app: build output and every process's lines, each timestamped and named.

The file is bounded: past `max_bytes` it becomes `app.log.1` (see runtime.rotating_log), so an app that
logs without pause keeps at most twice that on disk.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from runtime.log_lines import LINE, prefix
from runtime.rotating_log import DEFAULT_MAX_BYTES, RotatingLog, rotated


class ProcessLogs:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, app: str) -> Path:
        directory = self.root / app
        directory.mkdir(parents=True, exist_ok=True)
        return directory / "app.log"

    def write(self, app: str, source: str, text: str) -> None:
        start = prefix(source)
        lines = "".join(f"{start}{line}\n" for line in text.splitlines() or [""])
        with RotatingLog(self.path(app), self.max_bytes) as log:
            log.write(lines.encode())

    @staticmethod
    def _matches(line: str, process: str | None) -> bool:
        if process is None:
            return True
        match = LINE.match(line)
        return bool(match) and (match.group(2) == process or match.group(2).split(".")[0] == process)

    def tail(self, app: str, lines: int = 100, process: str | None = None) -> list[str]:
        """The last `lines` lines (all with 0), from the rotated file too when the current one has fewer."""
        path = self.path(app)
        try:
            log = path.open(errors="replace")
        except FileNotFoundError:  # nothing written yet, or a rotation under way: the rotated file still counts
            log = open(os.devnull)
        with log:
            kept, _ = self._recent(path, log, lines, process)
        return kept

    async def follow(self, app: str, tail: int, process: str | None = None,
                     stop: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
        """The last `tail` lines (all with 0), then new lines as they are written, until `stop()` says the reader
        went away. One open file serves both, so no line written meanwhile falls between."""
        path = self.path(app)
        path.touch()
        log = path.open(errors="replace")
        try:
            recent, partial = await asyncio.to_thread(self._recent, path, log, tail, process)  # up to 32 MiB
            for line in recent:
                yield line
            while not stop():
                line = log.readline()
                if line.endswith("\n"):
                    line, partial = partial + line, ""
                    if self._matches(line, process):
                        yield line.rstrip("\n")
                elif line:  # the writer is mid-line: the rest comes with the next read
                    partial += line
                elif _rotated_away(path, log.fileno()):  # what was written before the rotation has been read
                    log.close()
                    log = path.open(errors="replace")
                else:
                    await asyncio.sleep(0.2)
        finally:
            log.close()

    def _recent(self, path: Path, log: IO[str], lines: int, process: str | None) -> tuple[list[str], str]:
        """The last `lines` lines (all with 0) up to the end of `log`, the open current file, with the rotated
        file's before them; and the start of a line still being written."""
        kept: list[str] = []
        try:
            with rotated(path).open(errors="replace") as old:
                if os.fstat(old.fileno()).st_ino != os.fstat(log.fileno()).st_ino:  # not rotated since opened
                    kept += [line.rstrip("\n") for line in old if self._matches(line, process)]
        except FileNotFoundError:
            pass
        if lines:
            del kept[:-lines]
        partial = ""
        for line in log:
            if not line.endswith("\n"):
                partial = line
            elif self._matches(line, process):
                kept.append(line.rstrip("\n"))
                if lines and len(kept) > 2 * lines:
                    del kept[:-lines]
        return (kept[-lines:] if lines else kept), partial

    def forget(self, app: str) -> None:
        path = self.root / app / "app.log"
        path.unlink(missing_ok=True)
        rotated(path).unlink(missing_ok=True)


def _rotated_away(path: Path, fd: int) -> bool:
    try:
        return path.stat().st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
