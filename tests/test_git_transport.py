"""Clone, fetch and push with the stock git and OpenSSH clients over SSH and HTTP, on both pack backends.

Every test runs once per backend (the module-scoped `daemon` fixture): "cgit" serves the pack
exchange with C git's upload-pack / receive-pack, "dulwich" with dulwich's handlers. Where dulwich
cannot do something (it has no protocol v2 server), the test asserts what does hold for it instead
of skipping. Each test uses its own app, and ends with `git fsck --strict` of the server repository.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import Daemon, commit, make_repo

TRANSPORTS = ("ssh", "http")
MiB = 1024 * 1024
PUSH_TIMEOUT = 300  # seconds; only a hung daemon gets near it

# Every way the README tells users to name a remote; "{ssh}" and "{http}" include host and port.
REMOTE_FORMS = {
    "ssh-url": "{ssh}/{app}.git",
    "ssh-url-no-suffix": "{ssh}/{app}",
    "scp": "git@127.0.0.1:{app}.git",
    "scp-no-suffix": "git@127.0.0.1:{app}",
    "ssh-config-alias": "devflow-test:{app}.git",
    "http": "{http}/{app}.git",
    "http-no-suffix": "{http}/{app}",
}


def source_repo(path: Path, files: dict[str, str | bytes] | None = None) -> Path:
    """A local repository on `trunk`: a push to the deploy branch (main) would start a deployment."""
    return make_repo(path, files, branch="trunk")


def remote(daemon: Daemon, app: str, transport: str) -> str:
    return f"{daemon.ssh_url}/{app}.git" if transport == "ssh" else f"{daemon.http_url()}/{app}.git"


def server_refs(daemon: Daemon, app: str) -> dict[str, str]:
    """The refs as they are on disk, not as any transport reports them."""
    out = subprocess.run(
        ["git", "--git-dir", str(daemon.data / "repos" / f"{app}.git"), "for-each-ref",
         "--format=%(refname) %(objectname)"], capture_output=True, text=True, check=True,
    ).stdout
    return dict(line.split(" ") for line in out.splitlines())


def remote_lines(output: str) -> list[str]:
    """The `remote:` lines of a git client's output, without the prefix and the padding git adds."""
    return [line[len("remote: "):].rstrip() for line in output.splitlines() if line.startswith("remote: ")]


def rev(daemon: Daemon, repo: Path, what: str = "HEAD") -> str:
    return daemon.git("rev-parse", what, cwd=repo).stdout.strip()


def served_protocol_v2(trace: str) -> bool:
    """Whether the server answered with protocol v2, per the client's GIT_TRACE_PACKET output."""
    return re.search(r"packet:\s+\S+< version 2$", trace, re.MULTILINE) is not None


def pkt(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return f"{len(data) + 4:04x}".encode() + data


def parse_pkts(data: bytes) -> tuple[list[bytes | None], bytes]:
    """Split pkt-lines (None for a flush) off the front of `data`; return them and the rest."""
    lines: list[bytes | None] = []
    while len(data) >= 4 and re.fullmatch(rb"[0-9a-f]{4}", data[:4]):
        size = int(data[:4], 16)
        if size == 0:
            lines.append(None)
            size = 4
        else:
            lines.append(data[4:size])
        data = data[size:]
    return lines, data


def empty_pack() -> bytes:
    """What git sends with a push that needs no new objects: a version 2 pack of zero objects."""
    data = b"PACK" + (2).to_bytes(4, "big") + (0).to_bytes(4, "big")
    return data + hashlib.sha1(data).digest()


def test_push_and_clone_over_ssh_and_http(daemon: Daemon) -> None:
    """The smoke test: one push over each transport, then a clone over each."""
    src = source_repo(daemon.work / "t1", {"app.py": "print('hi')\n"})
    push = daemon.git("push", f"{daemon.ssh_url}/transport.git", "trunk", cwd=src)
    assert "remote: DevFlow: transport received 1 ref update(s) from admin" in push.stderr
    assert "trunk: new at" in push.stderr

    commit(src, "second", allow_empty=True)
    push = daemon.git("push", f"{daemon.http_url()}/transport.git", "trunk", cwd=src)
    assert "remote: DevFlow: transport received" in push.stderr

    head = daemon.git("rev-parse", "HEAD", cwd=src).stdout
    daemon.git("clone", "-q", f"{daemon.ssh_url}/transport.git", "c-ssh")
    daemon.git("clone", "-q", f"{daemon.http_url()}/transport.git", "c-http")
    for clone in ("c-ssh", "c-http"):
        assert daemon.git("rev-parse", "HEAD", cwd=daemon.work / clone).stdout == head
        assert (daemon.work / clone / "app.py").read_text() == "print('hi')\n"
    daemon.fsck("transport")


@pytest.mark.parametrize("form", REMOTE_FORMS)
def test_clone_fetch_push_with_each_remote_form(daemon: Daemon, form: str) -> None:
    """The README's remote forms all reach the same repository, with and without `.git`."""
    app = f"form-{form}"
    env: dict[str, str] = {}  # the daemon's GIT_SSH_COMMAND passes -p PORT for the other SSH forms
    if form == "ssh-config-alias":
        config = daemon.work / "ssh_config"
        config.write_text(
            f"Host devflow-test\n  HostName 127.0.0.1\n  Port {daemon.ssh_port}\n  User git\n"
            f"  IdentityFile {daemon.admin_key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
        )
        env = {"GIT_SSH_COMMAND": f"ssh -F {config}"}
    url = REMOTE_FORMS[form].format(ssh=daemon.ssh_url, http=daemon.http_url(), app=app)
    src = source_repo(daemon.work / app / "src", {"app.py": "print('hi')\n"})

    push = daemon.git("push", url, "trunk", cwd=src, env=env)
    assert f"DevFlow: {app} received 1 ref update(s) from admin" in remote_lines(push.stderr)

    clone = daemon.work / app / "clone"
    daemon.git("clone", "-q", url, str(clone), env=env)
    assert rev(daemon, clone) == rev(daemon, src)
    assert (clone / "app.py").read_text() == "print('hi')\n"

    (src / "app.py").write_text("print('second')\n")
    second = commit(src, "second")
    daemon.git("push", url, "trunk", cwd=src, env=env)
    daemon.git("fetch", "-q", "origin", cwd=clone, env=env)
    assert rev(daemon, clone, "origin/trunk") == second

    daemon.git("merge", "-q", "--ff-only", "origin/trunk", cwd=clone)
    third = commit(clone, "from the clone", allow_empty=True)
    daemon.git("push", "-q", "origin", "trunk", cwd=clone, env=env)
    daemon.git("pull", "-q", "--ff-only", url, "trunk", cwd=src, env=env)
    assert rev(daemon, src) == third
    assert server_refs(daemon, app)["refs/heads/trunk"] == third
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_protocol_v2_clone_and_fetch(daemon: Daemon, transport: str) -> None:
    """cgit answers protocol v2 over SSH (GIT_PROTOCOL env) and HTTP (Git-Protocol header).

    dulwich has no v2 server: the daemon must not pass the request on, so the client falls back
    to v0 and everything still works.
    """
    app = f"v2-{transport}"
    url = remote(daemon, app, transport)
    src = source_repo(daemon.work / app / "src", {"a.txt": "a\n"})
    daemon.git("push", "-q", url, "trunk", cwd=src)

    trace = {"GIT_TRACE_PACKET": "1"}
    clone = daemon.work / app / "clone"
    cloned = daemon.git("-c", "protocol.version=2", "clone", url, str(clone), env=trace)
    assert (clone / "a.txt").read_text() == "a\n"

    commit(src, "second", allow_empty=True)
    daemon.git("push", "-q", url, "trunk", cwd=src)
    fetched = daemon.git("-c", "protocol.version=2", "fetch", "origin", cwd=clone, env=trace)
    assert rev(daemon, clone, "origin/trunk") == rev(daemon, src)

    for output in (cloned.stderr, fetched.stderr):
        if daemon.backend == "cgit":
            assert served_protocol_v2(output), output[-2000:]
            assert "> command=ls-refs" in output and "> command=fetch" in output
        else:
            assert not served_protocol_v2(output), output[-2000:]
            assert "> command=" not in output  # v0: ref advertisement, then want/have
    daemon.fsck(app)


def shallow_source(daemon: Daemon, app: str, url: str) -> Path:
    """A repository of four commits, pushed: shallow clones of it can be told apart by depth."""
    src = source_repo(daemon.work / app / "src", {"n.txt": "0\n"})
    for n in range(1, 4):
        (src / "n.txt").write_text(f"{n}\n")
        commit(src, f"commit {n}")
    daemon.git("push", "-q", url, "trunk", cwd=src)
    return src


def depth(daemon: Daemon, clone: Path) -> int:
    return int(daemon.git("rev-list", "--count", "HEAD", cwd=clone).stdout)


def is_shallow(daemon: Daemon, clone: Path) -> bool:
    return daemon.git("rev-parse", "--is-shallow-repository", cwd=clone).stdout.strip() == "true"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shallow_clone_deepen_and_unshallow(daemon: Daemon, transport: str) -> None:
    """--depth 1 gets one commit; deepening and --unshallow fetch the rest.

    dulwich lacks `deepen-relative`, so `--deepen` is refused there (by the client, cleanly) and
    `--depth 2` deepens instead.
    """
    app = f"shallow-{transport}"
    url = remote(daemon, app, transport)
    shallow_source(daemon, app, url)
    clone = daemon.work / app / "clone"
    daemon.git("clone", "-q", "--depth", "1", url, str(clone))
    assert is_shallow(daemon, clone) and depth(daemon, clone) == 1
    assert (clone / "n.txt").read_text() == "3\n"

    deepen = daemon.git("fetch", "-q", "--deepen", "1", cwd=clone, check=False)
    if daemon.backend == "cgit":
        assert deepen.returncode == 0, deepen.stderr
    else:
        assert deepen.returncode != 0 and "Server does not support --deepen" in deepen.stderr
        daemon.git("fetch", "-q", "--depth", "2", cwd=clone)
    assert is_shallow(daemon, clone) and depth(daemon, clone) == 2

    daemon.git("fetch", "-q", "--unshallow", cwd=clone)
    assert not is_shallow(daemon, clone) and depth(daemon, clone) == 4
    daemon.git("fsck", "--no-progress", "--strict", cwd=clone)
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fetch_new_work_into_a_shallow_clone(daemon: Daemon, transport: str) -> None:
    """A plain `git pull` in a shallow clone (how CI jobs work) gets the new commits and stays shallow."""
    app = f"shallow-fetch-{transport}"
    url = remote(daemon, app, transport)
    src = shallow_source(daemon, app, url)
    clone = daemon.work / app / "clone"
    daemon.git("clone", "-q", "--depth", "1", url, str(clone))

    (src / "n.txt").write_text("4\n")
    newest = commit(src, "commit 4")
    daemon.git("push", "-q", url, "trunk", cwd=src)
    pull = daemon.git("pull", "-q", "--ff-only", cwd=clone, check=False)
    assert pull.returncode == 0, pull.stderr
    assert rev(daemon, clone) == newest and (clone / "n.txt").read_text() == "4\n"
    assert is_shallow(daemon, clone) and depth(daemon, clone) == 2
    daemon.git("fsck", "--no-progress", "--strict", cwd=clone)
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_partial_clone_fetches_blobs_on_checkout(daemon: Daemon, transport: str) -> None:
    """--filter=blob:none leaves blobs on the server until a checkout asks for them.

    dulwich cannot serve the by-id fetches that get the missing blobs later, so it does not offer
    `filter`: the client warns and makes a full clone, whose checkout needs nothing more.
    """
    app = f"partial-{transport}"
    url = remote(daemon, app, transport)
    src = source_repo(daemon.work / app / "src", {"old.txt": "old\n"})
    (src / "old.txt").unlink()
    (src / "app.py").write_text("print('current')\n")
    commit(src, "current")
    daemon.git("push", "-q", url, "trunk", cwd=src)

    clone = daemon.work / app / "clone"
    cloned = daemon.git("clone", "-q", "--filter=blob:none", "--no-checkout", url, str(clone))

    def missing() -> set[str]:
        out = daemon.git("rev-list", "--objects", "--all", "--missing=print", cwd=clone).stdout
        return {line[1:] for line in out.splitlines() if line.startswith("?")}

    current_blob = daemon.git("rev-parse", "HEAD:app.py", cwd=src).stdout.strip()
    old_blob = daemon.git("rev-parse", "HEAD~1:old.txt", cwd=src).stdout.strip()
    if daemon.backend == "cgit":
        assert missing() == {current_blob, old_blob}
    else:
        assert "filtering not recognized by server" in cloned.stderr
        assert missing() == set()

    daemon.git("checkout", "-q", "trunk", cwd=clone)  # a partial clone fetches app.py's blob here
    assert (clone / "app.py").read_text() == "print('current')\n"
    assert missing() == ({old_blob} if daemon.backend == "cgit" else set())
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_force_push_rewrites_an_unprotected_branch(daemon: Daemon, transport: str) -> None:
    """A plain push of rewritten history is refused by the client; --force lands it."""
    app = f"force-{transport}"
    url = remote(daemon, app, transport)
    src = source_repo(daemon.work / app / "src")
    daemon.git("checkout", "-q", "-b", "topic", cwd=src)
    before = commit(src, "topic work", allow_empty=True)
    daemon.git("push", "-q", url, "trunk", "topic", cwd=src)

    daemon.git("commit", "-q", "--amend", "--allow-empty", "-m", "topic work, rewritten", cwd=src)
    rewritten = rev(daemon, src)
    plain = daemon.git("push", url, "topic", cwd=src, check=False)
    assert plain.returncode != 0 and "non-fast-forward" in plain.stderr
    assert server_refs(daemon, app)["refs/heads/topic"] == before

    forced = daemon.git("push", "--force", url, "topic", cwd=src)
    assert "(forced update)" in forced.stderr
    assert f"  topic: {before[:7]}..{rewritten[:7]}" in remote_lines(forced.stderr)
    assert server_refs(daemon, app)["refs/heads/topic"] == rewritten
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_delete_branches_and_tags(daemon: Daemon, transport: str) -> None:
    """`push :ref` and `push --delete` remove branches and (annotated or light) tags."""
    app = f"delete-{transport}"
    url = remote(daemon, app, transport)
    src = source_repo(daemon.work / app / "src")
    head = rev(daemon, src)
    daemon.git("branch", "topic", cwd=src)
    daemon.git("branch", "other", cwd=src)
    daemon.git("tag", "-a", "-m", "release 1", "v1", cwd=src)
    daemon.git("tag", "v2", cwd=src)
    daemon.git("push", "-q", url, "trunk", cwd=src)  # the first branch becomes HEAD, which git will not delete
    daemon.git("push", "-q", url, "topic", "other", "v1", "v2", cwd=src)
    assert set(server_refs(daemon, app)) == {"refs/heads/trunk", "refs/heads/topic", "refs/heads/other",
                                               "refs/tags/v1", "refs/tags/v2"}

    deleted = daemon.git("push", url, ":topic", cwd=src)
    assert "[deleted]" in deleted.stderr
    assert f"  topic: deleted (was {head[:7]})" in remote_lines(deleted.stderr)
    daemon.git("push", "-q", url, "--delete", "other", "v1", cwd=src)
    daemon.git("push", "-q", url, ":refs/tags/v2", cwd=src)

    assert server_refs(daemon, app) == {"refs/heads/trunk": head}
    assert daemon.git("ls-remote", url).stdout.split() == [head, "HEAD", head, "refs/heads/trunk"]
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_atomic_push_with_a_stale_lease_moves_no_ref(daemon: Daemon, transport: str) -> None:
    """`push --atomic` of two refs where one lease is stale: neither moves; with a fresh lease both do."""
    app = f"atomic-{transport}"
    url = remote(daemon, app, transport)
    src = source_repo(daemon.work / app / "src")
    daemon.git("branch", "other", cwd=src)
    daemon.git("push", "-q", url, "trunk", "other", cwd=src)
    leased = rev(daemon, src, "other")

    elsewhere = daemon.work / app / "elsewhere"
    daemon.git("clone", "-q", "-b", "other", url, str(elsewhere))
    moved = commit(elsewhere, "someone else's work", allow_empty=True)
    daemon.git("push", "-q", "origin", "other", cwd=elsewhere)
    before = server_refs(daemon, app)

    new_trunk = commit(src, "trunk work", allow_empty=True)
    daemon.git("checkout", "-q", "-b", "rewrite", "HEAD~1", cwd=src)
    new_other = commit(src, "rewrite of other", allow_empty=True)
    stale = daemon.git("push", "--atomic", f"--force-with-lease=other:{leased}", url, "trunk:trunk",
                       "rewrite:other", cwd=src, check=False)
    assert stale.returncode != 0
    assert "stale info" in stale.stderr and "atomic push failed" in stale.stderr
    assert server_refs(daemon, app) == before

    fresh = daemon.git("push", "--atomic", f"--force-with-lease=other:{moved}", url, "trunk:trunk",
                       "rewrite:other", cwd=src)
    assert "ref update(s)" in fresh.stderr
    after = server_refs(daemon, app)
    assert (after["refs/heads/trunk"], after["refs/heads/other"]) == (new_trunk, new_other)
    daemon.fsck(app)


def test_atomic_push_refused_whole_when_the_server_sees_a_stale_old_value(daemon: Daemon) -> None:
    """The server's half of --atomic: an old value that went stale after the client read the refs.

    The stock client cannot be made to send a stale old value on demand, so this speaks smart HTTP
    directly: rewind `trunk` (valid) and move `other` from a value it does not have, without new objects.
    """
    app = "atomic-server"
    url = remote(daemon, app, "http")
    src = source_repo(daemon.work / app / "src")
    first = rev(daemon, src)
    second = commit(src, "second", allow_empty=True)
    third = commit(src, "third", allow_empty=True)
    daemon.git("push", "-q", url, "trunk", f"{first}:refs/heads/other", cwd=src)
    before = server_refs(daemon, app)

    commands = (pkt(f"{third} {second} refs/heads/trunk\0report-status atomic\n")
                + pkt(f"{third} {second} refs/heads/other\n") + b"0000")  # other is at `first`, not `third`
    with httpx.Client(base_url=daemon.http, auth=("admin", daemon.token), timeout=60) as client:
        advertised = client.get(f"/{app}.git/info/refs", params={"service": "git-receive-pack"})
        assert b"atomic" in advertised.content
        answer = client.post(f"/{app}.git/git-receive-pack", content=commands + empty_pack(),
                             headers={"Content-Type": "application/x-git-receive-pack-request"})
    assert answer.status_code == 200
    report = [line.decode().rstrip("\n") for line in parse_pkts(answer.content)[0] if line is not None]
    assert "unpack ok" in report
    assert [line.split(" ")[:2] for line in report if line.startswith(("ok ", "ng "))] == [
        ["ng", "refs/heads/trunk"], ["ng", "refs/heads/other"]]
    assert server_refs(daemon, app) == before
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_push_options_reach_the_daemon(daemon: Daemon, transport: str) -> None:
    """`git push -o` options arrive with the push event; the acknowledgement lists them."""
    app = f"options-{transport}"
    url = remote(daemon, app, transport)
    src = source_repo(daemon.work / app / "src")
    push = daemon.git("push", "-o", "foo", "-o", "bar", url, "trunk", cwd=src)
    assert "  push options: foo, bar" in remote_lines(push.stderr)

    commit(src, "no options", allow_empty=True)
    push = daemon.git("push", url, "trunk", cwd=src)
    assert not any("push options" in line for line in remote_lines(push.stderr))
    daemon.fsck(app)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_daemon_messages_arrive_as_remote_lines(daemon: Daemon, transport: str) -> None:
    """What the daemon says during a push, accepted or refused, reaches the pusher as `remote:` lines."""
    app = f"hooks-{transport}"
    url = remote(daemon, app, transport)
    src = source_repo(daemon.work / app / "src")
    daemon.git("tag", "v1", cwd=src)
    head = rev(daemon, src)
    push = daemon.git("push", url, "trunk", "v1", cwd=src)
    lines = remote_lines(push.stderr)
    assert lines.index(f"DevFlow: {app} received 2 ref update(s) from admin") < min(
        lines.index(f"  trunk: new at {head[:7]}"), lines.index(f"  v1: new at {head[:7]}"))

    result = daemon.ssh("apps:set", app, "protected-branches", "trunk")
    assert result.returncode == 0, result.stderr
    daemon.git("commit", "-q", "--amend", "--allow-empty", "-m", "rewritten", cwd=src)
    refused = daemon.git("push", "--force", url, "trunk", cwd=src, check=False)
    assert refused.returncode != 0 and "[remote rejected]" in refused.stderr
    assert ("error: push refused: branch trunk is protected: non-fast-forward updates are refused; "
            "pull and merge (or rebase) first") in remote_lines(refused.stderr)
    assert server_refs(daemon, app)["refs/heads/trunk"] == head
    daemon.fsck(app)


def test_gzip_request_body_is_inflated(daemon: Daemon) -> None:
    """git gzips large upload-pack requests; the daemon must inflate them before the pack program."""
    app = "gzip-body"
    src = source_repo(daemon.work / app / "src", {"a.txt": "gzip\n"})
    daemon.git("push", "-q", remote(daemon, app, "http"), "trunk", cwd=src)
    head = rev(daemon, src)

    with httpx.Client(base_url=daemon.http, auth=("admin", daemon.token), timeout=60) as client:
        advertised = client.get(f"/{app}.git/info/refs", params={"service": "git-upload-pack"})
        assert advertised.headers["content-type"] == "application/x-git-upload-pack-advertisement"
        lines, _ = parse_pkts(advertised.content)
        assert lines[0] == b"# service=git-upload-pack\n"
        refs = {line.split(b"\0")[0].split(b" ")[1].strip(): line[:40] for line in lines[2:] if line}
        assert refs[b"refs/heads/trunk"].decode() == head

        # The capabilities git itself asks for (dulwich insists on them): the pack comes on band 1.
        request = (pkt(f"want {head} side-band-64k thin-pack ofs-delta no-progress\n") + b"0000"
                   + pkt("done\n"))
        answer = client.post(f"/{app}.git/git-upload-pack", content=gzip.compress(request), headers={
            "Content-Type": "application/x-git-upload-pack-request", "Content-Encoding": "gzip"})
    assert answer.status_code == 200
    lines, rest = parse_pkts(answer.content)
    assert lines[0] == b"NAK\n" and lines[-1] is None and rest == b""
    pack = b"".join(line[1:] for line in lines[1:-1] if line and line[:1] == b"\x01")
    assert pack.startswith(b"PACK")

    store = daemon.work / app / "store.git"
    daemon.git("init", "-q", "--bare", str(store))
    subprocess.run(["git", "index-pack", "--stdin"], cwd=store, input=pack, capture_output=True, check=True)
    assert daemon.git("cat-file", "-p", f"{head}:a.txt", cwd=store).stdout == "gzip\n"
    daemon.fsck(app)


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE).group(1))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_large_push_streams_through_the_daemon(daemon: Daemon, transport: str) -> None:
    """A 64 MiB incompressible push must stream: the daemon's peak RSS grows by far less than that.

    The pack program is a child process, so only the daemon's own buffering is measured. A small
    push first creates the app and pays the daemon's one-time costs, which are not streaming.
    """
    app = f"large-{transport}"
    url = remote(daemon, app, transport)
    size = 64 * MiB
    src = source_repo(daemon.work / app / "src")
    daemon.git("push", "-q", url, "trunk", cwd=src)
    (src / "blob.bin").write_bytes(os.urandom(size))
    commit(src, "64 MiB of noise")
    pid = daemon.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = peak_rss_kib(pid)

    daemon.git("push", "-q", url, "trunk", cwd=src)

    growth_mib = (peak_rss_kib(pid) - before) / 1024
    assert growth_mib < 32, f"daemon peak RSS grew by {growth_mib:.1f} MiB during a 64 MiB push"
    repo = daemon.data / "repos" / f"{app}.git"
    assert daemon.git("--git-dir", str(repo), "cat-file", "-s", "trunk:blob.bin").stdout.strip() == str(size)
    daemon.fsck(app)


def test_concurrent_pushes_to_one_repository(daemon: Daemon) -> None:
    """Six pushes of different branches and three racing for one branch, all at once.

    Every distinct branch lands; exactly one racer wins and the others are told they lost; the
    repository stays sound and takes a normal push afterwards.
    """
    app = "concurrent"
    base = source_repo(daemon.work / app / "base")
    daemon.git("push", "-q", remote(daemon, app, "ssh"), "trunk", cwd=base)

    jobs: list[tuple[Path, str, str, str]] = []  # (repo, branch, commit, url)
    for i in range(9):
        branch = f"branch-{i}" if i < 6 else "race"
        repo = daemon.work / app / f"pusher-{i}"
        daemon.git("clone", "-q", str(base), str(repo))
        daemon.git("checkout", "-q", "-b", branch, cwd=repo)
        (repo / f"file-{i}.txt").write_text(f"pusher {i}\n")
        jobs.append((repo, branch, commit(repo, f"work of pusher {i}"), remote(daemon, app, TRANSPORTS[i % 2])))

    start = threading.Barrier(len(jobs))

    def push(job: tuple[Path, str, str, str]) -> subprocess.CompletedProcess:
        repo, branch, _, url = job
        start.wait(timeout=60)
        return subprocess.run(["git", "push", url, branch], cwd=repo, capture_output=True, text=True,
                              env=daemon.git_env(), timeout=PUSH_TIMEOUT)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(push, jobs))

    refs = server_refs(daemon, app)
    for (_, branch, sha, _), result in zip(jobs[:6], results[:6], strict=True):
        assert result.returncode == 0, result.stderr
        assert refs[f"refs/heads/{branch}"] == sha
    racers = list(zip(jobs[6:], results[6:], strict=True))
    winners = [sha for (_, _, sha, _), result in racers if result.returncode == 0]
    assert len(winners) == 1, [result.stderr for _, result in racers]
    assert refs["refs/heads/race"] == winners[0]
    for _, result in racers:
        assert result.returncode == 0 or "rejected" in result.stderr, result.stderr
    daemon.fsck(app)

    daemon.git("pull", "-q", "--ff-only", remote(daemon, app, "ssh"), "trunk", cwd=base)
    after = commit(base, "after the rush", allow_empty=True)
    daemon.git("push", "-q", remote(daemon, app, "http"), "trunk", cwd=base)
    assert server_refs(daemon, app)["refs/heads/trunk"] == after
    daemon.fsck(app)
