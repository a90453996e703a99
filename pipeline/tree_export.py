"""Writes a commit's tree into a clean build directory, reading the push's quarantined objects.

Submodules come along: a relative URL (`../lib.git`) names another app on this server, which
`local_repo` resolves (and may refuse, when the pusher cannot read it); any other URL is cloned
with git.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path, PurePosixPath

from dulwich.config import ConfigFile, parse_submodules
from dulwich.object_store import BaseObjectStore, DiskObjectStore, OverlayObjectStore
from dulwich.objects import Blob, Commit, Tree

from pipeline.errors import DeployFailed

GITLINK = 0o160000
MAX_SUBMODULE_DEPTH = 4
CLONE_TIMEOUT = 600
# A relative submodule URL -> the git dir of that app's repository, or None when it is not readable.
LocalRepo = Callable[[str], Path | None]


def object_store(object_env: dict[str, str]) -> BaseObjectStore:
    """The repository's objects plus, during a push, the quarantine that holds the new ones."""
    directories = []
    if "GIT_OBJECT_DIRECTORY" in object_env:
        directories.append(object_env["GIT_OBJECT_DIRECTORY"])
    directories += [d for d in object_env.get("GIT_ALTERNATE_OBJECT_DIRECTORIES", "").split(os.pathsep) if d]
    directories.append(str(Path(object_env["GIT_DIR"]) / "objects"))
    stores = [DiskObjectStore(d) for d in dict.fromkeys(directories) if Path(d).is_dir()]
    return stores[0] if len(stores) == 1 else OverlayObjectStore(stores)


def export_tree(object_env: dict[str, str], commit_id: str, target: Path,
                local_repo: LocalRepo = lambda url: None) -> list[str]:
    """Returns notes for the push output (which submodules came from where)."""
    target.mkdir(mode=0o700, parents=True, exist_ok=False)  # private until handed to the app's user
    notes: list[str] = []
    _export(object_store(object_env), commit_id, target, local_repo, notes, depth=0)
    _check_links_stay_inside(target)
    return notes


def _export(store: BaseObjectStore, commit_id: str, target: Path, local_repo: LocalRepo, notes: list[str],
            depth: int) -> None:
    try:
        commit = store[commit_id.encode()]
    except KeyError:
        raise DeployFailed("export", f"commit {commit_id[:12]} is missing") from None
    if not isinstance(commit, Commit):
        raise DeployFailed("export", f"{commit_id[:12]} is not a commit")
    links: list[tuple[PurePosixPath, str]] = []
    tree = store[commit.tree]
    _write_tree(store, tree, target, PurePosixPath(), links)
    if links:
        urls = _submodule_urls(store, tree)
        for path, sha in links:
            _export_submodule(path, sha, urls.get(str(path)), target, local_repo, notes, depth)


def _submodule_urls(store: BaseObjectStore, tree: Tree) -> dict[str, str]:
    try:
        _, sha = tree.lookup_path(store.__getitem__, b".gitmodules")
    except KeyError:
        return {}
    config = ConfigFile.from_file(BytesIO(store[sha].data))
    return {path.decode(): url.decode() for path, url, _ in parse_submodules(config)}


def _export_submodule(path: PurePosixPath, sha: str, url: str | None, root: Path, local_repo: LocalRepo,
                      notes: list[str], depth: int) -> None:
    if url is None:
        raise DeployFailed("export", f"submodule {path} has no URL in .gitmodules")
    if depth >= MAX_SUBMODULE_DEPTH:
        raise DeployFailed("export", f"submodules nest deeper than {MAX_SUBMODULE_DEPTH} levels at {path}")
    target = root / path  # the gitlink's placeholder directory, filled here
    if url.startswith(("./", "../")):
        git_dir = local_repo(url)
        if git_dir is None:
            raise DeployFailed("export", f"submodule {path}: {url} is not an app you can read on this server")
        _export(object_store({"GIT_DIR": str(git_dir)}), sha, target, local_repo, notes, depth + 1)
        notes.append(f"submodule {path} at {sha[:12]} from {url}")
        return
    with tempfile.TemporaryDirectory(prefix="devflow-submodule-") as clone:
        git = shutil.which("git")
        if git is None:
            raise DeployFailed("export", f"submodule {path}: fetching {url} needs git installed")
        try:
            subprocess.run([git, "clone", "--bare", "--quiet", "--", url, clone], check=True, capture_output=True,
                           timeout=CLONE_TIMEOUT, env={"PATH": os.environ.get("PATH", os.defpath),
                                                       "GIT_TERMINAL_PROMPT": "0", "HOME": clone})
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            raise DeployFailed("export", f"submodule {path}: cannot clone {url}: "
                                         f"{detail.decode(errors='replace').strip()[-300:] or exc}") from None
        _export(object_store({"GIT_DIR": clone}), sha, target, local_repo, notes, depth + 1)
    notes.append(f"submodule {path} at {sha[:12]} from {url}")


def _check_links_stay_inside(root: Path) -> None:
    """Each link was checked on its own; a chain of links can still lead out, so resolve them all."""
    real_root = Path(os.path.realpath(root))
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(real_root):
                raise DeployFailed("export", f"symlink {path.relative_to(root)} leads outside the app")


def _write_tree(store: BaseObjectStore, tree: Tree, root: Path, prefix: PurePosixPath,
                links: list[tuple[PurePosixPath, str]]) -> None:
    for entry in tree.iteritems():
        name = entry.path.decode("utf-8", "surrogateescape")
        if name in ("", ".", "..") or "/" in name:
            raise DeployFailed("export", f"refusing the tree entry {name!r} in {prefix or '/'}")
        relative = prefix / name
        path = root / relative
        if entry.mode == GITLINK:
            links.append((relative, entry.sha.decode()))
            path.mkdir()
        elif stat.S_ISDIR(entry.mode):
            path.mkdir()
            _write_tree(store, store[entry.sha], root, relative, links)
        elif stat.S_ISLNK(entry.mode):
            link = store[entry.sha].data.decode("utf-8", "surrogateescape")
            resolved = os.path.normpath(os.path.join(os.path.dirname(str(relative)), link))
            if os.path.isabs(link) or resolved.startswith(".."):
                raise DeployFailed("export", f"symlink {relative} -> {link} points outside the app")
            path.symlink_to(link)
        else:
            blob = store[entry.sha]
            assert isinstance(blob, Blob)
            with open(path, "wb") as out:
                for chunk in blob.as_raw_chunks():
                    out.write(chunk)
            if entry.mode & 0o111:
                path.chmod(0o755)
