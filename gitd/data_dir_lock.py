"""One daemon per data dir: two would race on the same repositories, database and app processes."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirLock:
    """An exclusive flock on `DATA_DIR/daemon.lock`, held for the daemon's life and freed by the kernel at exit.

    The file names the holder's pid so the refusal can say which process to look at.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "daemon.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SystemExit(f"devflow: another daemon (pid {holder}) is already serving {self.path.parent}; "
                             "stop it first, or give this one its own --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
