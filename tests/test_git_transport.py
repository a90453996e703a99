"""Clone, fetch and push with the stock git client over SSH and HTTP, on both pack backends."""

from __future__ import annotations

from conftest import Daemon, commit, make_repo


def test_push_and_clone_over_ssh_and_http(daemon: Daemon) -> None:
    src = make_repo(daemon.work / "t1", {"app.py": "print('hi')\n"})
    push = daemon.git("push", f"{daemon.ssh_url}/transport.git", "main", cwd=src)
    assert "remote: DevFlow: transport received 1 ref update(s) from admin" in push.stderr
    assert "main: new at" in push.stderr

    commit(src, "second", allow_empty=True)
    push = daemon.git("push", f"{daemon.http_url()}/transport.git", "main", cwd=src)
    assert "remote: DevFlow: transport received" in push.stderr

    head = daemon.git("rev-parse", "HEAD", cwd=src).stdout
    daemon.git("clone", "-q", f"{daemon.ssh_url}/transport.git", "c-ssh")
    daemon.git("clone", "-q", f"{daemon.http_url()}/transport.git", "c-http")
    for clone in ("c-ssh", "c-http"):
        assert daemon.git("rev-parse", "HEAD", cwd=daemon.work / clone).stdout == head
        assert (daemon.work / clone / "app.py").read_text() == "print('hi')\n"
    daemon.fsck("transport")
