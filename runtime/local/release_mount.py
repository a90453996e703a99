"""Each app process sees its own release at /app, as on Heroku and Dokku, in a mount namespace of its own.

Apps and their scripts write under /app and find their files there. Under a root daemon (with CAP_SYS_ADMIN)
the launcher of every app process and one-off process unshares its mount namespace and bind-mounts the
release directory at /app; the host's /app is untouched, and only an empty mount point is made where there
is none. Elsewhere processes run in their release directory, wherever it is.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

MOUNT_POINT = Path("/app")
CAP_SYS_ADMIN = 21
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000


def mount_point() -> Path | None:
    """/app when each process can have it (root with CAP_SYS_ADMIN, /app a directory or missing), else None."""
    if os.geteuid() != 0 or not _capable(CAP_SYS_ADMIN):
        return None
    try:
        info = os.lstat(MOUNT_POINT)
    except FileNotFoundError:
        MOUNT_POINT.mkdir(mode=0o755)
        log.info("made %s (empty, root's) the mount point where each app process sees its release",
                 MOUNT_POINT)
        return MOUNT_POINT
    if not stat.S_ISDIR(info.st_mode):
        log.warning("%s is not a directory: app processes run in their release directories instead",
                    MOUNT_POINT)
        return None
    return MOUNT_POINT


def enter(release: str, at: Path) -> None:
    """In a fresh single-threaded process running as root: a mount namespace of its own with `release` at `at`.

    Mounts become slaves, not shared: nothing mounted here reaches the host, while the host's unmounts still
    reach here (no filesystem stays busy because an app process holds a copy of its mount). The release is
    opened without following a final link, and mounted through that descriptor.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        _raise("unshare the mount namespace")
    _mount(libc, None, "/", MS_REC | MS_SLAVE)
    fd = os.open(release, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _mount(libc, f"/proc/self/fd/{fd}", str(at), MS_BIND)
    finally:
        os.close(fd)


def _mount(libc: ctypes.CDLL, source: str | None, target: str, flags: int) -> None:
    if libc.mount(source.encode() if source else None, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        _raise(f"mount {source or ''} on {target}")


def _raise(what: str) -> None:
    code = ctypes.get_errno() or errno.EPERM
    raise OSError(code, f"cannot {what}: {os.strerror(code)}")


def _capable(capability: int) -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    effective = next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0")
    return bool(int(effective, 16) >> capability & 1)
