"""Writes a commit's tree into a clean build directory, reading the push's quarantined objects."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from dulwich.object_store import BaseObjectStore, DiskObjectStore, OverlayObjectStore
from dulwich.objects import Blob, Commit, Tree

from pipeline.errors import DeployFailed

GITLINK = 0o160000


def object_store(object_env: dict[str, str]) -> BaseObjectStore:
    """The repository's objects plus, during a push, the quarantine that holds the new ones."""
    directories = []
    if "GIT_OBJECT_DIRECTORY" in object_env:
        directories.append(object_env["GIT_OBJECT_DIRECTORY"])
    directories += [d for d in object_env.get("GIT_ALTERNATE_OBJECT_DIRECTORIES", "").split(os.pathsep) if d]
    directories.append(str(Path(object_env["GIT_DIR"]) / "objects"))
    stores = [DiskObjectStore(d) for d in dict.fromkeys(directories) if Path(d).is_dir()]
    return stores[0] if len(stores) == 1 else OverlayObjectStore(stores)


def export_tree(object_env: dict[str, str], commit_id: str, target: Path) -> list[str]:
    """Returns notes for the push output (e.g. submodules that were not exported)."""
    store = object_store(object_env)
    commit = store[commit_id.encode()]
    if not isinstance(commit, Commit):
        raise DeployFailed("export", f"{commit_id[:12]} is not a commit")
    target.mkdir(parents=True, exist_ok=False)
    notes: list[str] = []
    _write_tree(store, store[commit.tree], target, PurePosixPath(), notes)
    _check_links_stay_inside(target)
    return notes


def _check_links_stay_inside(root: Path) -> None:
    """Each link was checked on its own; a chain of links can still lead out, so resolve them all."""
    real_root = Path(os.path.realpath(root))
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(real_root):
                raise DeployFailed("export", f"symlink {path.relative_to(root)} leads outside the app")


def _write_tree(store: BaseObjectStore, tree: Tree, root: Path, prefix: PurePosixPath, notes: list[str]) -> None:
    for entry in tree.iteritems():
        name = entry.path.decode("utf-8", "surrogateescape")
        if name in ("", ".", "..") or "/" in name:
            raise DeployFailed("export", f"refusing the tree entry {name!r} in {prefix or '/'}")
        relative = prefix / name
        path = root / relative
        if entry.mode == GITLINK:
            notes.append(f"submodule {relative} at {entry.sha.decode()[:12]} is not in this repository; "
                         "vendor it or push it as part of the app")
            path.mkdir()
        elif stat.S_ISDIR(entry.mode):
            path.mkdir()
            _write_tree(store, store[entry.sha], root, relative, notes)
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
