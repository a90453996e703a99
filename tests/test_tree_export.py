"""A push cannot expand past its limits at build time: real pushes to real daemons, on both git backends.

--max-push-bytes bounds the compressed pack; a push of a few hundred KB can still hold a 500 MB zero-filled
blob, or a delta of a few hundred bytes that makes 256 MB. The export streams blobs with bounded memory (the
daemon's peak, VmHWM, is measured around each push), refuses past --max-app-bytes and --max-app-files before
writing anything, and a build past --max-disk-bytes or a full disk fails the deployment, never the daemon.

C git's receive-pack explodes a push of under 100 objects into loose objects and keeps larger ones as a pack;
the dulwich backend always keeps the pack: the pushes below cover loose objects, whole packed blobs, and
deltas applied in memory and as a stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, commit, make_repo, start_daemon, stop_daemon
from test_deploy import get

MiB = 1024 * 1024
ZEROS = 500 * MiB
BOMB = 256 * MiB  # what the delta bomb's few hundred bytes of instructions make
MEMORY_MARGIN = 150 * MiB  # the daemon's peak may grow by this much in a push; whole blobs in memory took 1 GB
PROCFILE = {"Procfile": "web: python3 -m http.server $PORT\n"}
GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, check=True,
                          env=GIT_ENV).stdout.decode().strip()


def peak_memory(daemon: Daemon) -> int:
    """The daemon's resident high-water mark, in bytes."""
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) * 1024


def push(daemon: Daemon, repo: Path, app: str) -> tuple[subprocess.CompletedProcess, int]:
    """The push, and how much the daemon's peak memory grew during it."""
    before = peak_memory(daemon)
    result = daemon.git("push", f"{daemon.ssh_url}/{app}.git", "HEAD:refs/heads/main", cwd=repo, check=False)
    return result, peak_memory(daemon) - before


def refusal(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stderr
    reasons = [line for line in result.stderr.splitlines() if "push refused:" in line]
    assert reasons, result.stderr
    return reasons[0].split("push refused:", 1)[1].strip()


def filler_commits(repo: Path, count: int = 100) -> None:
    """Enough objects that C git keeps the push as a pack instead of exploding it into loose objects."""
    head = git(repo, "rev-parse", "HEAD")
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    for index in range(count):
        head = git(repo, "commit-tree", tree, "-p", head, "-m", f"filler {index}")
    git(repo, "update-ref", "refs/heads/main", head)


def all_zeros(path: Path, size: int) -> bool:
    with path.open("rb") as data:
        zeros = bytes(MiB)
        while chunk := data.read(MiB):
            if chunk != zeros[:len(chunk)]:
                return False
    return path.stat().st_size == size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pack_entry(kind: int, data: bytes, base: bytes = b"") -> bytes:
    size = len(data)
    byte, size = (kind << 4) | (size & 0x0F), size >> 4
    header = bytearray()
    while size:
        header.append(byte | 0x80)
        byte, size = size & 0x7F, size >> 7
    header.append(byte)
    return bytes(header) + base + zlib.compress(data)


def _blob_id(size: int) -> str:
    digest = hashlib.sha1(f"blob {size}\0".encode())
    for _ in range(size // MiB):
        digest.update(bytes(MiB))
    return digest.hexdigest()


@pytest.fixture(scope="session")
def zeros_repo(tmp_path_factory) -> Path:
    """A commit holding a 500 MB zero-filled blob: its pack is half a megabyte."""
    repo = make_repo(tmp_path_factory.mktemp("zeros") / "repo", PROCFILE)
    with (repo / "zeros.bin").open("wb") as out:
        out.truncate(ZEROS)
    commit(repo, "zeros")
    (repo / "zeros.bin").unlink()  # the commit has it; the test machine's disk need not keep it twice
    return repo


@pytest.fixture(scope="session")
def bomb_repo(tmp_path_factory) -> tuple[Path, str]:
    """A commit whose bomb.bin is stored as a delta against a 1 MiB zero blob: 256 copy instructions of 2
    bytes each make 256 MiB. Returns the repository and the blob's id."""
    repo = make_repo(tmp_path_factory.mktemp("bomb") / "repo", PROCFILE)
    base = bytes(MiB)
    base_id = hashlib.sha1(f"blob {MiB}\0".encode() + base).digest()
    delta = _varint(MiB) + _varint(BOMB) + bytes([0xC0, 0x10]) * (BOMB // MiB)  # copy 0x100000 bytes from 0
    entries = _pack_entry(3, base) + _pack_entry(7, delta, base_id)
    pack = b"PACK" + struct.pack(">II", 2, 2) + entries
    git(repo, "index-pack", "--stdin", input=pack + hashlib.sha1(pack).digest())
    bomb = _blob_id(BOMB)
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{base_id.hex()},base.bin")
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{bomb},bomb.bin")
    git(repo, "commit", "-qm", "bomb")
    filler_commits(repo)
    verify = git(repo, "verify-pack", "-v", *map(str, (repo / ".git/objects/pack").glob("*.idx")))
    assert any(line.startswith(bomb) and len(line.split()) == 7 for line in verify.splitlines()), verify
    return repo, bomb


@pytest.fixture(scope="session")
def delta_repo(tmp_path_factory) -> Path:
    """A 12 MB file (over what a delta may take in memory) and a small one, each in six versions, stored as
    delta chains (newest versions smallest, so they are the deltas), with enough objects to stay a pack."""
    repo = make_repo(tmp_path_factory.mktemp("deltas") / "repo", PROCFILE)
    rng = random.Random(7)
    big = bytearray(rng.randbytes(12 * MiB))
    small = "".join(f"line {i}\n" for i in range(20_000))
    for version in range(6):
        big[version * 4096:version * 4096 + 8] = b"version!"
        (repo / "big.bin").write_bytes(bytes(big[:len(big) - version * 65536]))
        (repo / "small.txt").write_text(small[:len(small) - version * 100] + f"v{version}\n")
        commit(repo, f"v{version}")
    filler_commits(repo)
    git(repo, "repack", "-adfq", "--depth=50", "--window=50")
    return repo


def server_delta_depth(daemon: Daemon, app: str, blob: str) -> int:
    """How deep in a delta chain the app's repository stores `blob` (0: whole)."""
    packs = (daemon.data / "repos" / f"{app}.git" / "objects" / "pack").glob("*.idx")
    verify = subprocess.run(["git", "verify-pack", "-v", *map(str, packs)], capture_output=True, text=True).stdout
    fields = next(line.split() for line in verify.splitlines() if line.startswith(blob))
    return int(fields[5]) if len(fields) == 7 else 0


@pytest.fixture(scope="module", params=["cgit", "dulwich"])
def tight(request, tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp(f"tight-{request.param}"), backend=request.param,
                     extra_args=("--max-app-bytes", str(64 * MiB), "--max-app-files", "100"))
    yield d
    stop_daemon(d)


@pytest.fixture(scope="module", params=["cgit", "dulwich"])
def roomy(request, tmp_path_factory) -> Iterator[Daemon]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    d = start_daemon(tmp_path_factory.mktemp(f"roomy-{request.param}"), backend=request.param)
    yield d
    stop_daemon(d)


def test_a_blob_past_max_app_bytes_is_refused_before_it_is_written(tight: Daemon, zeros_repo: Path) -> None:
    result, grown = push(tight, zeros_repo, "zeros")
    assert refusal(result) == ("deploy failed at export: the pushed tree is too large uncompressed (past the limit "
                               "at zeros.bin, a 500.0 MiB file): the limit is 64 MiB (an admin can raise it with "
                               "devflow up --max-app-bytes)")
    assert grown < MEMORY_MARGIN, f"the daemon's peak grew by {grown // MiB} MiB"
    assert not any((tight.apps_dir / "zeros" / "builds").iterdir())
    assert tight.git("ls-remote", f"{tight.ssh_url}/zeros.git").stdout == ""  # nothing of the push was kept


def test_a_delta_bomb_is_refused_from_its_delta_header(tight: Daemon, bomb_repo: tuple[Path, str]) -> None:
    repo, _ = bomb_repo
    result, grown = push(tight, repo, "bomb")
    assert "past the limit at bomb.bin, a 256.0 MiB file): the limit is 64 MiB" in refusal(result)
    assert grown < MEMORY_MARGIN, f"the daemon's peak grew by {grown // MiB} MiB"
    assert not any((tight.apps_dir / "bomb" / "builds").iterdir())


def test_too_many_files_are_refused(tight: Daemon) -> None:
    repo = make_repo(tight.work / "crowd", {**PROCFILE, **{f"d/f{i}": "" for i in range(100)}})
    result, _ = push(tight, repo, "crowd")
    reason = refusal(result)
    assert re.fullmatch(r"deploy failed at export: the pushed tree holds too many files and directories \(past the "
                        r"limit at d/f\d+\): the limit is 100 \(an admin can raise it with devflow up "
                        r"--max-app-files\)", reason), reason


def test_a_500_mb_blob_is_streamed_to_disk(roomy: Daemon, zeros_repo: Path) -> None:
    result, grown = push(roomy, zeros_repo, "zeros")
    assert result.returncode == 0, result.stderr
    assert grown < MEMORY_MARGIN, f"the daemon's peak grew by {grown // MiB} MiB"
    build = max((roomy.apps_dir / "zeros" / "builds").iterdir(), key=lambda p: int(p.name))
    assert all_zeros(build / "zeros.bin", ZEROS)


def test_deltas_of_any_size_are_applied(roomy: Daemon, bomb_repo: tuple[Path, str], delta_repo: Path) -> None:
    repo, bomb = bomb_repo
    result, grown = push(roomy, repo, "bomb")
    assert result.returncode == 0, result.stderr
    assert server_delta_depth(roomy, "bomb", bomb) >= 1  # the server holds it as the delta that was pushed
    assert grown < MEMORY_MARGIN, f"the daemon's peak grew by {grown // MiB} MiB"
    build = max((roomy.apps_dir / "bomb" / "builds").iterdir(), key=lambda p: int(p.name))
    assert all_zeros(build / "bomb.bin", BOMB)

    result, _ = push(roomy, delta_repo, "deltas")
    assert result.returncode == 0, result.stderr
    build = max((roomy.apps_dir / "deltas" / "builds").iterdir(), key=lambda p: int(p.name))
    for name in ("big.bin", "small.txt"):
        blob = git(delta_repo, "rev-parse", f"HEAD:{name}")
        assert server_delta_depth(roomy, "deltas", blob) >= 1, name
        wanted = subprocess.run(["git", "-C", str(delta_repo), "cat-file", "blob", blob], capture_output=True,
                                check=True).stdout
        assert (build / name).read_bytes() == wanted, name


DISK_FILLER = """\
const fs = require("fs");
const chunk = Buffer.alloc(8 * 1024 * 1024, 1);
const out = fs.openSync(process.argv[2], "w");
const pause = new Int32Array(new SharedArrayBuffer(4));
for (let i = 0; i < %d; i++) { fs.writeSync(out, chunk); Atomics.wait(pause, 0, 0, 100); }
fs.closeSync(out);
"""


def filler_app(daemon: Daemon, name: str, target: str, chunks: int) -> Path:
    """A node app whose build writes `chunks` of 8 MiB to `target`, a tenth of a second apart."""
    lock = {"name": name, "lockfileVersion": 3, "requires": True, "packages": {"": {"name": name}}}
    return make_repo(daemon.work / name, {
        **PROCFILE, "fill.js": DISK_FILLER % chunks, "package-lock.json": json.dumps(lock),
        "package.json": json.dumps({"name": name, "private": True, "scripts": {"build": f"node fill.js {target}"}}),
    })


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="needs Node.js and npm")
def test_a_build_past_max_disk_bytes_is_stopped(tmp_path_factory) -> None:
    daemon = start_daemon(tmp_path_factory.mktemp("disk-bound"), extra_args=("--max-disk-bytes", str(64 * MiB)))
    try:
        # The build writes up to 2 GiB into the app's cache (its HOME): the watch stops it long before.
        repo = filler_app(daemon, "hog", "$HOME/filler", 256)
        result, _ = push(daemon, repo, "hog")
        reason = refusal(result)
        assert reason.startswith("deploy failed at build: the builds and caches of hog take "), reason
        assert reason.endswith("the limit is 64 MiB (an admin can raise it with devflow up --max-disk-bytes)")
        filler = daemon.apps_dir / "hog" / "cache" / "home" / "filler"
        assert filler.stat().st_size < 1024 * MiB  # the build was killed, not waited for

        # With that much in its cache already, the next push is refused before its export writes a byte.
        result, _ = push(daemon, make_repo(daemon.work / "hog-again", PROCFILE), "hog")
        assert "with this push the app's builds and caches would take" in refusal(result)
        assert "--max-disk-bytes" in refusal(result)
    finally:
        stop_daemon(daemon)


@pytest.fixture
def full_disk(tmp_path_factory) -> Iterator[Daemon]:
    """A daemon whose apps directory is a 48 MiB tmpfs."""
    if os.getuid() != 0:
        pytest.skip(reason="mounting a tmpfs needs root")
    apps = Path(tempfile.mkdtemp(prefix="devflow-test-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0711", "tmpfs", str(apps)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        apps.rmdir()
        pytest.skip(reason=f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    daemon = start_daemon(tmp_path_factory.mktemp("full-disk"), extra_args=("--apps-dir", str(apps)))  # the last wins
    daemon.apps_dir.rmdir()
    daemon.apps_dir = apps
    try:
        yield daemon
    finally:
        stop_daemon(daemon)
        subprocess.run(["umount", str(apps)], check=True)
        apps.rmdir()


def tmpfs_used(path: Path) -> int:
    usage = os.statvfs(path)
    return (usage.f_blocks - usage.f_bfree) * usage.f_frsize


def test_a_full_disk_fails_the_deployment_and_not_the_daemon(full_disk: Daemon) -> None:
    daemon = full_disk
    push(daemon, make_repo(daemon.work / "live", {**PROCFILE, "index.html": "still here\n"}), "live")
    assert get(daemon, "live").text == "still here\n"

    # The export runs out of space: incompressible data larger than the disk.
    repo = make_repo(daemon.work / "huge", {**PROCFILE, "noise.bin": random.Random(3).randbytes(56 * MiB)})
    result, _ = push(daemon, repo, "huge")
    assert refusal(result) == ("deploy failed at export: the disk that holds the app builds is full; nothing of "
                               "this push was kept, and the live release keeps serving")
    assert tmpfs_used(daemon.apps_dir) < 8 * MiB  # what the export wrote is gone

    # The build runs out of space.
    if shutil.which("node") is not None and shutil.which("npm") is not None:
        result, _ = push(daemon, filler_app(daemon, "filler", "filler.bin", 16), "filler")
        reason = refusal(result)
        assert reason.startswith("deploy failed at build: "), reason
        assert "ENOSPC" in result.stderr  # the build tool's own words, in the push output
        assert tmpfs_used(daemon.apps_dir) < 8 * MiB

    # The daemon serves on: the live app, and the next push.
    assert get(daemon, "live").text == "still here\n"
    result, _ = push(daemon, make_repo(daemon.work / "after", {**PROCFILE, "index.html": "after\n"}), "after")
    assert result.returncode == 0, result.stderr
    assert get(daemon, "after").text == "after\n"
