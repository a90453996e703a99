"""The unprivileged user that builds and app processes run as when the daemon runs as root."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path


class AppUser:
    def __init__(self, name: str) -> None:
        entry = pwd.getpwnam(name)
        self.name = name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid

    def drop_privileges(self) -> None:
        """A preexec_fn: the child runs as this user, with no supplementary groups."""
        os.setgroups([])
        os.setgid(self.gid)
        os.setuid(self.uid)

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

    def own(self, path: Path) -> None:
        """Give one directory (not what is in it) to the user."""
        os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def own_tree(self, directory: Path) -> None:
        """Give a tree root just wrote (a fresh export) to the user: builds and apps write where they run.

        fwalk with dir fds and no symlink following, so nothing in the tree can redirect a chown.
        """
        self.own(directory)
        for _, dirs, files, dir_fd in os.fwalk(directory, follow_symlinks=False):
            for name in dirs + files:
                os.chown(name, self.uid, self.gid, dir_fd=dir_fd, follow_symlinks=False)


def app_user_for(name: str | None) -> AppUser | None:
    """Only root switches users; anyone else runs apps as themselves."""
    return AppUser(name) if name and os.getuid() == 0 else None
