"""Root's walks of trees an app's user owns: nothing followed, nothing that can block, any depth."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from runtime.local import app_trees

ROOT = Path(__file__).resolve().parent.parent


def build_tree(root: Path, outside: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file").write_text("x")
    (root / "pipe").parent.mkdir(exist_ok=True)
    os.mkfifo(root / "pipe")
    (root / "a" / "to-outside").symlink_to(outside)
    (root / "a" / "to-outside-file").symlink_to(outside / "keep")


def test_remove_tree_unlinks_links_and_fifos_without_following_or_opening_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    tree = tmp_path / "tree"
    build_tree(tree, outside)
    app_trees.remove_tree(tree)
    assert not tree.exists()
    assert (outside / "keep").read_text() == "keep"


DEEP_CHAIN = textwrap.dedent("""
    # A chain of 3000 directories, then remove_tree or change_owner on it, with far fewer descriptors allowed.
    import logging, os, resource, sys
    from runtime.local import app_trees
    logging.basicConfig()
    top, action = sys.argv[1:]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (app_trees.MAX_DEPTH + 64, hard))
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):  # paths this deep exceed PATH_MAX: made from descriptors, as a build could
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    if action == "remove":
        app_trees.remove_tree(app_trees.Path(top))
    else:
        app_trees.change_owner(app_trees.Path(top), 700_000_125, 700_000_125)
""")


def deep_chain(tree: Path, action: str) -> subprocess.CompletedProcess:
    """A process of its own: its descriptor limit lowered below the chain's depth."""
    return subprocess.run([sys.executable, "-c", DEEP_CHAIN, str(tree), action], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_remove_tree_removes_a_chain_deeper_than_it_may_open_files(tmp_path: Path) -> None:
    result = deep_chain(tmp_path / "deep", "remove")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "deep").exists()


def test_change_owner_stops_descending_past_its_depth_and_says_so(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip(reason="changing owners needs root")
    tree = tmp_path / "deep"
    result = deep_chain(tree, "chown")
    try:
        assert result.returncode == 0, result.stderr
        assert f"nests directories deeper than {app_trees.MAX_DEPTH} levels" in result.stderr
        assert (tree / "d").stat().st_uid == 700_000_125
        assert (tree / "/".join(["d"] * app_trees.MAX_DEPTH)).stat().st_uid == 700_000_125  # listed, not walked
        assert (tree / "/".join(["d"] * (app_trees.MAX_DEPTH + 1))).stat().st_uid == 0
    finally:
        app_trees.remove_tree(tree)


def test_a_directory_turned_fifo_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "was-a-dir")
    result: list[int | None] = []
    opener = threading.Thread(target=lambda: result.append(app_trees._open_directory(tmp_path / "was-a-dir")),
                              daemon=True)
    opener.start()
    opener.join(timeout=30)
    assert not opener.is_alive() and result == [None]  # a plain O_RDONLY open would wait for a writer


def test_change_owner_only_from_and_never_through_links(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip(reason="changing owners needs root")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    tree = tmp_path / "tree"
    build_tree(tree, outside)
    os.chown(tree / "a" / "b" / "file", 4242, 4242)
    app_trees.change_owner(tree, 700_000_123, 700_000_123, only_from=4242)
    assert (tree / "a" / "b" / "file").stat().st_uid == 700_000_123
    assert (tree / "a").stat().st_uid == 0  # root's, not from the uid asked for
    app_trees.change_owner(tree, 700_000_124, 700_000_124)
    assert {p.lstat().st_uid for p in tree.rglob("*")} == {700_000_124}
    assert (outside / "keep").stat().st_uid == 0 and outside.stat().st_uid == 0
