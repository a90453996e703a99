"""Walking, as root, a tree an app's user owns and may be changing while root walks it.

os.fwalk and shutil.rmtree open each subdirectory with a plain O_RDONLY: a directory swapped for a FIFO
between their listing and their open makes that open wait for a writer forever, holding a daemon thread.
Here every directory is opened O_DIRECTORY | O_NOFOLLOW (a FIFO or a link in its place fails at once
instead), from its parent's descriptor, and the walk keeps its own stack.

A walk holds a descriptor per level of depth, and an app can nest its directories deeper than the daemon may
open files: past MAX_DEPTH levels, a removal moves what is deeper up to the top of the tree it removes (a
rename between two of its descriptors, which follows nothing) and goes on from there, so it removes any depth;
a walk that changes owners stops descending there and says so (what is deeper keeps its owner: only a tree no
real app has, nesting that deep, is left partly root's).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

log = logging.getLogger(__name__)

DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)  # changed under the walk: not a directory (any more)
MAX_DEPTH = 256
"""Directory levels (descriptors) one walk holds open at most."""


def _open_directory(name: str | Path, dir_fd: int | None = None) -> int | None:
    try:
        return os.open(name, DIRECTORY, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in GONE:
            return None
        raise


def descend(fd: int, name: str, create_mode: int | None = None) -> int:
    """The directory `name` in the directory `fd`, made with `create_mode` where missing; never through a link.
    Raises NotADirectoryError when a link or something else stands there."""
    if create_mode is not None:
        with suppress(FileExistsError):
            os.mkdir(name, create_mode, dir_fd=fd)
    try:
        return os.open(name, DIRECTORY, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADirectoryError(exc.errno, f"{name} is a symbolic link or not a directory") from None
        raise


def _listing(fd: int) -> tuple[list[str], list[str]]:
    dirs, others = [], []
    with os.scandir(fd) as entries:
        for entry in entries:
            (dirs if entry.is_dir(follow_symlinks=False) else others).append(entry.name)
    return dirs, others


def walk(top: Path) -> Iterator[tuple[int, list[str], list[str]]]:
    """Each directory of the tree, top first, as (its descriptor, its subdirectories, its other entries), down to
    MAX_DEPTH levels: the subdirectories of the deepest are listed, not walked. A link is an entry, never
    followed. One descriptor is open per level of depth, not per directory met."""
    fd = _open_directory(top)
    if fd is None:
        return
    dirs, others = _listing(fd)
    frames = [(fd, list(dirs))]
    cut = False
    try:
        yield fd, dirs, others
        while frames:
            fd, pending = frames[-1]
            if not pending:
                frames.pop()
                os.close(fd)
                continue
            inner = _open_directory(pending.pop(), fd)
            if inner is None:
                continue
            dirs, others = _listing(inner)
            deepest = len(frames) + 1 >= MAX_DEPTH
            if deepest and dirs and not cut:
                cut = True
                log.warning("%s nests directories deeper than %d levels: what is below them is not walked", top,
                            MAX_DEPTH)
            frames.append((inner, [] if deepest else list(dirs)))
            yield inner, dirs, others
    finally:
        for fd, _ in frames:
            os.close(fd)


def change_owner(top: Path, uid: int, gid: int, only_from: int | None = None) -> None:
    """Every entry below `top` (links themselves, not what they name) to uid:gid; with `only_from`, only what
    that uid owns."""
    for fd, dirs, others in walk(top):
        for name in dirs + others:
            with suppress(FileNotFoundError):
                if only_from is None or os.stat(name, dir_fd=fd, follow_symlinks=False).st_uid == only_from:
                    os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)


def remove_tree(top: Path) -> None:
    """The tree and everything in it, as far as it can be removed; what its owner keeps adding meanwhile may be
    left behind, never followed."""
    parent = _open_directory(top.parent)
    if parent is None:
        return
    try:
        fd = _open_directory(top.name, parent)
        if fd is None:
            _quietly(os.unlink, top.name, parent)
            return
        # Depth first, children before their directory: (parent's fd, name, own fd, subdirectories left).
        frames: list[tuple[int, str, int, list[str]]] = []
        try:
            frames.append((parent, top.name, fd, _emptied(fd)))
            while frames:
                outer, name, fd, pending = frames[-1]
                if not pending:
                    frames.pop()
                    os.close(fd)
                    _quietly(os.rmdir, name, outer)
                    continue
                child = pending.pop()
                if len(frames) >= MAX_DEPTH:  # no deeper: it goes on from the top, as one of its subdirectories
                    if (moved := _move_up(child, fd, frames[0][2])) is not None:
                        frames[0][3].append(moved)
                    continue
                inner = _open_directory(child, fd)
                if inner is None:
                    _quietly(os.unlink, child, fd)
                else:
                    frames.append((fd, child, inner, _emptied(inner)))
        finally:
            for _, _, fd, _ in frames:
                os.close(fd)
    finally:
        os.close(parent)


def _move_up(name: str, fd: int, top: int) -> str | None:
    """`name` in the directory `fd` moved to the directory `top` under a fresh name, returned; None if it went."""
    for _ in range(3):  # a name the app made there first is another, not this one
        fresh = f".devflow-deeper-{secrets.token_hex(8)}"
        try:
            os.rename(name, fresh, src_dir_fd=fd, dst_dir_fd=top)
            return fresh
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                return None
    return None


def _emptied(fd: int) -> list[str]:
    """Unlink a directory's non-directories; return its subdirectories."""
    dirs, others = _listing(fd)
    for name in others:
        _quietly(os.unlink, name, fd)
    return dirs


def _quietly(remove: Callable[..., None], name: str, dir_fd: int) -> None:
    """What vanished, or cannot go (a directory refilled meanwhile), is not the caller's failure."""
    with suppress(OSError):
        remove(name, dir_fd=dir_fd)
