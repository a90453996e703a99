"""The front door under bad input, with the stock git and ssh clients against a real daemon.

Every refusal must say why, change nothing (refs, repositories, files), and leave the
repository sound (`git fsck --strict`) and open to the next normal push.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncssh
import httpx
import pytest
from conftest import Daemon, commit, free_port, keygen, make_repo, start_daemon, stop_daemon

INVALID_PATH = "invalid repository path"
INVALID_NAME = "invalid app name"
NO_ACCESS = "does not exist or you have no access to it"
BAD_NAMES = ["../x", "a/b", "x" * 300, "Upper", "café", "-x"]
# Not the deploy branch (main): these pushes are about the front door, not deployments.
BRANCH = "trunk"


# helpers


def new_app(daemon: Daemon, app: str) -> Path:
    """Push-to-create `app` as admin; returns the local repository it was pushed from."""
    src = make_repo(daemon.work / f"src-{app}", {"README": f"{app}\n"}, branch=BRANCH)
    daemon.git("push", "-q", f"{daemon.ssh_url}/{app}.git", BRANCH, cwd=src)
    return src


def repo(daemon: Daemon, app: str) -> Path:
    return daemon.data / "repos" / f"{app}.git"


def refs(daemon: Daemon, app: str) -> dict[str, str]:
    out = subprocess.run(
        ["git", "--git-dir", str(repo(daemon, app)), "for-each-ref", "--format=%(refname) %(objectname)"],
        capture_output=True, text=True, check=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())


def objects(daemon: Daemon, app: str) -> set[str]:
    """Every file under objects/: a refused push must not leave packs or loose objects behind."""
    root = repo(daemon, app) / "objects"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def files_outside_work(daemon: Daemon) -> set[str]:
    """Everything the daemon's tmp dir holds except the test's own work dir."""
    root = daemon.data.parent
    return {str(p.relative_to(root)) for p in root.rglob("*") if daemon.work not in (p, *p.parents)}


def assert_push_still_works(daemon: Daemon, app: str) -> None:
    """After a refusal the repository is sound and takes a normal push."""
    daemon.fsck(app)
    clone = Path(tempfile.mkdtemp(dir=daemon.work, prefix=f"check-{app}-"))
    daemon.git("clone", "-q", f"{daemon.ssh_url}/{app}.git", str(clone))
    head = commit(clone, "still works", allow_empty=True)
    daemon.git("push", "-q", "origin", "HEAD", cwd=clone)
    assert refs(daemon, app)[f"refs/heads/{BRANCH}"] == head
    daemon.fsck(app)


def token_for(daemon: Daemon, user: str) -> dict:
    """An HTTP token for another user, made by the admin over SSH."""
    result = daemon.ssh("tokens:create", "--user", user, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def raw_http(daemon: Daemon, method: str, path: str, token: str | None = None, body: bytes | None = None,
             content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent byte for byte: httpx and curl would normalize `..` away."""
    headers = {}
    if token:
        headers["Authorization"] = "Basic " + base64.b64encode(f"x:{token}".encode()).decode()
    if content_type:
        headers["Content-Type"] = content_type
    conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def pkt(data: bytes) -> bytes:
    return b"%04x" % (len(data) + 4) + data


def read_pkts(data: bytes) -> tuple[list[bytes], bytes]:
    """The pkt-lines up to the first flush, and what follows it."""
    lines = []
    while len(data) >= 4:
        size = int(data[:4], 16)
        if size == 0:
            return lines, data[4:]
        lines.append(data[4:size])
        data = data[size:]
    return lines, data


# who you are


def test_unknown_ssh_key_is_refused(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    src = new_app(d, "unknown-key")
    before = refs(d, "unknown-key")
    stranger = keygen(d.work / "stranger_key")

    result = d.ssh("whoami", key=stranger)
    assert result.returncode == 255 and "Permission denied (publickey)" in result.stderr

    commit(src, "from a stranger", allow_empty=True)
    push = d.git("push", f"{d.ssh_url}/unknown-key.git", BRANCH, cwd=src, key=stranger, check=False)
    assert push.returncode != 0 and "Permission denied (publickey)" in push.stderr
    push = d.git("push", f"{d.ssh_url}/stranger-app.git", BRANCH, cwd=src, key=stranger, check=False)
    assert push.returncode != 0 and not repo(d, "stranger-app").exists()
    assert refs(d, "unknown-key") == before
    assert_push_still_works(d, "unknown-key")


@pytest.mark.parametrize("kind", ["bad", "revoked", "expired"])
def test_bad_revoked_and_expired_tokens_are_refused(cgit_daemon: Daemon, kind: str) -> None:
    d = cgit_daemon
    app = f"token-{kind}"
    src = new_app(d, app)
    before = refs(d, app)
    if kind == "bad":
        token = "dfp_" + "x" * 40
    else:
        created = token_for(d, "admin")
        token = created["token"]
        assert d.git("ls-remote", f"{d.http_url(token)}/{app}.git").returncode == 0  # works until now
        if kind == "revoked":
            assert d.ssh("tokens:revoke", str(created["id"])).returncode == 0
        else:
            with sqlite3.connect(d.data / "state.db", timeout=30) as db:
                db.execute("UPDATE tokens SET expires_at = '2000-01-01 00:00:00.000000' WHERE id = ?",
                           (created["id"],))
            listed = json.loads(d.ssh("tokens:list", "--json").stdout)
            assert next(t for t in listed if t["id"] == created["id"])["state"] == "expired"

    clone = d.git("clone", "-q", f"{d.http_url(token)}/{app}.git", f"clone-{kind}", check=False)
    assert clone.returncode != 0 and "Authentication failed" in clone.stderr
    assert "invalid, expired or revoked token" in clone.stderr
    assert not (d.work / f"clone-{kind}").exists()

    commit(src, f"with a {kind} token", allow_empty=True)
    push = d.git("push", f"{d.http_url(token)}/{app}.git", BRANCH, cwd=src, check=False)
    assert push.returncode != 0 and "Authentication failed" in push.stderr

    with d.api(token) as api:
        response = api.get("whoami")
        assert response.status_code == 401
        assert response.json() == {"error": "invalid, expired or revoked token"}
        assert api.post("apps", json={"name": f"{app}-new"}).status_code == 401
    assert not repo(d, f"{app}-new").exists()
    assert refs(d, app) == before
    assert_push_still_works(d, app)


def test_anonymous_http_is_refused(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    new_app(d, "anonymous")
    for service in ("git-upload-pack", "git-receive-pack"):
        status, headers, body = raw_http(d, "GET", f"/anonymous.git/info/refs?service={service}")
        assert status == 401
        assert headers["www-authenticate"].startswith('Basic realm="DevFlow"')
        assert b"authentication required" in body
    status, headers, _ = raw_http(d, "POST", "/anonymous.git/git-receive-pack", body=b"0000",
                                  content_type="application/x-git-receive-pack-request")
    assert status == 401 and "www-authenticate" in headers
    assert httpx.get(f"{d.http}/api/apps").status_code == 401

    clone = d.git("clone", "-q", f"{d.http}/anonymous.git", "anonymous-clone", check=False)
    assert clone.returncode != 0 and "could not read Username" in clone.stderr
    assert_push_still_works(d, "anonymous")


# what you may do


def test_read_role_can_clone_but_not_push(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    src = new_app(d, "read-role")
    key = d.add_user("reader", {"read-role": "read"})
    token = token_for(d, "reader")["token"]
    before = refs(d, "read-role")

    d.git("clone", "-q", f"{d.ssh_url}/read-role.git", "reader-ssh", key=key)
    d.git("clone", "-q", f"{d.http_url(token, 'reader')}/read-role.git", "reader-http")

    commit(src, "by a reader", allow_empty=True)
    refused = "user reader has the read role on read-role; this needs write"
    push = d.git("push", f"{d.ssh_url}/read-role.git", BRANCH, cwd=src, key=key, check=False)
    assert push.returncode != 0 and refused in push.stderr
    push = d.git("push", f"{d.http_url(token, 'reader')}/read-role.git", BRANCH, cwd=src, check=False)
    assert push.returncode != 0 and refused in push.stderr and "403" in push.stderr
    assert refs(d, "read-role") == before
    assert_push_still_works(d, "read-role")


def test_no_role_sees_nothing(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    src = new_app(d, "hidden")
    key = d.add_user("outsider")
    token = token_for(d, "outsider")["token"]
    before = refs(d, "hidden")

    for url in (f"{d.ssh_url}/hidden.git", f"{d.http_url(token, 'outsider')}/hidden.git"):
        clone = d.git("clone", "-q", url, "outsider-clone", key=key, check=False)
        assert clone.returncode != 0 and f"app 'hidden' {NO_ACCESS}" in clone.stderr
        push = d.git("push", url, BRANCH, cwd=src, key=key, check=False)
        assert push.returncode != 0 and f"app 'hidden' {NO_ACCESS}" in push.stderr

    listed = d.ssh("apps:list", "--json", key=key)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    info = d.ssh("apps:info", "hidden", key=key)
    missing = d.ssh("apps:info", "no-such-app", key=key)
    # A hidden app and a missing one get the same answer, so names do not leak.
    assert info.stderr.replace("hidden", "APP") == missing.stderr.replace("no-such-app", "APP")
    with d.api(token) as api:
        assert api.get("apps/hidden").status_code == 404
    assert refs(d, "hidden") == before
    assert_push_still_works(d, "hidden")


def test_write_role_pushes_but_does_not_manage(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    new_app(d, "write-role")
    key = d.add_user("writer", {"write-role": "write"})
    d.add_user("bystander")

    clone = d.work / "writer-clone"
    d.git("clone", "-q", f"{d.ssh_url}/write-role.git", str(clone), key=key)
    head = commit(clone, "by a writer", allow_empty=True)
    d.git("push", "-q", "origin", BRANCH, cwd=clone, key=key)
    assert refs(d, "write-role")[f"refs/heads/{BRANCH}"] == head

    needs_admin = "user writer has the write role on write-role; this needs admin"
    for command in (("collaborators:add", "write-role", "bystander", "read"),
                    ("apps:destroy", "write-role", "--force"),
                    ("apps:set", "write-role", "protected-branches", BRANCH)):
        result = d.ssh(*command, key=key)
        assert result.returncode != 0 and needs_admin in result.stderr, command
    collaborators = json.loads(d.ssh("collaborators:list", "write-role", "--json").stdout)
    assert {c["user"] for c in collaborators} == {"admin", "writer"}
    assert repo(d, "write-role").is_dir()
    assert_push_still_works(d, "write-role")


def test_admin_role_manages(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    new_app(d, "admin-role")
    key = d.add_user("manager", {"admin-role": "admin"})
    d.add_user("helper")
    assert d.ssh("collaborators:add", "admin-role", "helper", "read", key=key).returncode == 0
    collaborators = json.loads(d.ssh("collaborators:list", "admin-role", "--json", key=key).stdout)
    assert {"user": "helper", "role": "read"} in collaborators
    destroyed = d.ssh("apps:destroy", "admin-role", "--force", key=key)
    assert destroyed.returncode == 0, destroyed.stderr
    assert not repo(d, "admin-role").exists()


def test_user_without_create_apps_cannot_push_to_create(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    key = d.add_user("nocreate")
    assert d.ssh("users:set", "nocreate", "create-apps", "false").returncode == 0
    token = token_for(d, "nocreate")["token"]
    src = make_repo(d.work / "src-nocreate", branch=BRANCH)
    refusal = "app 'nocreate-app' does not exist, and user nocreate may not create apps"
    for url in (f"{d.ssh_url}/nocreate-app.git", f"{d.http_url(token, 'nocreate')}/nocreate-app.git"):
        push = d.git("push", url, BRANCH, cwd=src, key=key, check=False)
        assert push.returncode != 0 and refusal in push.stderr
    create = d.ssh("apps:create", "nocreate-app", key=key)
    assert create.returncode != 0 and "user nocreate may not create apps" in create.stderr
    assert not repo(d, "nocreate-app").exists()
    assert "nocreate-app" not in d.ssh("apps:list").stdout


def test_push_to_create_makes_the_pusher_owner(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    key = d.add_user("creator")
    src = make_repo(d.work / "src-created", branch=BRANCH)
    push = d.git("push", f"{d.ssh_url}/created-by-push.git", BRANCH, cwd=src, key=key)
    assert "created-by-push received 1 ref update(s) from creator" in push.stderr
    info = json.loads(d.ssh("apps:info", "created-by-push", "--json", key=key).stdout)
    assert info["owner"] == "creator" and info["role"] == "owner"
    assert d.ssh("apps:set", "created-by-push", "protected-branches", BRANCH, key=key).returncode == 0
    assert_push_still_works(d, "created-by-push")


# names and paths


@pytest.mark.parametrize("name", BAD_NAMES, ids=["dotdot", "slash", "long", "upper", "unicode", "dash"])
def test_invalid_app_names_are_refused(cgit_daemon: Daemon, name: str) -> None:
    d = cgit_daemon
    src = make_repo(Path(tempfile.mkdtemp(dir=d.work, prefix="src-name-")), branch=BRANCH)
    before = files_outside_work(d)

    urls = [f"{d.ssh_url}/{name}.git"]
    if ".." not in name:  # curl resolves `..` itself before sending; raw requests below cover it
        urls.append(f"{d.http_url()}/{name}.git")
    for url in urls:
        push = d.git("push", url, BRANCH, cwd=src, check=False)
        assert push.returncode != 0 and INVALID_PATH in push.stderr, push.stderr
    clone = d.git("clone", "-q", f"{d.ssh_url}/{name}.git", "bad-name-clone", check=False)
    assert clone.returncode != 0 and INVALID_PATH in clone.stderr
    for service in ("git-upload-pack", "git-receive-pack"):
        status, _, body = raw_http(d, "GET", f"/{quote(name)}.git/info/refs?service={service}", d.token)
        assert status == 400 and INVALID_PATH.encode() in body

    create = d.ssh("apps:create", "--", name)
    assert create.returncode != 0 and INVALID_NAME in create.stderr
    with d.api() as api:
        response = api.post("apps", json={"name": name})
        assert response.status_code == 400 and INVALID_NAME in response.json()["error"]
    assert files_outside_work(d) == before


def test_dash_name_is_not_taken_for_an_option(cgit_daemon: Daemon) -> None:
    """`apps:create -x` must not act on anything, whatever argparse makes of it."""
    d = cgit_daemon
    before = files_outside_work(d)
    create = d.ssh("apps:create", "-x")
    assert create.returncode != 0 and create.stderr.startswith("error: ")
    assert files_outside_work(d) == before


def test_path_traversal_is_refused(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    new_app(d, "traversal")
    before = files_outside_work(d)

    clone = d.git("clone", "-q", f"{d.ssh_url}/../../etc.git", "etc-clone", check=False)
    assert clone.returncode != 0 and INVALID_PATH in clone.stderr
    for command in ("git-upload-pack '/../../etc'", "git-receive-pack '/../../etc.git'",
                    "git-upload-pack '/../repos/traversal.git'", "git upload-pack '../../../../etc/passwd'",
                    "git-upload-pack '/traversal.git/../../../etc'"):
        result = d.ssh(command)
        assert result.returncode != 0 and INVALID_PATH in result.stderr, command

    for method, path in (("GET", "/..%2f..%2fetc.git/info/refs?service=git-upload-pack"),
                         ("GET", "/%2e%2e/x.git/info/refs?service=git-receive-pack"),
                         ("GET", "/../x.git/info/refs?service=git-upload-pack"),
                         ("GET", "/traversal.git%2f..%2f..%2fetc/info/refs?service=git-upload-pack"),
                         ("POST", "/..%2f..%2fetc.git/git-receive-pack"),
                         ("POST", "/%2e%2e/x.git/git-upload-pack")):
        service = path.rsplit("/", 1)[1] if method == "POST" else ""
        status, _, body = raw_http(d, method, path, d.token, body=b"0000" if method == "POST" else None,
                                   content_type=f"application/x-{service}-request" if service else None)
        assert status == 400 and INVALID_PATH.encode() in body, path
    assert files_outside_work(d) == before
    assert not (d.data.parent / "etc.git").exists() and not (d.data / "x.git").exists()
    assert_push_still_works(d, "traversal")


# the SSH surface: exec of known commands only


@pytest.mark.parametrize(("template", "message"), [
    ("ls /", "unknown command 'ls'"),
    ("apps:list; touch {x}", "unknown command 'apps:list;'"),
    ("$(touch {x})", "unknown command '$(touch'"),
    ('git-upload-pack "/x.git; touch {x}"', INVALID_PATH),
    ("`touch {x}`", "unknown command '`touch'"),
    ("apps:list && touch {x}", "unrecognized arguments: && touch"),
    ("apps:list | touch {x}", "unrecognized arguments: | touch"),
    ("sh -c 'touch {x}'", "unknown command 'sh'"),
    ("git-upload-pack '/shell-meta.git' ; touch {x}", "git-upload-pack takes exactly one repository path"),
])
def test_ssh_refuses_unknown_commands_and_shell_syntax(cgit_daemon: Daemon, template: str, message: str) -> None:
    d = cgit_daemon
    if not repo(d, "shell-meta").exists():
        new_app(d, "shell-meta")
    marker = d.work / "pwned"
    result = d.ssh(template.format(x=marker))
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert not marker.exists()
    assert_push_still_works(d, "shell-meta")


def test_ssh_without_a_command_gives_no_shell(cgit_daemon: Daemon) -> None:
    result = cgit_daemon.ssh()
    assert result.returncode != 0
    assert "DevFlow provides no shell access" in result.stderr and "Hi admin!" in result.stderr


def test_pty_request_gives_no_shell(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    for command in (["apps:list"], []):
        result = subprocess.run([*d.ssh_command().split(), "-tt", "git@127.0.0.1", *command],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        # OpenSSH gives up when a PTY it asked for with -tt is refused; a refusal is what we want.
        assert result.returncode != 0
        assert "PTY allocation request failed" in result.stderr
        assert result.stdout == ""


def test_port_and_stdio_forwarding_are_refused(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    ssh = d.ssh_command().split()
    stdio = subprocess.run([*ssh, "-W", f"127.0.0.1:{d.http_port}", "git@127.0.0.1"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert stdio.returncode == 255 and "stdio forwarding failed" in stdio.stderr
    for spec in ("0:127.0.0.1:1", str(d.work / "forward.sock") + f":127.0.0.1:{d.http_port}"):
        remote = subprocess.run([*ssh, "-o", "ExitOnForwardFailure=yes", "-R", spec, "git@127.0.0.1", "whoami"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert remote.returncode == 255 and "remote port forwarding failed" in remote.stderr
    assert not (d.work / "forward.sock").exists()


def test_local_port_forward_does_not_reach_the_http_server(cgit_daemon: Daemon) -> None:
    d = cgit_daemon
    local = free_port()
    proc = subprocess.Popen([*d.ssh_command().split(), "-N", "-L", f"127.0.0.1:{local}:127.0.0.1:{d.http_port}",
                             "git@127.0.0.1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        conn = None
        for _ in range(300):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                conn = socket.create_connection(("127.0.0.1", local), timeout=30)
                break
            except OSError:
                time.sleep(0.1)
        assert conn is not None, "ssh -L never listened"
        with conn:
            conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            try:
                answer = conn.recv(4096)
            except ConnectionResetError:
                answer = b""
        # The server refused the channel, so ssh closed the local end without a byte of HTTP.
        assert answer == b""
    finally:
        # Under CI load ssh once outlived a SIGTERM by 30 s; the client only needs to be gone.
        proc.kill()
        proc.communicate(timeout=30)


def test_agent_forwarding_is_refused(cgit_daemon: Daemon) -> None:
    """OpenSSH's -A asks without wanting a reply, so ask with asyncssh and read the server's answer."""
    d = cgit_daemon

    async def ask() -> tuple[bool | None, int | None]:
        async with asyncssh.connect("127.0.0.1", d.ssh_port, username="git", client_keys=[str(d.admin_key)],
                                    known_hosts=None, agent_path=None) as conn:
            # keys:add waits for stdin, so the session is still open when the request arrives.
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, "keys:add")
            answer = await chan._make_request(b"auth-agent-req@openssh.com")
            chan.write_eof()
            await chan.wait_closed()
            return answer, chan.get_exit_status()

    answer, status = asyncio.run(asyncio.wait_for(ask(), 60))
    assert answer is False and status == 1


def test_slow_commands_do_not_stall_logins(cgit_daemon: Daemon) -> None:
    """A user's commands waiting on their stdin hold command threads, as many as that user may; the rest of
    theirs are refused at once, and another user's login and commands still go through."""
    d = cgit_daemon
    hog = d.add_user("hog")

    async def run() -> tuple[int | None, bytes, list[int | None]]:
        async with asyncssh.connect("127.0.0.1", d.ssh_port, username="git", client_keys=[str(hog)],
                                    known_hosts=None, agent_path=None) as conn:
            waiting = [await conn.create_process("keys:add", encoding=None) for _ in range(10)]
            try:
                for _ in range(200):  # the refused ones end at once; the others wait for their stdin
                    if sum(p.exit_status is not None for p in waiting) >= 6:
                        break
                    await asyncio.sleep(0.05)
                early = [p.exit_status for p in waiting]
                whoami = await asyncio.wait_for(
                    asyncio.to_thread(d.ssh, "whoami"), 60)  # a new connection: login, key lookup, command
                return whoami.returncode, whoami.stdout.encode(), early
            finally:
                for process in waiting:
                    process.stdin.write_eof()
                for process in waiting:
                    await process.wait()

    status, out, early = asyncio.run(asyncio.wait_for(run(), 120))
    assert status == 0 and b"admin" in out
    assert early.count(1) == 6 and early.count(None) == 4  # past --max-commands-per-user (4): refused at once


def test_offered_but_unproven_key_never_authenticates(cgit_daemon: Daemon) -> None:
    """GHSA-pchf-49fh-w34r: a key the server said PK_OK to must not become the session's user."""
    d = cgit_daemon
    d.add_user("mallory")
    mallory_key = d.extra_keys["mallory"]
    public_only = d.work / "admin_public_only"
    public_only.write_text(d.admin_key.with_suffix(".pub").read_text())
    public_only.chmod(0o600)
    base = ["ssh", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-p", str(d.ssh_port)]

    both = subprocess.run([*base, "-v", "-i", str(public_only), "-i", str(mallory_key), "git@127.0.0.1", "whoami"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    # The admin key really was offered and accepted in principle, and could not be proven.
    assert f"Server accepts key: {public_only}" in both.stderr
    assert both.returncode == 0, both.stderr
    assert "name: mallory" in both.stdout and "admin: False" in both.stdout
    assert "name: admin" not in both.stdout

    alone = subprocess.run([*base, "-i", str(public_only), "git@127.0.0.1", "whoami"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert alone.returncode == 255 and "Permission denied (publickey)" in alone.stderr
    assert alone.stdout == ""


# ref rules


def test_protected_branch_refuses_rewrite_and_deletion(daemon: Daemon) -> None:
    src = new_app(daemon, "protected")
    daemon.git("push", "-q", f"{daemon.ssh_url}/protected.git", f"{BRANCH}:refs/heads/release/1", cwd=src)
    assert daemon.ssh("apps:set", "protected", "protected-branches", BRANCH, "release/*").returncode == 0
    before = refs(daemon, "protected")

    daemon.git("commit", "-q", "--amend", "-m", "rewritten", cwd=src)
    for url in (f"{daemon.ssh_url}/protected.git", f"{daemon.http_url()}/protected.git"):
        push = daemon.git("push", "--force", url, BRANCH, cwd=src, check=False)
        assert push.returncode != 0
        assert f"branch {BRANCH} is protected: non-fast-forward updates are refused" in push.stderr
        for branch in (BRANCH, "release/1"):
            push = daemon.git("push", url, f":{branch}", cwd=src, check=False)
            assert push.returncode != 0
            assert f"branch {branch} is protected and cannot be deleted" in push.stderr
    assert refs(daemon, "protected") == before
    assert_push_still_works(daemon, "protected")


def test_force_push_to_an_unprotected_branch_works(daemon: Daemon) -> None:
    src = new_app(daemon, "unprotected")
    assert daemon.ssh("apps:set", "unprotected", "protected-branches", BRANCH).returncode == 0
    url = f"{daemon.ssh_url}/unprotected.git"
    daemon.git("checkout", "-q", "-b", "feature", cwd=src)
    commit(src, "feature work", allow_empty=True)
    daemon.git("push", "-q", url, "feature", cwd=src)
    daemon.git("commit", "-q", "--amend", "-m", "feature rewritten", "--allow-empty", cwd=src)
    head = daemon.git("rev-parse", "HEAD", cwd=src).stdout.strip()
    daemon.git("push", "-q", "--force", url, "feature", cwd=src)
    assert refs(daemon, "unprotected")["refs/heads/feature"] == head
    daemon.git("push", "-q", url, ":feature", cwd=src)
    assert "refs/heads/feature" not in refs(daemon, "unprotected")
    assert_push_still_works(daemon, "unprotected")


# size limits and damaged packs


@pytest.fixture(scope="module")
def limited(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A second daemon on the same backend, with a 1 MB push limit."""
    d = start_daemon(tmp_path_factory.mktemp(f"limited-{daemon.backend}"), daemon.backend,
                     extra_args=("--max-push-bytes", "1000000"))
    yield d
    stop_daemon(d)


def test_push_over_the_size_limit_is_refused(limited: Daemon) -> None:
    d = limited
    src = new_app(d, "size-limit")
    before_refs, before_objects = refs(d, "size-limit"), objects(d, "size-limit")
    (src / "big.bin").write_bytes(os.urandom(3_000_000))
    commit(src, "too big")
    for url in (f"{d.ssh_url}/size-limit.git", f"{d.http_url()}/size-limit.git"):
        push = d.git("push", url, BRANCH, cwd=src, check=False)
        assert push.returncode != 0 and "pack exceeds maximum" in push.stderr, push.stderr
        assert f"[remote rejected] {BRANCH} -> {BRANCH} (unpacker error)" in push.stderr
        assert refs(d, "size-limit") == before_refs
        assert objects(d, "size-limit") == before_objects
    assert_push_still_works(d, "size-limit")


def damaged_pack(daemon: Daemon, app: str, damage: str) -> tuple[str, str, bytes]:
    """(old, new, pack bytes): a real pack of one new commit, then cut short or with bytes flipped."""
    clone = Path(tempfile.mkdtemp(dir=daemon.work, prefix=f"pack-{app}-"))
    daemon.git("clone", "-q", f"{daemon.ssh_url}/{app}.git", str(clone))
    old = daemon.git("rev-parse", "HEAD", cwd=clone).stdout.strip()
    (clone / "payload.bin").write_bytes(os.urandom(64 * 1024))
    new = commit(clone, "evil")
    pack = subprocess.run(["git", "-C", str(clone), "pack-objects", "--stdout", "--revs"],
                          input=f"{new}\n^{old}\n".encode(), capture_output=True, check=True).stdout
    if damage == "truncated":
        return old, new, pack[: len(pack) // 2]
    flipped = bytearray(pack)
    middle = len(flipped) // 2
    for i in range(middle, middle + 16):
        flipped[i] ^= 0xFF
    return old, new, bytes(flipped)


def receive_pack_request(new: str, pack: bytes) -> bytes:
    command = f"{'0' * 40} {new} refs/heads/evil\0report-status\n".encode()
    return pkt(command) + b"0000" + pack


def assert_pack_refused(report: bytes) -> None:
    """The report-status says the unpack failed and the ref was not updated."""
    lines, _ = read_pkts(report)
    assert lines and lines[0].startswith(b"unpack ") and lines[0] != b"unpack ok\n", lines
    assert lines[1:] == [b"ng refs/heads/evil unpacker error\n"], lines


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_pack_over_ssh_is_refused(daemon: Daemon, damage: str) -> None:
    app = f"ssh-pack-{damage}"
    new_app(daemon, app)
    before_refs, before_objects = refs(daemon, app), objects(daemon, app)
    old, new, pack = damaged_pack(daemon, app, damage)

    result = subprocess.run([*daemon.ssh_command().split(), "git@127.0.0.1", f"git-receive-pack '/{app}.git'"],
                            input=receive_pack_request(new, pack), capture_output=True, timeout=120)
    advertised, report = read_pkts(result.stdout)
    assert f"{old} refs/heads/{BRANCH}".encode() in [line.split(b"\0")[0].rstrip() for line in advertised], advertised
    assert_pack_refused(report)
    assert refs(daemon, app) == before_refs  # no refs/heads/evil, the branch untouched
    assert objects(daemon, app) == before_objects
    assert_push_still_works(daemon, app)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_damaged_pack_over_http_is_refused(daemon: Daemon, damage: str) -> None:
    app = f"http-pack-{damage}"
    new_app(daemon, app)
    before_refs, before_objects = refs(daemon, app), objects(daemon, app)
    _, new, pack = damaged_pack(daemon, app, damage)

    response = httpx.post(f"{daemon.http}/{app}.git/git-receive-pack", content=receive_pack_request(new, pack),
                          headers={"Content-Type": "application/x-git-receive-pack-request"},
                          auth=("admin", daemon.token), timeout=120)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-git-receive-pack-result"
    assert_pack_refused(response.content)
    assert refs(daemon, app) == before_refs  # no refs/heads/evil, the branch untouched
    assert objects(daemon, app) == before_objects
    assert_push_still_works(daemon, app)
