"""Root's walks of trees an app's user owns: nothing followed, nothing that can block, any depth."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from runtime.local import app_trees


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


def test_remove_tree_goes_deeper_than_pythons_recursion(tmp_path: Path) -> None:
    tree = tmp_path / "deep"
    level = tree
    level.mkdir()
    fd = os.open(level, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):  # paths this deep exceed PATH_MAX: made from descriptors, as a build could
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    app_trees.remove_tree(tree)
    assert not tree.exists()


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
