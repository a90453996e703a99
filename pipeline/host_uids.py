"""The host-wide record of app uids: which DevFlow (by its data dir) holds each one, so no two daemons on a host
ever run anything as the same uid.

One file per uid, named by it, in a directory only root can write (`--uids-dir`, /var/lib/devflow/uids). A claim
links a complete record to the uid's name: link(2) fails when the name exists, so of two daemons claiming one
uid exactly one gets it, no record is ever seen half-written, and there is no lock for a dead daemon to leave
held. A record's content reaches the disk before its name exists; the name itself may not survive a power cut
that the daemon's table survives, and then the daemon claims the uid again at its next start or, if another
daemon took it first, refuses to start, saying so: a uid is never silently shared. A record is never removed (a
destroyed app's uid stays retired, as in the daemon's own table), so `grep . /var/lib/devflow/uids/*` tells an
admin who holds what.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from runtime.local.app_trees import descend

MAX_UID = 2**32 - 3
"""(uid_t)-1 means "no change" to setuid, and -2 is `nobody` on some systems: systemd never allocates either."""
RECORD_BYTES = 64 * 1024
SUBORDINATE_IDS = (Path("/etc/subuid"), Path("/etc/subgid"))
"""Ranges handed to users' user namespaces (rootless containers): their uid 0 there is one of these here."""
SUBORDINATE_BYTES = 1024 * 1024

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class HostUidsError(RuntimeError):
    """The record cannot be used or has no uid to give; the message says what to do."""


@dataclass(frozen=True)
class Claim:
    uid: int
    data_dir: str
    holder: str
    """What runs as the uid, for people: "app web", "the router", "app web (destroyed)"."""
    since: str = ""

    def describe(self) -> str:
        return f"{self.holder} of the DevFlow at {self.data_dir}" if self.data_dir else self.holder


class HostUids:
    """This daemon's view of the record: it claims uids for itself, and reads who holds the others."""

    def __init__(self, directory: Path, fd: int, data_dir: Path) -> None:
        self.directory = directory
        self.data_dir = str(data_dir)
        self._fd = fd

    @classmethod
    def open(cls, directory: Path, data_dir: Path) -> HostUids:
        """Created if missing. Every directory on the way must be root's and writable by no one else (a sticky
        one like /tmp will do above it): whoever could swap it could show this daemon a record without the
        other daemons' uids. The one descriptor opened here is used from then on, never the path."""
        try:
            return cls(directory, _open_root_only(directory), data_dir)
        except OSError as exc:
            raise HostUidsError(f"--uids-dir {directory}: cannot use it: {exc.strerror}") from None

    def close(self) -> None:
        os.close(self._fd)

    def path(self, uid: int) -> Path:
        return self.directory / str(uid)

    def take(self, uid: int, holder: str) -> bool:
        """Claim `uid` for this daemon if nobody (this daemon included) holds it yet."""
        if not 0 < uid <= MAX_UID:
            raise ValueError(f"uid {uid} is out of range")
        try:
            scratch = self._write_scratch(holder, uid)
            try:
                os.link(scratch, str(uid), src_dir_fd=self._fd, dst_dir_fd=self._fd)
            finally:
                os.unlink(scratch, dir_fd=self._fd)
        except FileExistsError:
            return False
        except OSError as exc:
            raise HostUidsError(f"cannot claim uid {uid} in {self.directory}: {exc.strerror}") from None
        return True

    def hold(self, uid: int, holder: str) -> Claim | None:
        """Make sure this daemon holds `uid`: None when it does (now or already), else who does."""
        while not self.take(uid, holder):
            claim = self.claim_of(uid)
            if claim is not None:  # else it was given back meanwhile: free again
                return None if claim.data_dir == self.data_dir else claim
        return None

    def take_next(self, start: int, holder: str) -> int:
        """The first uid from `start` up that no DevFlow holds and no user, group or user namespace on this
        host has, now claimed for this daemon."""
        reserved = _subordinate_ranges()
        uid = max(start, 1)
        while uid <= MAX_UID:
            skip = next((end for first, end in reserved if first <= uid < end), None)
            if skip is not None:
                uid = skip
            elif not self._recorded(uid) and not _system_id(uid) and self.take(uid, holder):
                return uid
            else:
                uid += 1
        raise HostUidsError(f"no uid is left for {holder} between {start} and {MAX_UID}: give this daemon a "
                            "lower --app-uid-base")

    def give_back(self, uid: int) -> None:
        """Undo a claim this daemon made a moment ago and nothing ever ran as (it lost a race in its own
        database). Any other claim stays forever."""
        claim = self.claim_of(uid)
        if claim is not None and claim.data_dir == self.data_dir:
            os.unlink(str(uid), dir_fd=self._fd)

    def relabel(self, uid: int, holder: str) -> None:
        """Say what now holds a uid this daemon holds (an app was destroyed); the claim itself stays."""
        claim = self.claim_of(uid)
        if claim is None or claim.data_dir != self.data_dir:
            return
        try:
            os.rename(self._write_scratch(holder, uid, claim.since), str(uid),
                      src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError as exc:
            raise HostUidsError(f"cannot relabel uid {uid} in {self.directory}: {exc.strerror}") from None

    def claim_of(self, uid: int) -> Claim | None:
        try:
            fd = os.open(str(uid), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return Claim(uid, "", f"an unreadable record ({exc.strerror})")
        with open(fd, "rb") as record:
            text = record.read(RECORD_BYTES)
        try:
            fields = json.loads(text)
            return Claim(uid, str(fields["data_dir"]), str(fields["holder"]), str(fields.get("since", "")))
        except (ValueError, KeyError, TypeError):
            return Claim(uid, "", "an unreadable record")

    def _recorded(self, uid: int) -> bool:
        try:
            os.stat(str(uid), dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def _write_scratch(self, holder: str, uid: int, since: str = "") -> str:
        """A complete record under a name of this thread's own, to be linked or renamed into place."""
        name = f".claim-{os.getpid()}-{threading.get_native_id()}"
        record = {"uid": uid, "data_dir": self.data_dir, "holder": holder,
                  "since": since or datetime.now(UTC).isoformat(timespec="seconds")}
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self._fd)
        with open(fd, "w") as scratch:
            scratch.write(json.dumps(record) + "\n")
            scratch.flush()
            os.fsync(scratch.fileno())  # never an empty record after a power cut: it would hold a uid for nobody
        return name


def _open_root_only(directory: Path) -> int:
    if not directory.is_absolute() or ".." in directory.parts or len(directory.parts) < 2:
        raise HostUidsError(f"--uids-dir {directory}: give an absolute path below / without '..'")
    fd = os.open("/", _DIR)
    try:
        parts = directory.parts[1:]
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            try:
                inner = descend(fd, part, 0o700 if last else 0o755)
            except NotADirectoryError as exc:
                raise _not_root_only(directory, exc.strerror) from None
            os.close(fd)
            fd = inner
            info = os.fstat(fd)
            writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if info.st_uid != 0:
                raise _not_root_only(directory, f"{part} belongs to uid {info.st_uid}")
            if writable_by_others and (last or not info.st_mode & stat.S_ISVTX):
                raise _not_root_only(directory, f"{part} is writable by others (mode {stat.filemode(info.st_mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_root_only(directory: Path, why: str) -> HostUidsError:
    return HostUidsError(f"--uids-dir {directory}: {why}; the record of which DevFlow holds each uid must be "
                         "root's alone (every directory on the way owned by root and writable by nobody else, "
                         "no symbolic link): fix that, or give --uids-dir another place")


def _system_id(uid: int) -> bool:
    """A user or a group of that number exists: an app running as it (its gid is its uid) would share its files."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
        except KeyError:
            continue
        return True
    return False


def _subordinate_ranges() -> list[tuple[int, int]]:
    """[first, end) of each range in /etc/subuid and /etc/subgid ("name:first:count" lines)."""
    ranges = []
    for path in SUBORDINATE_IDS:
        try:
            with path.open("rb") as source:
                text = source.read(SUBORDINATE_BYTES).decode(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                ranges.append((int(fields[1]), int(fields[1]) + int(fields[2])))
    return ranges
