"""The unprivileged user an app's builds and processes run as when the daemon runs as root.

By default every app gets a uid of its own (no /etc/passwd entry needed, as with containers run under an
arbitrary uid): one app cannot read another's build, caches or process environment (/proc/PID/environ
is readable by the same uid only). `--app-user NAME` runs every app as one named user instead.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from collections.abc import Callable
from pathlib import Path

from runtime.local import app_trees

PRIVATE = 0o700
_NO_FOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class AppUser:
    def __init__(self, uid: int, gid: int, name: str) -> None:
        self.uid = uid
        self.gid = gid
        self.name = name

    @classmethod
    def named(cls, name: str) -> AppUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SystemExit(f"devflow: --app-user {name}: there is no such user on this machine") from None
        return cls(entry.pw_uid, entry.pw_gid, name)

    @classmethod
    def numbered(cls, uid: int) -> AppUser:
        return cls(uid, uid, f"uid {uid}")

    def drop_privileges(self) -> None:
        """A preexec_fn: the child runs as this user, with no supplementary groups.

        Popen's user=/group= would switch in C instead, but uvloop's subprocess_exec refuses them; this runs
        only three system calls between fork and exec, taking no lock another thread could hold."""
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)

    @property
    def preexec(self) -> Callable[[], None]:
        return self.drop_privileges

    def _allowed(self, info: os.stat_result, bits: int) -> bool:
        if info.st_uid == self.uid:
            return bool(info.st_mode & (bits << 6))
        if info.st_gid == self.gid:
            return bool(info.st_mode & (bits << 3))
        return bool(info.st_mode & bits)

    def can_search(self, directory: str) -> bool:
        """Whether the user can reach files in `directory` (x on it and every parent)."""
        path = Path(directory)
        if not path.is_absolute():
            return False
        try:
            return all(self._allowed(p.stat(), stat.S_IXOTH) for p in (path, *path.parents))
        except OSError:
            return False

    def usable_path(self, search_path: str) -> str:
        """PATH without the directories this user cannot search (e.g. under a private /root)."""
        return os.pathsep.join(d for d in search_path.split(os.pathsep) if d and self.can_search(d))

    def hand_over(self, directory: Path) -> None:
        """A directory the user may write in, created if missing; only the directory itself changes owner,
        and it becomes private to the user.

        The user may have put a link where the directory was (its cache is its own): the link is replaced,
        never followed, so root never chowns or chmods what it points at.
        """
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(directory, _NO_FOLLOW_DIR)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            directory.unlink()
            directory.mkdir()
            fd = os.open(directory, _NO_FOLLOW_DIR)
        try:
            os.fchown(fd, self.uid, self.gid)
            os.fchmod(fd, PRIVATE)
        finally:
            os.close(fd)

    def hand_over_tree(self, directory: Path, only_from: int | None = None) -> None:
        """A tree root just wrote (a fresh export): all of it to the user, the top private to it. With
        `only_from`, a tree that uid made (an app's builds and caches, before it had a uid of its own): only what
        it owns changes hands, so a link it made to someone else's file (or root's) gives nothing away.

        app_trees walks with dir fds and no link followed or FIFO opened, so nothing in the tree can redirect a
        chown or hold the walk.
        """
        app_trees.change_owner(directory, self.uid, self.gid, only_from)
        if only_from is None or os.lstat(directory).st_uid in (only_from, self.uid):
            self.hand_over(directory)


def nobody_uid() -> int:
    """The traditional unprivileged user: apps all ran as it before they had uids of their own."""
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


AppUsers = Callable[[str], AppUser]
"""App name -> the user its builds and processes run as."""


def app_users(shared_name: str | None, uid_for: Callable[[str], int]) -> AppUsers | None:
    """None unless root: anyone else runs apps as themselves. Root: one named user, else a uid per app."""
    if os.getuid() != 0:
        return None
    if shared_name:
        shared = AppUser.named(shared_name)
        return lambda app: shared
    return lambda app: AppUser.numbered(uid_for(app))
