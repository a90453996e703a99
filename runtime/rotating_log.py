"""An append-only log file that several processes write and that stays bounded: past `max_bytes` it becomes
`NAME.1` (replacing the previous one) and writing goes on in a fresh file.

Every app process's supervisor and the daemon append to the same app log, so rotation is decided under
an flock on the file being rotated, and a writer whose file was rotated by another one reopens the path.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Self

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
MODE = 0o640


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class RotatingLog:
    """Whole lines in, one write each (O_APPEND keeps concurrent writers' lines whole); thread-safe."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, MODE)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._follow_rotation()
            os.write(self._fd, data)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _follow_rotation(self) -> None:
        mine = os.fstat(self._fd)
        if mine.st_size < self.max_bytes and self._is_current(mine.st_ino):
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            # Under the lock, look again: another writer may have rotated this very file meanwhile.
            if self._is_current(mine.st_ino) and os.fstat(self._fd).st_size >= self.max_bytes:
                os.replace(self.path, rotated(self.path))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1
        self._fd = self._open()

    def _is_current(self, inode: int) -> bool:
        try:
            return os.stat(self.path).st_ino == inode
        except FileNotFoundError:
            return False
