"""One log file per app: build output and every process's lines, each timestamped and named; and one file
per deployment with its output as the pusher saw it.

The app's file is bounded: past `max_bytes` it becomes `app.log.1` (see runtime.rotating_log), so an app
that logs without pause keeps at most twice that on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from runtime.log_lines import LINE, prefix
from runtime.rotating_log import DEFAULT_MAX_BYTES, RotatingLog, rotated

log = logging.getLogger(__name__)

WARN_EVERY = 60.0  # seconds between two warnings about log writes failing (a full disk fails every line)
TRUNCATED = b"[the rest of this deployment's output is not kept: it passed --log-max-bytes]\n"
MAX_POSTED = 10_000  # lines waiting for the log thread; past it (a disk slower than a build's output) they drop


class ProcessLogs:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._posted: queue.Queue[tuple[Path, bytes, bool] | threading.Event] = queue.Queue(MAX_POSTED)
        self._dropped: dict[str, int] = {}  # app -> lines posted while the queue was full
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._warned_at = 0.0

    def path(self, app: str) -> Path:
        directory = self.root / app
        directory.mkdir(parents=True, exist_ok=True)
        return directory / "app.log"

    def deployment_path(self, app: str, deployment_id: int) -> Path:
        return self.root / app / "deployments" / f"{deployment_id}.log"

    def write(self, app: str, source: str, text: str) -> None:
        """From a thread: written before this returns."""
        self.write_lines(app, source, text.splitlines() or [""])

    def write_lines(self, app: str, source: str, lines: list[str]) -> None:
        """From a thread: several lines (a process's output, read in chunks), a write each, so that the log
        rotates between two of them."""
        start = prefix(source)
        with RotatingLog(self.path(app), self.max_bytes) as log:
            for line in lines:
                log.write(f"{start}{line}\n".encode())

    def post(self, app: str, source: str, text: str, deployment_id: int | None = None) -> None:
        """From the event loop: never blocks. The log thread writes posted lines in order (to the deployment's
        own log too, with its id), so a slow or full disk costs log lines, never the daemon's loop."""
        self._start_writer()
        entries = [(self.path_of(app), _lines(source, text.splitlines() or [""]), True)]
        if deployment_id is not None:
            entries.append((self.deployment_path(app, deployment_id), (text + "\n").encode(), False))
        if dropped := self._dropped.get(app):
            entries.insert(0, (self.path_of(app), _lines("devflow", [f"[{dropped} lines dropped: written "
                                                                       "faster than the disk took them]"]), True))
        try:
            for entry in entries:
                self._posted.put_nowait(entry)
        except queue.Full:
            self._dropped[app] = self._dropped.get(app, 0) + 1
        else:
            self._dropped.pop(app, None)

    def path_of(self, app: str) -> Path:
        """The app log's path, without creating its directory (the log thread does)."""
        return self.root / app / "app.log"

    def flush(self) -> None:
        """From a thread: wait until every line posted so far is written."""
        if self._writer is None:
            return
        done = threading.Event()
        self._posted.put(done)
        done.wait()

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_posted, name="devflow-logs", daemon=True)
                self._writer.start()

    def _write_posted(self) -> None:
        while True:
            item = self._posted.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            path, data, rotating = item
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if rotating:
                    with RotatingLog(path, self.max_bytes) as log_file:
                        log_file.write(data)
                else:
                    self._append_bounded(path, data)
            except OSError as exc:
                if time.monotonic() - self._warned_at > WARN_EVERY:
                    self._warned_at = time.monotonic()
                    log.warning("log lines are being lost: cannot write %s: %s", path, exc.strerror)

    @staticmethod
    def _matches(line: str, process: str | None) -> bool:
        if process is None:
            return True
        match = LINE.match(line)
        return bool(match) and (match.group(2) == process or match.group(2).split(".")[0] == process)

    def _append_bounded(self, path: Path, data: bytes) -> None:
        """A deployment's own log stops at max_bytes, saying so once: a build that prints without end costs its
        own output, not the disk."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size < self.max_bytes:
                os.write(fd, data)
            elif size < self.max_bytes + len(TRUNCATED):
                os.write(fd, TRUNCATED)
        finally:
            os.close(fd)

    def forget_deployments(self, app: str, deployment_ids: list[int]) -> None:
        """From a thread: the logs of deployments no longer kept."""
        for deployment_id in deployment_ids:
            self.deployment_path(app, deployment_id).unlink(missing_ok=True)

    def tail(self, app: str, lines: int = 100, process: str | None = None) -> list[str]:
        """The last `lines` lines (all with 0), from the rotated file too when the current one has fewer.
        From a thread: lines posted before the call are in it."""
        self.flush()
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
        went away. One open file serves both, so no line written meanwhile falls between. Every read is done
        in a thread: the file is the daemon's own, but a slow disk must not stall the loop."""
        log_file = await asyncio.to_thread(self._open_for_follow, app)
        path = self.path_of(app)
        try:
            recent, partial = await asyncio.to_thread(self._recent, path, log_file, tail, process)  # up to 32 MiB
            for line in recent:
                yield line
            while not stop():
                chunk, log_file = await asyncio.to_thread(self._read_on, path, log_file)
                for line in chunk:
                    if line.endswith("\n"):
                        line, partial = partial + line, ""
                        if self._matches(line, process):
                            yield line.rstrip("\n")
                    else:  # the writer is mid-line: the rest comes with the next read
                        partial += line
                if not chunk:
                    await asyncio.sleep(0.2)
        finally:
            await asyncio.to_thread(log_file.close)

    def _open_for_follow(self, app: str) -> IO[str]:
        self.flush()
        path = self.path(app)
        path.touch()
        return path.open(errors="replace")

    @staticmethod
    def _read_on(path: Path, log_file: IO[str], most: int = 1000) -> tuple[list[str], IO[str]]:
        """Up to `most` lines from where `log_file` is; at its end, the file the path names now if it was
        rotated away (everything written before the rotation having been read)."""
        lines = []
        while len(lines) < most and (line := log_file.readline()):
            lines.append(line)
        if not lines and _rotated_away(path, log_file.fileno()):
            log_file.close()
            log_file = path.open(errors="replace")
        return lines, log_file

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
        self.flush()
        path = self.path_of(app)
        path.unlink(missing_ok=True)
        rotated(path).unlink(missing_ok=True)
        directory = path.parent / "deployments"
        if directory.is_dir():
            for entry in directory.iterdir():
                entry.unlink()
            directory.rmdir()


def _lines(source: str, lines: list[str]) -> bytes:
    start = prefix(source)
    return "".join(f"{start}{line}\n" for line in lines).encode()


def _rotated_away(path: Path, fd: int) -> bool:
    try:
        return path.stat().st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
