"""Root's reads and writes inside app-owned trees never follow a link out, never block, and stop at a bound."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import stat
import threading
import tracemalloc
from pathlib import Path

import pytest

from pipeline.app_owned_files import (
    CHUNK_BYTES,
    DirectoryGone,
    FileTooLarge,
    UnsafeAppFile,
    copy_file,
    exists,
    file_digest,
    is_directory,
    is_file,
    lock_file,
    read_file,
    read_text,
    subdirectories,
    write_file,
)

GiB = 1024**3


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """An app tree, with a secret of root's beside it."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("root only")
    app = tmp_path / "app"
    (app / "deploy").mkdir(parents=True)
    (app / "deploy" / "Procfile").write_text("web: from deploy\n")
    return app


def test_write_replaces_a_plain_file_and_leaves_nothing_else(tree: Path) -> None:
    write_file(tree, "deploy/server.py", b"one")
    write_file(tree, "deploy/server.py", b"two")
    assert read_file(tree, "deploy/server.py", 10) == b"two"
    assert sorted(os.listdir(tree / "deploy")) == ["Procfile", "server.py"]  # no staging file left behind
    assert stat.S_IMODE((tree / "deploy" / "server.py").stat().st_mode) == 0o644  # the app's user reads it


def test_write_creates_no_directory(tree: Path) -> None:
    """A directory root made in the app's tree would be root's: an entry the app removed must stay removed."""
    with pytest.raises(DirectoryGone, match="^cannot write .devflow/ready: .devflow is gone$"):
        write_file(tree, ".devflow/ready", b"{}")
    with pytest.raises(DirectoryGone):
        lock_file(tree, "python/entry.lock")
    assert not (tree / ".devflow").exists() and not (tree / "python").exists()


def test_a_hard_link_planted_where_root_writes_is_replaced_not_written(tree: Path) -> None:
    """With fs.protected_hardlinks=0 an app can link a file of someone else's into its tree: writing through the
    link would truncate and overwrite that file."""
    victim = tree.parent / "outside" / "secret"
    os.link(victim, tree / "deploy" / ".devflow-ready")
    write_file(tree, "deploy/.devflow-ready", b"{}")
    assert victim.read_text() == "root only" and victim.stat().st_nlink == 1
    assert read_file(tree, "deploy/.devflow-ready", 10) == b"{}"


def test_a_lock_file_with_other_hard_links_is_refused(tree: Path) -> None:
    """A lock cannot be replaced (every build must lock the same inode), so one linked to another file is refused
    rather than held: flock on another tenant's lock file would stall that tenant's builds."""
    fd = lock_file(tree, "deploy/entry.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    victim = tree.parent / "outside" / "secret"
    os.link(victim, tree / "deploy" / "other.lock")
    with pytest.raises(UnsafeAppFile, match="^deploy/other.lock has other hard links"):
        lock_file(tree, "deploy/other.lock")


def test_hashing_and_copying_hold_one_chunk_at_a_time(tree: Path) -> None:
    data = os.urandom(1 << 20) * 48  # 48 MiB
    (tree / "package-lock.json").write_bytes(data)
    (tree / "cache").mkdir()
    expected = hashlib.sha256(data).hexdigest()
    del data
    tracemalloc.start()
    try:
        assert file_digest(tree, "package-lock.json", 64 << 20) == expected
        assert copy_file(tree, "package-lock.json", tree, "cache/package-lock.json", 64 << 20) == expected
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * CHUNK_BYTES, peak
    assert file_digest(tree, "cache/package-lock.json", 64 << 20) == expected
    assert file_digest(tree, "nowhere", 10) is None
    assert copy_file(tree, "nowhere", tree, "cache/nowhere", 10) is None and not (tree / "cache" / "nowhere").exists()
    with pytest.raises(FileTooLarge, match="^package-lock.json is larger than 1 MiB$"):
        copy_file(tree, "package-lock.json", tree, "cache/small.json", 1 << 20)
    assert sorted(os.listdir(tree / "cache")) == ["package-lock.json"]  # a refused copy leaves nothing


def test_a_missing_file_or_directory_reads_as_none(tree: Path) -> None:
    assert read_file(tree, "Procfile", 10) is None
    assert read_file(tree, "nowhere/Procfile", 10) is None
    assert read_file(tree, "deploy/Procfile/x", 10) is None  # a file where a directory would be
    assert not is_file(tree, "Procfile") and not exists(tree, "Procfile") and subdirectories(tree, "nowhere", 9) == []


def test_links_inside_the_tree_are_followed_component_by_component(tree: Path) -> None:
    (tree / "Procfile").symlink_to("deploy/Procfile")
    (tree / "conf").symlink_to("deploy")
    (tree / "deploy" / "up").symlink_to("../deploy/./Procfile")
    for relative in ("Procfile", "conf/Procfile", "deploy/up", "conf/../Procfile", "deploy/../conf/up"):
        assert read_text(tree, relative, 100) == "web: from deploy\n", relative
    assert is_file(tree, "Procfile") and is_directory(tree, "conf") and not is_file(tree, "conf")


@pytest.mark.parametrize("link, relative", [
    ("../outside/secret", "Procfile"),
    ("/", "Procfile/secret"),
    ("deploy/../../outside", "Procfile/secret"),
])
def test_links_leading_out_of_the_tree_are_refused(tree: Path, link: str, relative: str) -> None:
    name = relative.split("/")[0]
    (tree / name).symlink_to(link)
    with pytest.raises(UnsafeAppFile, match="outside the app"):
        read_file(tree, relative, 100)
    with pytest.raises(UnsafeAppFile, match="outside the app"):
        is_file(tree, relative)
    with pytest.raises(UnsafeAppFile, match="outside the app"):
        read_file(tree, "../outside/secret", 100)


def test_link_loops_are_refused(tree: Path) -> None:
    (tree / "a").symlink_to("b")
    (tree / "b").symlink_to("a")
    with pytest.raises(UnsafeAppFile, match="too many symbolic links"):
        read_file(tree, "a", 100)


@pytest.mark.parametrize("planted", ["file", "directory", "inside"])
def test_writes_follow_no_link_at_all(tree: Path, planted: str) -> None:
    victim = tree.parent / "outside" / "secret"
    if planted == "file":
        (tree / ".devflow-ready").symlink_to(victim)
        relative = ".devflow-ready"
    elif planted == "directory":
        (tree / ".devflow").symlink_to(victim.parent)
        relative = ".devflow/secret"
    else:
        (tree / ".devflow-ready").symlink_to("deploy/Procfile")
        relative = ".devflow-ready"
    with pytest.raises(UnsafeAppFile, match="symbolic link"):
        write_file(tree, relative, b"overwritten")
    with pytest.raises(UnsafeAppFile, match="symbolic link"):
        lock_file(tree, relative)
    assert victim.read_text() == "root only"
    assert (tree / "deploy" / "Procfile").read_text() == "web: from deploy\n"


def test_paths_must_stay_inside(tree: Path) -> None:
    for relative in ("../escape", "/etc/passwd", "", "deploy/../../escape"):
        with pytest.raises(ValueError):
            write_file(tree, relative, b"x")
    assert not (tree.parent / "escape").exists()


def test_special_files_are_refused_without_being_opened_or_blocking(tree: Path) -> None:
    os.mkfifo(tree / "package.json")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tree / "requirements.txt"))
        kinds = {"package.json": "a FIFO", "requirements.txt": "a socket", "deploy": "a directory"}
        if os.geteuid() == 0:  # only root may make device nodes
            os.mknod(tree / "go.mod", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: endless
            kinds["go.mod"] = "a character device"
        for name, kind in kinds.items():
            with pytest.raises(UnsafeAppFile, match=f"^{name} is {kind}, not a regular file$"):
                read_file(tree, name, 100)
            with pytest.raises(UnsafeAppFile, match=f"^{name} is {kind}, not a regular file$"):
                write_file(tree, name, b"x")
            assert not is_file(tree, name) and exists(tree, name)
    (tree / "Procfile").symlink_to("package.json")
    with pytest.raises(UnsafeAppFile, match="is a FIFO"):
        read_file(tree, "Procfile", 100)


def test_size_bound_refuses_a_huge_sparse_file_and_names_the_setting(tree: Path) -> None:
    with open(tree / "package-lock.json", "wb") as f:
        f.truncate(GiB)
    refusal = r"^package-lock.json is larger than 64 MiB \(an admin can raise the limit with devflow up " \
              r"--max-manifest-bytes\)$"
    with pytest.raises(UnsafeAppFile, match=refusal):
        read_file(tree, "package-lock.json", 64 * 1024**2, setting="max_manifest_bytes")
    with pytest.raises(UnsafeAppFile, match=refusal):
        file_digest(tree, "package-lock.json", 64 * 1024**2, setting="max_manifest_bytes")
    (tree / "runtime.txt").write_bytes(b"x" * 101)
    with pytest.raises(UnsafeAppFile, match="^runtime.txt is larger than 100 bytes$"):
        read_file(tree, "runtime.txt", 100)
    assert read_file(tree, "runtime.txt", 101) == b"x" * 101


def test_text_must_be_utf8(tree: Path) -> None:
    (tree / "Procfile").write_bytes(b"web: \xff\n")
    with pytest.raises(UnsafeAppFile, match="^Procfile is not UTF-8 text$"):
        read_text(tree, "Procfile", 100)


def test_listing_names_real_directories_only_and_is_bounded(tree: Path) -> None:
    (tree / "mysite").mkdir()
    (tree / "app.py").write_text("")
    (tree / "linked").symlink_to(tree.parent / "outside")
    assert subdirectories(tree, "", 10) == ["deploy", "mysite"]
    with pytest.raises(UnsafeAppFile, match="more than 3 entries"):
        subdirectories(tree, "", 3)
    (tree / "listed").symlink_to(tree.parent / "outside")
    with pytest.raises(UnsafeAppFile, match="symbolic link"):
        subdirectories(tree, "listed", 10)


def test_a_directory_swapped_for_a_link_mid_read_never_reaches_outside(tree: Path) -> None:
    """A thread flips `conf` between a real directory and a link out while root reads `conf/secret`."""
    (tree / "conf").mkdir()
    (tree / "conf" / "secret").write_text("the app's own")
    (tree / "real").mkdir()
    (tree / "real" / "secret").write_text("the app's own")
    (tree / "out").symlink_to(tree.parent / "outside")
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.rename(tree / "conf", tree / "parked")
            os.rename(tree / "out", tree / "conf")
            os.rename(tree / "conf", tree / "out")
            os.rename(tree / "parked", tree / "conf")

    flipper = threading.Thread(target=flip)
    flipper.start()
    seen: dict[str, int] = {}
    try:
        for _ in range(3000):
            try:
                outcome = read_text(tree, "conf/secret", 100) or "missing"
            except UnsafeAppFile as exc:
                outcome = "refused" if "outside the app" in str(exc) else str(exc)
            seen[outcome] = seen.get(outcome, 0) + 1
    finally:
        stop.set()
        flipper.join()
    assert "root only" not in seen
    assert set(seen) <= {"the app's own", "missing", "refused"}, seen
