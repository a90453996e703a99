"""Writes a pushed commit's tree, submodules included, into a fresh build directory private to root.

Nothing a push holds makes the export outgrow its bounds: each tree's entries and blob sizes (read from
the objects' headers, nothing inflated) are counted against --max-app-files and --max-app-bytes, and the
app's disk use against --max-disk-bytes, before any of that tree is written; blobs are inflated straight
into their files (pipeline.object_reader), and trees are read whole only up to the size their entry count
allows. The reading and writing of exports running at once takes turns: `TreeExporter` has a few slots.

Submodules: each URL goes through the RemoteResolver, relative to where its superproject came from. An app
on this DevFlow is exported here, by the daemon, from its (root's, trusted) repository; a network remote is
fetched by the app's user (pipeline.remote_fetch), counted from its listing, and checked out once the build
tree is that user's (`ExportedTree.check_out`). The total count (--max-submodules) bounds the nesting too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath

from dulwich.config import ConfigFile, parse_submodules
from dulwich.objects import Commit, ObjectFormatException, parse_tree

from pipeline.builders import Sandbox
from pipeline.disk_usage import disk_usage, shown_size, within_disk_limit
from pipeline.errors import DeployFailed
from pipeline.limits import KiB, Limits
from pipeline.object_reader import (
    BLOB,
    COMMIT,
    TREE,
    CorruptObject,
    DeltaWorkExceeded,
    ObjectReader,
    ObjectTooLarge,
)
from pipeline.remote_fetch import GITLINK, GitFailed, RemoteFetch, TreeEntry
from pipeline.remotes import LocalApp, NetworkRemote, Remote, RemoteRefused, RemoteResolver
from runtime.local.app_trees import descend, remove_tree

log = logging.getLogger(__name__)

TREE_ENTRY_BYTES = 128  # a tree object may take this much per entry the app may hold (mode, name, id)
MAX_COMMIT_BYTES = 1024 * KiB  # a commit is a few lines and a message
MAX_GITMODULES_BYTES = 256 * KiB  # --max-submodules entries of a few lines each
PATH_MAX = 4096
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY, _SYMLINK, _FILE = 0, 1, 2
# (kind, path relative to the (sub)tree's root, blob id, mode, symlink target)
_Planned = tuple[int, str, str, int, str]
# A submodule found in a tree: its path relative to that tree, its commit, its URL from .gitmodules.
_Link = tuple[PurePosixPath, str, str | None]


def object_directories(object_env: dict[str, str]) -> list[Path]:
    """The repository's objects plus, during a push, the quarantine that holds the new ones."""
    directories = []
    if "GIT_OBJECT_DIRECTORY" in object_env:
        directories.append(object_env["GIT_OBJECT_DIRECTORY"])
    directories += [d for d in object_env.get("GIT_ALTERNATE_OBJECT_DIRECTORIES", "").split(os.pathsep) if d]
    directories.append(str(Path(object_env["GIT_DIR"]) / "objects"))
    return [Path(d) for d in directories]


@dataclass(frozen=True)
class _Fetched:
    """A network submodule, fetched by the app's user, to check out once the tree is that user's."""

    path: PurePosixPath
    sha: str
    url: str
    git_dir: Path


@dataclass
class ExportedTree:
    root: Path
    fetch: RemoteFetch
    timeout: float  # of one checkout
    in_use: set[Path]  # the exporter's scratch directories of deployments not yet done
    notes: list[str] = field(default_factory=list)  # for the push output: which submodules came from where
    fetched: list[_Fetched] = field(default_factory=list)

    async def check_out(self) -> None:
        """The network submodules into the tree, as the app's user: call once the tree is that user's."""
        for item in self.fetched:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.fetch.check_out(item.git_dir, item.sha, self.root / item.path)
            except GitFailed as exc:
                detail = str(exc).replace(str(self.root), ".")
                raise DeployFailed("export", f"submodule {item.path}: cannot check out {item.url}: {detail}") from None
            except TimeoutError:
                raise DeployFailed("export", f"submodule {item.path}: checking out {item.url} did not finish "
                                             f"within {self.timeout:g} seconds (--submodule-timeout)") from None

    async def discard(self) -> None:
        """The fetched repositories: the build does not need them."""
        await asyncio.to_thread(remove_tree, self.fetch.scratch)
        self.in_use.discard(self.fetch.scratch)


class TreeExporter:
    def __init__(self, limits: Limits, concurrency: int) -> None:
        self.limits = limits
        # The daemon's own reading and writing, not the network fetches its app users wait for.
        self._slots = asyncio.Semaphore(concurrency)
        self._scratch_in_use: set[Path] = set()

    async def export(self, app: str, commit: str, object_env: dict[str, str], *, app_dir: Path, target: Path,
                     remotes: RemoteResolver, sandbox: Sandbox | None, env: dict[str, str]) -> ExportedTree:
        """`commit` of `app` (read from `object_env`'s directories) into `target`, a new directory under
        `app_dir` (whose disk use is bounded); network submodules are fetched as `sandbox` with `env`'s PATH.
        Raises DeployFailed; the caller removes `target`."""
        try:
            await asyncio.to_thread(target.mkdir, mode=0o700, parents=True)  # private until the app's user has it
        except OSError as exc:
            raise _write_failed(PurePosixPath(), exc) from None
        scratch = app_dir / "submodules"
        fetch = RemoteFetch(scratch / target.name, sandbox, env)
        self._scratch_in_use.add(fetch.scratch)
        exported = ExportedTree(target, fetch, self.limits.submodule_timeout, self._scratch_in_use)
        await asyncio.to_thread(self._remove_left_over, scratch)
        export = _Export(self.limits, self._slots, target, remotes, exported, await disk_usage(app_dir))
        try:
            await export.run(object_directories(object_env), commit, LocalApp(app, Path(object_env["GIT_DIR"])))
        except BaseException:
            await exported.discard()
            raise
        return exported

    def _remove_left_over(self, scratch: Path) -> None:
        """Blocking: what deployments a stopped daemon never finished fetched still counts against the app's disk."""
        if scratch.is_dir():
            for entry in scratch.iterdir():
                if entry not in self._scratch_in_use:
                    remove_tree(entry)


class _Export:
    def __init__(self, limits: Limits, slots: asyncio.Semaphore, root: Path, remotes: RemoteResolver,
                 exported: ExportedTree, disk_used: int) -> None:
        self.limits = limits
        self.slots = slots
        self.root = root
        self.remotes = remotes
        self.fetch = exported.fetch
        self.exported = exported
        self.disk_used = disk_used
        self.bytes = 0
        self.entries = 0
        self.work = 0  # bytes of temporary files resolving large deltas took
        self.submodules = 0

    def _refuse(self, name: str, what: str) -> DeployFailed:
        return DeployFailed("export", str(self.limits.refuse(name, what)))

    # the budget

    def _count_entry(self, path: PurePosixPath) -> None:
        self.entries += 1
        if self.entries > self.limits.max_app_files:
            raise self._refuse("max_app_files", f"the pushed tree holds too many files and directories (past the "
                                                f"limit at {path})")

    def _count_blob(self, path: PurePosixPath, size: int) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_app_bytes:
            raise self._refuse("max_app_bytes", f"the pushed tree is too large uncompressed (past the limit at "
                                                f"{path}, a {shown_size(size)} file)")
        if self.disk_used + self.bytes > self.limits.max_disk_bytes:
            raise self._refuse("max_disk_bytes", f"with this push the app's builds and caches would take "
                                                 f"{shown_size(self.disk_used + self.bytes)}")

    # the walk

    async def run(self, directories: list[Path], commit: str, top: LocalApp) -> None:
        links = await self._local(directories, commit, PurePosixPath(), "the push")
        queue: deque[tuple[PurePosixPath, str, str | None, Remote]] = deque(
            (path, sha, url, top) for path, sha, url in links)
        while queue:
            path, sha, url, base = queue.popleft()
            self.submodules += 1
            if self.submodules > self.limits.max_submodules:
                raise self._refuse("max_submodules", f"the push brings too many submodules (past the limit at {path})")
            if url is None:
                raise DeployFailed("export", f"submodule {path} has no URL in .gitmodules")
            try:
                source = await asyncio.to_thread(self.remotes.resolve, url, base)
            except RemoteRefused as exc:
                raise DeployFailed("export", f"submodule {path}: {exc}") from None
            if isinstance(source, LocalApp):
                links = await self._local([source.git_dir / "objects"], sha, path, f"submodule {path}: {url}")
            else:
                links = await self._fetch(path, sha, source)
            self.exported.notes.append(f"submodule {path} at {sha[:12]} from {url}")
            queue.extend((path / inner, inner_sha, inner_url, source) for inner, inner_sha, inner_url in links)
        # Each link was checked on its own; a chain of links can still lead out, so resolve them all.
        await asyncio.to_thread(_check_links_stay_inside, self.root)

    # trees the daemon reads: the push's, and those of apps on this DevFlow

    async def _local(self, directories: list[Path], commit: str, prefix: PurePosixPath, source: str) -> list[_Link]:
        async with self.slots:
            return await asyncio.to_thread(self._write_local, directories, commit, prefix, source)

    def _write_local(self, directories: list[Path], commit: str, prefix: PurePosixPath, source: str) -> list[_Link]:
        """Blocking: `commit`'s tree at `prefix`; returns the submodules it holds. `source` says where the
        commit should be, for the message when it is not."""
        with ObjectReader(directories, self.root.parent, self.limits.max_app_bytes - self.work) as reader:
            try:
                try:
                    data = reader.read(commit, COMMIT, MAX_COMMIT_BYTES)
                except KeyError:
                    raise DeployFailed("export", f"{source} has no commit {commit[:12]}") from None
                except ObjectTooLarge as exc:
                    raise DeployFailed("export", f"commit {commit[:12]} is a {shown_size(exc.size)} object: "
                                                 "no commit is that large") from None
                tree = Commit.from_raw_string(COMMIT, data).tree.decode()
                planned, links, gitmodules = self._plan(reader, tree, prefix)
                urls = self._submodule_urls(self._gitmodules(reader, gitmodules, prefix)) if links else {}
                self._write(reader, planned, prefix)
            except (CorruptObject, ObjectFormatException, KeyError, ValueError) as exc:
                log.warning("export of %s at %s: %s", commit[:12], prefix or "/", exc)
                raise DeployFailed("export", f"the objects of {commit[:12]} cannot be read (corrupt or missing); "
                                             "push again") from None
            except DeltaWorkExceeded:
                raise self._refuse("max_app_bytes", "resolving the deltas the pushed objects are stored as takes "
                                                    "more than that on disk") from None
            finally:
                self.work += reader.work
        return [(PurePosixPath(path), sha, urls.get(path)) for path, sha in links]

    @staticmethod
    def _gitmodules(reader: ObjectReader, sha: str | None, prefix: PurePosixPath) -> bytes:
        if sha is None:
            return b""
        try:
            return reader.read(sha, BLOB, MAX_GITMODULES_BYTES)
        except ObjectTooLarge:
            raise DeployFailed("export", f"{prefix / '.gitmodules'} is over "
                                         f"{shown_size(MAX_GITMODULES_BYTES)}") from None

    def _plan(self, reader: ObjectReader, tree: str, prefix: PurePosixPath,
              ) -> tuple[list[_Planned], list[tuple[str, str]], str | None]:
        """Every entry to write, counted against the limits before any is written; the submodules (path,
        commit) and the .gitmodules blob."""
        planned: list[_Planned] = []
        links: list[tuple[str, str]] = []
        gitmodules = None
        tree_limit = self.limits.max_app_files * TREE_ENTRY_BYTES
        stack = [(tree, "")]
        while stack:
            sha, directory = stack.pop()
            try:
                data = reader.read(sha, TREE, tree_limit)
            except ObjectTooLarge as exc:
                raise self._refuse("max_app_files", f"directory {prefix / directory} of the pushed tree is a "
                                                    f"{shown_size(exc.size)} tree object, more than that many "
                                                    "entries take") from None
            for raw_name, mode, child in parse_tree(data, sha_len=20):
                name = raw_name.decode("utf-8", "surrogateescape")
                if name in ("", ".", "..") or "/" in name:
                    raise DeployFailed("export", f"refusing the tree entry {name!r} in {prefix / directory}")
                relative = f"{directory}/{name}" if directory else name
                shown = prefix / relative
                self._count_entry(shown)
                child_sha = child.decode()
                if mode == GITLINK:
                    planned.append((_DIRECTORY, relative, "", mode, ""))
                    links.append((relative, child_sha))
                elif stat.S_ISDIR(mode):
                    planned.append((_DIRECTORY, relative, "", mode, ""))
                    stack.append((child_sha, relative))
                elif stat.S_ISLNK(mode):
                    planned.append((_SYMLINK, relative, "", mode, self._link_target(reader, child_sha, shown)))
                elif stat.S_ISREG(mode):
                    self._count_blob(shown, reader.size(child_sha))
                    planned.append((_FILE, relative, child_sha, mode, ""))
                    if relative == ".gitmodules":
                        gitmodules = child_sha
                else:
                    raise DeployFailed("export", f"{shown} has the unknown file mode {mode:o}")
        return planned, links, gitmodules

    def _link_target(self, reader: ObjectReader, sha: str, path: PurePosixPath) -> str:
        try:
            link = reader.read(sha, BLOB, PATH_MAX).decode("utf-8", "surrogateescape")
        except ObjectTooLarge:
            raise DeployFailed("export", f"symlink {path} is longer than any path can be") from None
        resolved = os.path.normpath(os.path.join(os.path.dirname(str(path)), link))
        if not link or "\0" in link or os.path.isabs(link) or resolved.startswith(".."):
            raise DeployFailed("export", f"symlink {path} -> {link} points outside the app")
        return link

    @staticmethod
    def _submodule_urls(gitmodules: bytes) -> dict[str, str]:
        try:
            config = ConfigFile.from_file(BytesIO(gitmodules))
            return {path.decode("utf-8", "surrogateescape"): url.decode("utf-8", "surrogateescape")
                    for path, url, _ in parse_submodules(config)}
        except (ValueError, KeyError) as exc:
            raise DeployFailed("export", f".gitmodules cannot be read: {exc}") from None

    def _write(self, reader: ObjectReader, planned: list[_Planned], prefix: PurePosixPath) -> None:
        base = _directory_beneath(self.root, prefix)
        for kind, relative, sha, mode, link in planned:
            path = os.path.join(base, relative)
            try:
                if kind == _DIRECTORY:
                    os.mkdir(path, 0o755)
                elif kind == _SYMLINK:
                    os.symlink(link, path)
                else:
                    with open(os.open(path, _NEW_FILE, 0o755 if mode & 0o111 else 0o644), "wb") as out:
                        reader.copy(sha, out)
            except FileExistsError:
                raise DeployFailed("export", f"the pushed tree holds {prefix / relative} twice") from None
            except OSError as exc:
                raise _write_failed(prefix / relative, exc) from None

    # trees the app's user fetches

    async def _fetch(self, path: PurePosixPath, sha: str, source: NetworkRemote) -> list[_Link]:
        """The submodule fetched and listed as the app's user, counted, its directory made; returns the
        submodules it holds."""
        git_dir = self.fetch.scratch / f"{len(self.exported.fetched)}.git"
        if not self.exported.fetched:
            await asyncio.to_thread(self.fetch.prepare)

        def too_large(used: int) -> DeployFailed:
            return self._refuse("max_app_bytes", f"submodule {path}: the repository fetched from {source.url} "
                                                 f"takes {shown_size(used)}")

        try:
            async with asyncio.timeout(self.limits.submodule_timeout):
                await within_disk_limit(self.fetch.scratch, self.limits.max_app_bytes,
                                        self.fetch.fetch(source.url, sha, git_dir), too_large)
                links: list[tuple[str, str]] = []
                gitmodules: str | None = None

                def count(entry: TreeEntry) -> None:
                    nonlocal gitmodules
                    inner = _inner_path(path, entry.path)
                    self._count_entry(path / inner)
                    if entry.mode == GITLINK:
                        links.append((entry.path, entry.sha))
                    elif not stat.S_ISDIR(entry.mode):
                        self._count_blob(path / inner, entry.size)
                        if entry.path == ".gitmodules":
                            gitmodules = entry.sha

                await self.fetch.listing(git_dir, sha, count)
                text = await self.fetch.blob(git_dir, gitmodules, MAX_GITMODULES_BYTES) if links and gitmodules \
                    else b""
        except GitFailed as exc:
            raise DeployFailed("export", f"submodule {path}: cannot fetch {source.url}: {exc}") from None
        except TimeoutError:
            raise self._refuse("submodule_timeout", f"submodule {path}: fetching {source.url} took longer") from None
        if text is None:
            raise DeployFailed("export", f"{path / '.gitmodules'} is over {shown_size(MAX_GITMODULES_BYTES)}")
        await asyncio.to_thread(_directory_beneath, self.root, path)
        for inner, _ in links:
            await asyncio.to_thread(_directory_beneath, self.root, path / inner)
        self.exported.fetched.append(_Fetched(path, sha, source.url, git_dir))
        urls = self._submodule_urls(text) if text else {}
        return [(PurePosixPath(inner), inner_sha, urls.get(inner)) for inner, inner_sha in links]


def _inner_path(path: PurePosixPath, inner: str) -> PurePosixPath:
    """A path from a listing the app's user made: only names, no way up or out."""
    parts = inner.split("/")
    if any(part in ("", ".", "..") for part in parts) or len(inner) > PATH_MAX:
        raise DeployFailed("export", f"submodule {path} holds the path {inner[:200]!r}")
    return PurePosixPath(inner)


def _directory_beneath(root: Path, relative: PurePosixPath) -> str:
    """Blocking: the directory `root/relative`, made where missing, walked without following any link."""
    fd = os.open(root, _DIR)
    try:
        for part in relative.parts:
            try:
                inner = descend(fd, part, 0o755)
            except NotADirectoryError:
                raise DeployFailed("export", f"submodule path {relative} runs into a file or a symlink of "
                                             "its superproject") from None
            os.close(fd)
            fd = inner
    except OSError as exc:
        raise _write_failed(relative, exc) from None
    finally:
        os.close(fd)
    return os.path.join(root, relative)


def _write_failed(path: PurePosixPath, exc: OSError) -> DeployFailed:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DeployFailed("export", "the disk that holds the app builds is full; nothing of this push was kept, "
                                      "and the live release keeps serving")
    return DeployFailed("export", f"cannot write {path}: {exc.strerror}")


def _check_links_stay_inside(root: Path) -> None:
    real_root = Path(os.path.realpath(root))
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(real_root):
                raise DeployFailed("export", f"symlink {path.relative_to(root)} leads outside the app")
