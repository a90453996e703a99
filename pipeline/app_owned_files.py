"""The daemon's one way into a tree an app's user can write: its build (once handed over) and its caches.

The app's code runs as that user while the daemon works (its live processes, its build scripts), so between
two system calls any name in the tree can become a link to another tenant's file, a FIFO that never answers,
or a sparse file of a terabyte. So every path is walked one component at a time from a directory fd with
O_NOFOLLOW. A link met on the way is resolved by hand, and only to somewhere inside the tree: a committed
`Procfile -> deploy/Procfile` works, `-> /etc/shadow` or `-> ../../..` is refused. The last open is
O_NONBLOCK and must give a regular file (or directory), and a read stops at its bound. Writes follow no link
at all and never go into an existing inode (see `write_file`), and root creates no directory here: one it made
would be root's, and the app's user could neither empty nor remove it. These are blocking system calls: async
code runs them in a thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath

from pipeline.errors import PipelineInputError
from pipeline.limits import byte_size

# The kernel's own bound on links followed in one lookup (MAXSYMLINKS).
MAX_LINKS = 40
# Files are read (and hashed, and copied) this much at a time: a lockfile of 64 MiB never sits whole in memory.
CHUNK_BYTES = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symbolic link"}


class UnsafeAppFile(PipelineInputError):
    """A file the daemon needs in an app's tree is not a plain file inside it, or is too big; says which."""


class FileTooLarge(UnsafeAppFile):
    """The file is larger than the bound it is read with."""


class DirectoryGone(UnsafeAppFile):
    """The directory a file was to be written in does not exist (any more): nothing was written."""


class _Missing(Exception):
    """The path (or a directory on it) does not exist, or a directory on it is a file."""


def read_file(base: Path, relative: str, max_bytes: int, *, setting: str | None = None) -> bytes | None:
    """The bytes of `base/relative`, or None when it does not exist.

    Refused: anything but a regular file inside the tree, and a file past `max_bytes` (`setting` names the
    limit that raises it, for the message)."""
    try:
        with _opened(base, relative, os.O_RDONLY, follow=True) as fd:
            return b"".join(_chunks(fd, relative, max_bytes, setting))
    except _Missing:
        return None


def file_digest(base: Path, relative: str, max_bytes: int, *, setting: str | None = None) -> str | None:
    """The SHA-256 (hex) of `base/relative`, read a chunk at a time, or None when it does not exist; refused as
    `read_file` refuses."""
    try:
        with _opened(base, relative, os.O_RDONLY, follow=True) as fd:
            digest = hashlib.sha256()
            for chunk in _chunks(fd, relative, max_bytes, setting):
                digest.update(chunk)
    except _Missing:
        return None
    return digest.hexdigest()


def copy_file(base: Path, relative: str, target_base: Path, target: str, max_bytes: int, *,
              setting: str | None = None) -> str | None:
    """Copy `base/relative` (read as `read_file` reads) to `target_base/target` (written as `write_file`
    writes), a chunk at a time; the SHA-256 (hex) of what was copied, or None (nothing written) when the source
    does not exist."""
    digest = hashlib.sha256()

    def hashed(chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk

    try:
        with _opened(base, relative, os.O_RDONLY, follow=True) as fd:
            _replace(target_base, target, hashed(_chunks(fd, relative, max_bytes, setting)))
    except _Missing:
        return None
    return digest.hexdigest()


def read_text(base: Path, relative: str, max_bytes: int, *, setting: str | None = None) -> str | None:
    """`read_file` as UTF-8 text."""
    data = read_file(base, relative, max_bytes, setting=setting)
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeAppFile(f"{relative} is not UTF-8 text") from None


def is_file(base: Path, relative: str) -> bool:
    """Whether `base/relative` is a regular file inside the tree; a link that leaves the tree is refused."""
    return _kind(base, relative) == stat.S_IFREG


def is_directory(base: Path, relative: str) -> bool:
    """Whether `base/relative` is a directory inside the tree; a link that leaves the tree is refused."""
    return _kind(base, relative) == stat.S_IFDIR


def exists(base: Path, relative: str) -> bool:
    """Whether anything is at `base/relative`, a link included, without following it."""
    parent, name = _split(relative)
    try:
        with _opened(base, parent, 0, follow=False, directory=True) as fd:
            os.stat(name, dir_fd=fd, follow_symlinks=False)
    except (_Missing, FileNotFoundError, NotADirectoryError):
        return False
    return True


def subdirectories(base: Path, relative: str, max_entries: int) -> list[str]:
    """The names of the real directories (not links to one) in `base/relative`, sorted; refused past
    `max_entries` entries."""
    try:
        with _opened(base, relative, 0, follow=False, directory=True) as fd, os.scandir(fd) as entries:
            names = []
            for count, entry in enumerate(entries, start=1):
                if count > max_entries:
                    raise UnsafeAppFile(f"{relative or 'the app'} holds more than {max_entries} entries")
                if entry.is_dir(follow_symlinks=False):
                    names.append(entry.name)
    except _Missing:
        return []
    return sorted(names)


def write_file(base: Path, relative: str, data: bytes) -> None:
    """Create or replace the regular file `base/relative`, in a directory that must exist, following no link.

    The bytes go to a fresh file (O_EXCL, under a temporary name beside the target) that is then renamed over
    the name, rather than into whatever inode the name points at: a hard link the app planted there to a file
    of someone else's (which only fs.protected_hardlinks=1 stops it making) is replaced, never written, and
    nobody reads a half-written file. A missing directory is refused (`DirectoryGone`), never created."""
    _replace(base, relative, [data])


def lock_file(base: Path, relative: str) -> int:
    """A read-only fd (the caller's to close, e.g. to flock) of the regular file `base/relative`, created if
    missing, never through a link. Every build must lock the same inode, so it cannot be replaced as
    `write_file` replaces: a file with other hard links (one to a file outside the tree, say) is refused."""
    try:
        with _opened(base, relative, os.O_RDONLY | os.O_CREAT, follow=False) as fd:
            if os.fstat(fd).st_nlink > 1:
                raise UnsafeAppFile(f"{relative} has other hard links: the daemon locks only a file of its own")
            return os.dup(fd)
    except _Missing:
        raise DirectoryGone(f"cannot create {relative}: its directory is gone") from None


def _chunks(fd: int, relative: str, max_bytes: int, setting: str | None) -> Iterator[bytes]:
    """The file's bytes, a chunk at a time; FileTooLarge past `max_bytes` (a sparse file before any read)."""
    if os.fstat(fd).st_size > max_bytes:
        raise _too_large(relative, max_bytes, setting)
    count = 0
    while chunk := os.read(fd, min(CHUNK_BYTES, max_bytes + 1 - count)):
        count += len(chunk)
        if count > max_bytes:  # it grew since the fstat
            raise _too_large(relative, max_bytes, setting)
        yield chunk


def _too_large(relative: str, max_bytes: int, setting: str | None) -> FileTooLarge:
    return FileTooLarge(f"{relative} is larger than {byte_size(max_bytes)}" + (
        f" (an admin can raise the limit with devflow up --{setting.replace('_', '-')})" if setting else ""))


def _replace(base: Path, relative: str, chunks: Iterable[bytes]) -> None:
    """`write_file`, from chunks."""
    parent, name = _split(relative)
    if name in ("", ".", ".."):
        raise ValueError(f"{relative!r} does not name a file")
    try:
        with _opened(base, parent, 0, follow=False, directory=True) as directory:
            _refuse_unless_file(name, directory, relative)
            staging = f".{name[:200]}.{secrets.token_hex(8)}.tmp"
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE, 0o600, dir_fd=directory)
            try:
                try:
                    os.fchmod(fd, 0o644)  # the app's user reads it (a static server, a CA bundle), whatever the umask
                    for chunk in chunks:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.rename(staging, name, src_dir_fd=directory, dst_dir_fd=directory)
            except BaseException:
                with suppress(OSError):
                    os.unlink(staging, dir_fd=directory)
                raise
    except _Missing:
        raise DirectoryGone(f"cannot write {relative}: {parent} is gone") from None
    except IsADirectoryError:  # a directory swapped in since the look
        raise UnsafeAppFile(f"{relative} is a directory, not a regular file") from None


def _refuse_unless_file(name: str, directory: int, shown: str) -> None:
    """A link or special file where a file is to be written means the app put it there: say so (the rename
    would replace it harmlessly, but the build is not what the push described)."""
    try:
        kind = stat.S_IFMT(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return
    if kind == stat.S_IFLNK:
        raise UnsafeAppFile(f"{shown} is a symbolic link where the daemon expects a plain file: commit the file "
                            "itself")
    if kind != stat.S_IFREG:
        _refuse_kind(shown, kind, False, False)


def _kind(base: Path, relative: str) -> int | None:
    try:
        with _opened(base, relative, os.O_RDONLY, follow=True, any_kind=True) as fd:
            return stat.S_IFMT(os.fstat(fd).st_mode)
    except _Missing:
        return None
    except _Special as special:
        return special.kind


def _split(relative: str) -> tuple[str, str]:
    path = PurePosixPath(relative)
    return str(path.parent), path.name


class _Special(Exception):
    """With `any_kind`: the path is a special file, which is never opened."""

    def __init__(self, kind: int) -> None:
        self.kind = kind


@contextmanager
def _opened(base: Path, relative: str, flags: int, *, follow: bool, directory: bool = False,
            any_kind: bool = False) -> Iterator[int]:
    """An fd of `base/relative`, walked from `base` one component at a time (see the module's docstring).

    `follow`: a link on the way is resolved inside the tree, else refused. At the end a regular file is
    opened (a directory with `directory`); anything else is refused without being opened, or with
    `any_kind` reported as `_Special`."""
    if PurePosixPath(relative).is_absolute():
        raise ValueError(f"{relative!r} is not a path inside the tree")
    try:
        walked = [os.open(base, _DIR)]  # the fds of the directories from base down to where the walk is
    except OSError as exc:
        raise UnsafeAppFile(f"cannot use {base.name}: {exc.strerror}") from None
    names: list[str] = []  # their names, for messages
    parts = deque(part for part in PurePosixPath(relative).parts if part != ".")
    links = 0
    shown = relative or "."
    fd: int | None = None
    try:
        while parts:
            part = parts.popleft()
            shown = "/".join([*names, part])
            if part == "..":
                if len(walked) == 1:
                    raise UnsafeAppFile(f"{relative} leads outside the app")
                os.close(walked.pop())
                names.pop()
                continue
            last = not parts
            try:
                if last and not directory:
                    fd = _open_file(part, walked[-1], flags, shown, any_kind)
                else:
                    fd = _open_directory(part, walked[-1])
            except _Link:
                if not follow:
                    raise UnsafeAppFile(f"{shown} is a symbolic link where the daemon expects a plain "
                                        f"{'file' if last and not directory else 'directory'}: commit the "
                                        "file itself") from None
                links += 1
                if links > MAX_LINKS:
                    raise UnsafeAppFile(f"{relative}: too many symbolic links on the way (a loop?)") from None
                target = _link_target(part, walked[-1])
                if target is None:  # no longer a link: look again
                    parts.appendleft(part)
                    continue
                if PurePosixPath(target).is_absolute():
                    raise UnsafeAppFile(f"{shown} is a symbolic link that leads outside the app") from None
                parts.extendleft(reversed([p for p in PurePosixPath(target).parts if p != "."]))
                continue
            except OSError as exc:
                raise UnsafeAppFile(f"cannot use {shown}: {exc.strerror}") from None
            if last:
                break
            walked.append(fd)
            names.append(part)
            fd = None
        if fd is None:  # the path names the directory the walk ended in
            fd = os.dup(walked[-1])
        mode = os.fstat(fd).st_mode
        if stat.S_IFMT(mode) != (stat.S_IFDIR if directory else stat.S_IFREG):
            _refuse_kind("/".join(names) if directory else shown, stat.S_IFMT(mode), directory, any_kind)
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
        yield fd
    finally:
        if fd is not None:
            os.close(fd)
        for directory_fd in walked:
            os.close(directory_fd)


class _Link(Exception):
    """The component is a symbolic link."""


def _open_file(name: str, parent: int, flags: int, shown: str, any_kind: bool) -> int:
    """Looked at before it is opened, so a special file is never opened at all; O_NOFOLLOW and O_NONBLOCK
    cover what is swapped in between, which the caller's fstat then refuses."""
    try:
        kind = stat.S_IFMT(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise _Missing() from None
        kind = stat.S_IFREG
    if kind == stat.S_IFLNK:
        raise _Link()
    if kind != stat.S_IFREG:
        _refuse_kind(shown, kind, False, any_kind)
    try:
        return os.open(name, flags | _FILE, 0o644, dir_fd=parent)
    except FileNotFoundError:
        raise _Missing() from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Link() from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads, swapped in since the look
            _refuse_kind(shown, stat.S_IFIFO, False, any_kind)
        raise


def _open_directory(name: str, parent: int) -> int:
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except (FileNotFoundError, NotADirectoryError):
        if _link_target(name, parent) is not None:
            raise _Link() from None
        raise _Missing() from None


def _refuse_kind(shown: str, kind: int, directory: bool, any_kind: bool) -> None:
    if any_kind:
        raise _Special(kind)
    raise UnsafeAppFile(f"{shown} is {_KINDS.get(kind, 'a special file')}, not a "
                        f"{'directory' if directory else 'regular file'}")


def _link_target(name: str, parent: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=parent)
    except OSError:  # not a link (EINVAL), or gone
        return None
