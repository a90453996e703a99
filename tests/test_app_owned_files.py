"""Root's reads and writes inside app-owned trees never follow a link the app's code planted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.builders import BuildError
from pipeline.builders.app_owned_files import read_beneath, write_beneath


def test_write_creates_directories_and_replaces_a_plain_file(tmp_path: Path) -> None:
    write_beneath(tmp_path, ".devflow/server.py", b"one")
    write_beneath(tmp_path, ".devflow/server.py", b"two")
    assert (tmp_path / ".devflow" / "server.py").read_bytes() == b"two"
    assert read_beneath(tmp_path, ".devflow/server.py") == b"two"


@pytest.mark.parametrize("planted", ["file", "directory"])
def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path: Path, planted: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    tree = tmp_path / "tree"
    tree.mkdir()
    if planted == "file":
        (tree / ".devflow-ready").symlink_to(victim)
        relative = ".devflow-ready"
    else:
        (tree / ".devflow").symlink_to(outside)
        relative = ".devflow/victim"
    with pytest.raises(BuildError, match="symbolic link"):
        write_beneath(tree, relative, b"overwritten")
    with pytest.raises(BuildError, match="symbolic link"):
        read_beneath(tree, relative)
    assert victim.read_bytes() == b"precious"


def test_paths_must_stay_inside(tmp_path: Path) -> None:
    for relative in ("../escape", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            write_beneath(tmp_path, relative, b"x")


def test_a_planted_fifo_or_device_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    for relative in ("fifo", "zero"):
        with pytest.raises(BuildError):
            read_beneath(tmp_path, relative)
        with pytest.raises(BuildError):
            write_beneath(tmp_path, relative, b"x")
