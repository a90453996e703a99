"""Files the root daemon reads or writes inside trees the app's user owns (its build, its cache).

Build tools run app code as that user (setup.py, npm lifecycle scripts), which can plant a symlink where
root is about to write a marker or copy a lockfile, and turn the write into one anywhere on the machine.
So each path is walked one component at a time from a directory fd, never following a link.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from pipeline.builders import BuildError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_beneath(base: Path, relative: str, flags: int, create_dirs: bool) -> int:
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise ValueError(f"{relative!r} is not a path inside {base}")
    fd = os.open(base, _DIR)
    try:
        for part in parts[:-1]:
            if create_dirs:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            inner = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
        # O_NONBLOCK: a FIFO planted there must not hang the daemon on open; only regular files are used.
        file_fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644, dir_fd=fd)
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(file_fd, True)
        return file_fd
    finally:
        os.close(fd)


def _refuse(base: Path, relative: str, exc: OSError) -> BuildError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return BuildError(f"{relative} in {base.name} is (or is under) a symbolic link where the build expects a "
                          "plain file: commit the file itself")
    return BuildError(f"cannot use {relative} in {base.name}: {exc.strerror}")


def write_beneath(base: Path, relative: str, data: bytes) -> None:
    """Create or replace `base/relative` (and its directories) without following any link on the way."""
    try:
        fd = _open_beneath(base, relative, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, create_dirs=True)
    except OSError as exc:
        raise _refuse(base, relative, exc) from None
    with open(fd, "wb") as out:
        out.write(data)


def read_beneath(base: Path, relative: str) -> bytes:
    """The bytes of `base/relative`, refusing a link anywhere on the way."""
    try:
        fd = _open_beneath(base, relative, os.O_RDONLY, create_dirs=False)
    except OSError as exc:
        raise _refuse(base, relative, exc) from None
    with open(fd, "rb") as source:
        return source.read()
