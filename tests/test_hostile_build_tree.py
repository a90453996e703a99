"""A tenant's running process plants a FIFO, a link or a 1 GiB file in its own next build the moment the daemon
hands the build to its uid; the daemon refuses the file clearly (or never needed it), and another user's
`ssh whoami` and the status page answer as fast as they did before the attack.

The real daemon as root, the real ssh and git clients; the attacker is tests/apps/planter, a deployed app.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import Daemon, commit, start_daemon, stop_daemon

APPS = Path(__file__).parent / "apps"
APP = "planter"
# Read by the builder after the hand-over: planting there must make the push fail, saying why.
READ_BY_THE_BUILDER = ("package.json", "package-lock.json", "requirements.txt", ".static")
# Read by detection only, before the hand-over, while the tree is still root's: planting there changes nothing.
# (pip installs requirements.txt: the builder reads pyproject.toml only for uv, Poetry or pip without one.)
READ_BEFORE_THE_HAND_OVER = ("Procfile", "app.json", ".python-version", "runtime.txt", "go.mod", "yarn.lock",
                             "pnpm-lock.yaml", "pyproject.toml")
# The bound each is read with: a marker file's, max_manifest_bytes for what is only hashed and copied, and
# max_parsed_manifest_bytes for what the daemon parses.
BOUND = {".static": "4 KiB", "package-lock.json": "64 MiB", "package.json": "1 MiB", "requirements.txt": "1 MiB"}
REFUSAL = {"fifo": "{name} is a FIFO, not a regular file",
           "outside": "{name} is a symbolic link that leads outside the app",
           "huge": "{name} is larger than {size}"}
SAMPLES_BEFORE = 3
MAX_SAMPLES = 200
CALL_TIMEOUT = 60.0
PUSH_TIMEOUT = 300.0

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="a build is handed to the app's own uid only under a root daemon"),
    pytest.mark.skipif(shutil.which("npm") is None, reason="the planter app has a Node.js build step: needs npm"),
]


@dataclass
class Scene:
    daemon: Daemon
    repo: Path
    bob: Path
    secret: Path


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Iterator[Scene]:
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    tmp = tmp_path_factory.mktemp("hostile")
    daemon = start_daemon(tmp)
    try:
        secret = tmp / "root-only-secret"
        secret.write_text("TOPSECRET-of-root\n")
        secret.chmod(0o600)
        repo = daemon.work / APP
        shutil.copytree(APPS / APP, repo)
        daemon.git("init", "-q", "-b", "main", str(repo))
        commit(repo, "init")
        first = push(daemon, repo)
        assert first.returncode == 0, first.stderr
        bob = daemon.add_user("bob")
        yield Scene(daemon, repo, bob, secret)
    finally:
        stop_daemon(daemon)


def push(daemon: Daemon, repo: Path) -> subprocess.CompletedProcess:
    commit(repo, "again", allow_empty=True)
    return subprocess.run(["git", "push", f"{daemon.ssh_url}/{APP}.git", "main"], cwd=repo, capture_output=True,
                          text=True, env=daemon.git_env(), timeout=PUSH_TIMEOUT)


def app_get(daemon: Daemon, path: str, **params: str) -> str:
    response = httpx.get(f"http://127.0.0.1:{daemon.router_port}{path}", params=params,
                         headers={"Host": f"{APP}.localhost"}, timeout=10)
    response.raise_for_status()
    return response.text


def bobs_calls(daemon: Daemon, bob: Path) -> float:
    """The slower of bob's `ssh whoami` and the status page, in seconds."""
    started = time.monotonic()
    try:
        whoami = subprocess.run([*daemon.ssh_command(bob).split(), "git@127.0.0.1", "whoami"], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=CALL_TIMEOUT)
        ssh_seconds = time.monotonic() - started
        assert whoami.returncode == 0 and "bob" in whoami.stdout, whoami.stderr
        started = time.monotonic()
        status = httpx.get(daemon.http + "/", timeout=CALL_TIMEOUT)
    except (subprocess.TimeoutExpired, httpx.TimeoutException):
        return CALL_TIMEOUT  # a daemon that hangs: the assertion on the figures says so
    assert status.status_code < 500
    return max(ssh_seconds, time.monotonic() - started)


def attack(scene: Scene, plan: str) -> tuple[subprocess.CompletedProcess, str]:
    """Arm the planter, push while bob's calls are timed; the push's result and what was planted where.
    Asserts bob's calls took no longer than a generous margin over the same calls just before."""
    daemon = scene.daemon
    baseline = max(bobs_calls(daemon, scene.bob) for _ in range(SAMPLES_BEFORE))
    assert app_get(daemon, "/arm", plan=plan, outside=str(scene.secret)) == "armed"
    during: list[float] = []
    pushed = threading.Event()

    def sample() -> None:
        while not pushed.is_set() and len(during) < MAX_SAMPLES:
            during.append(bobs_calls(daemon, scene.bob))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = push(daemon, scene.repo)
    finally:
        pushed.set()
        sampler.join()
    planted = app_get(daemon, "/planted")
    assert planted, f"the planter never saw its build handed over:\n{result.stderr}"
    assert during, "no call of bob's was timed during the push"
    allowed = 10 * baseline + 5.0
    assert max(during) <= allowed, f"bob waited {max(during):.1f}s during the push, {baseline:.2f}s before"
    assert httpx.get(daemon.http + "/healthz", timeout=10).status_code == 200
    assert "TOPSECRET" not in result.stderr
    return result, planted


@pytest.mark.parametrize("kind", ["fifo", "outside", "huge"])
@pytest.mark.parametrize("name", READ_BY_THE_BUILDER)
def test_a_hostile_file_the_builder_reads_fails_the_push_clearly(scene: Scene, name: str, kind: str) -> None:
    before = app_get(scene.daemon, "/")
    result, planted = attack(scene, f"{name}:{kind}")
    assert planted.endswith(f": {name}:{kind}")
    assert result.returncode != 0
    assert REFUSAL[kind].format(name=name, size=BOUND[name]) in result.stderr, result.stderr
    assert "the live release v1 keeps serving" in result.stderr
    assert app_get(scene.daemon, "/") == before  # the previous release still answers
    cache = scene.daemon.apps_dir / APP / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file() and b"TOPSECRET" in p.read_bytes()[:1 << 20]]


def test_links_inside_the_app_are_followed_and_the_push_goes_live(scene: Scene) -> None:
    result, planted = attack(scene, ",".join(f"{name}:inside" for name in READ_BY_THE_BUILDER))
    assert result.returncode == 0, result.stderr
    assert "is live at" in result.stderr
    assert app_get(scene.daemon, "/") == f"planter {planted.split(':')[0]}"


@pytest.mark.parametrize("kind", ["fifo", "outside", "huge"])
def test_hostile_files_where_only_detection_looks_change_nothing(scene: Scene, kind: str) -> None:
    result, planted = attack(scene, ",".join(f"{name}:{kind}" for name in READ_BEFORE_THE_HAND_OVER))
    assert result.returncode == 0, result.stderr
    assert app_get(scene.daemon, "/") == f"planter {planted.split(':')[0]}"
