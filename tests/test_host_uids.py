"""Two DevFlow daemons on one host never share a uid: the host-wide record (pipeline.host_uids), the daemon's
table on top of it (pipeline.app_uids), and two real root daemons sharing one record."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pwd
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, launch, start_daemon, stop_daemon
from test_deploy import app_repo, get, push

from gitd.database import open_state
from pipeline import MIGRATIONS as PIPELINE_MIGRATIONS
from pipeline import host_uids
from pipeline.app_uids import ROUTER, AppUids, UidClash
from pipeline.host_uids import MAX_UID, HostUids, HostUidsError
from pipeline.schema import AppUid
from runtime.router.process_impl import live_routers

root_only = pytest.mark.skipif(os.getuid() != 0, reason="only a root daemon allocates uids, and the record is root's")

FAR = 3_500_000_000
"""A range no test daemon and (checked) no user of this machine uses."""
WORKERS, EACH = 4, 40


def _allocate(directory: str, worker: int, start: int, ready, results) -> None:
    record = HostUids.open(Path(directory), Path(f"/srv/daemon-{worker}"))
    ready.wait()
    results.put([(worker, record.take_next(start, f"app a{n}")) for n in range(EACH)])


@root_only
def test_daemons_allocating_at_once_from_one_base_never_get_the_same_uid(tmp_path: Path) -> None:
    assert not any(host_uids._system_id(uid) for uid in range(FAR, FAR + WORKERS * EACH))
    directory = tmp_path / "uids"
    spawn = multiprocessing.get_context("spawn")
    ready, results = spawn.Barrier(WORKERS), spawn.Queue()
    workers = [spawn.Process(target=_allocate, args=(str(directory), w, FAR, ready, results)) for w in range(WORKERS)]
    HostUids.open(directory, tmp_path).close()  # made once, not raced: the race is over the uids
    for process in workers:
        process.start()
    taken = [pair for _ in workers for pair in results.get(timeout=60)]
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    uids = [uid for _, uid in taken]
    assert sorted(uids) == list(range(FAR, FAR + WORKERS * EACH))  # each once, and none skipped
    for worker, uid in taken:  # and the record says who has it
        record = json.loads((directory / str(uid)).read_text())
        assert record["data_dir"] == f"/srv/daemon-{worker}" and record["holder"].startswith("app a")
    assert sorted(p.name for p in directory.iterdir()) == sorted(map(str, uids))  # no scratch file left


@root_only
def test_users_groups_and_user_namespace_ranges_are_skipped(tmp_path: Path, monkeypatch) -> None:
    record = HostUids.open(tmp_path / "uids", tmp_path)
    nobody = pwd.getpwnam("nobody").pw_uid
    uid = record.take_next(nobody, "app a")
    assert uid > nobody and not host_uids._system_id(uid)
    subuid = tmp_path / "subuid"
    subuid.write_text(f"alice:{FAR}:65536\nbroken line\nbob:{FAR + 65536}:10\n")
    monkeypatch.setattr(host_uids, "SUBORDINATE_IDS", (subuid,))
    assert record.take_next(FAR, "app b") == FAR + 65546


@root_only
def test_no_uid_past_the_last_one(tmp_path: Path) -> None:
    record = HostUids.open(tmp_path / "uids", tmp_path)
    assert MAX_UID == 2**32 - 3
    assert record.take_next(MAX_UID, "app a") == MAX_UID
    with pytest.raises(HostUidsError, match=f"no uid is left for app b between {MAX_UID} and {MAX_UID}"):
        record.take_next(MAX_UID, "app b")


@root_only
@pytest.mark.parametrize("make, why", [
    (lambda d: (d.parent.mkdir(), os.symlink(d.parent, d)), "is a symbolic link"),
    (lambda d: (d.mkdir(parents=True), os.chown(d, 65534, 65534)), "belongs to uid 65534"),
    (lambda d: (d.mkdir(parents=True), d.chmod(0o777)), "is writable by others"),
    (lambda d: (d.mkdir(parents=True), d.chmod(0o1777)), "is writable by others"),
    (lambda d: (d.parent.mkdir(), d.parent.chmod(0o777)), "is writable by others"),
    (lambda d: (d.parent.mkdir(), d.parent.chmod(0o770)), "is writable by others"),
    (lambda d: (d.parent.mkdir(), os.symlink("/", d.parent / "link")), "link is a symbolic link"),
])
def test_a_record_others_could_change_is_refused(tmp_path: Path, make, why: str) -> None:
    directory = tmp_path / "parent" / "uids"
    make(directory)
    given = directory.parent / "link" / "uids" if "link is" in why else directory
    with pytest.raises(HostUidsError, match=f"--uids-dir {re.escape(str(given))}: .*{why}.*must be root's alone"):
        HostUids.open(given, tmp_path)


@root_only
def test_a_missing_record_is_made_root_only_and_a_sticky_parent_will_do(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir(mode=0o1777)
    (tmp_path / "shared").chmod(0o1777)
    record = HostUids.open(tmp_path / "shared" / "a" / "uids", tmp_path)
    assert oct((tmp_path / "shared" / "a" / "uids").stat().st_mode & 0o7777) == "0o700"
    record.close()


@pytest.fixture
def tables(tmp_path: Path) -> Iterator[tuple[Path, list[AppUids]]]:
    """Two daemons' tables (data dirs a and b) over one host record."""
    directory = tmp_path / "uids"
    made = []
    for name in ("a", "b"):
        data_dir = tmp_path / name
        data_dir.mkdir()
        made.append(AppUids(open_state(f"sqlite:///{data_dir / 'state.db'}", PIPELINE_MIGRATIONS), 700_000_000,
                            HostUids.open(directory, data_dir)))
    yield directory, made
    for uids in made:
        uids.host.close()


@root_only
def test_two_tables_over_one_record_never_share_a_uid_and_never_reuse_one(tables, tmp_path: Path) -> None:
    directory, (a, b) = tables
    given = [a.router_uid(), a.uid_for("web"), b.router_uid(), b.uid_for("web"), a.uid_for("api")]
    assert len(set(given)) == 5 and min(given) >= 700_000_000
    assert a.uid_for("web") == given[1]  # an app keeps its uid
    record = json.loads((directory / str(given[3])).read_text())
    assert record["data_dir"] == str(tmp_path / "b") and record["holder"] == "app web"
    assert json.loads((directory / str(given[0])).read_text())["holder"] == "the router"

    b.forget("web")
    assert json.loads((directory / str(given[3])).read_text())["holder"] == "app web (destroyed)"
    assert b.uid_for("web") > max(given)  # a new app of the same name: a fresh uid, never one handed out before
    b.claim_recorded(reassign=False)  # its own uids, the destroyed app's included: nothing to refuse


@root_only
def test_a_table_naming_a_uid_another_daemon_holds_is_refused_or_reassigned(tables, tmp_path: Path,
                                                                            caplog) -> None:
    directory, (a, b) = tables
    taken = a.uid_for("web")
    with b.sessions.begin() as db:  # as two daemons left it before the host record existed
        db.add(AppUid(app="shop", uid=taken))
        db.add(AppUid(app=f"-retired-{taken + 1}", uid=taken + 1))
    a.uid_for("old")  # taken + 1: b's destroyed app had it too
    with pytest.raises(UidClash) as refused:
        b.claim_recorded(reassign=False)
    assert str(refused.value) == (
        f"uid {taken}, which app shop runs as, is held by app web of the DevFlow at {tmp_path / 'a'} (record "
        f"{directory / str(taken)}): whatever shares a uid can read the other's files and signal its processes. "
        "Start this daemon once with --reassign-uids to give each a uid of its own (their processes restart as it)")
    assert b.uid_for("shop") == taken  # nothing changed

    with caplog.at_level(logging.WARNING, logger="pipeline.app_uids"):
        b.claim_recorded(reassign=True)
    fresh = b.uid_for("shop")
    assert fresh > taken + 1 and json.loads((directory / str(fresh)).read_text())["data_dir"] == str(tmp_path / "b")
    assert f"app shop ran as uid {taken}, which app web of the DevFlow at {tmp_path / 'a'} holds: it runs as uid " \
           f"{fresh} from now on" in caplog.text
    assert f"uid {taken + 1} of a destroyed app is held by app old" in caplog.text
    b.claim_recorded(reassign=False)  # settled: the next start is not refused


def test_a_daemon_that_is_not_root_allocates_nothing(tmp_path: Path) -> None:
    uids = AppUids(open_state(f"sqlite:///{tmp_path / 'state.db'}", PIPELINE_MIGRATIONS), 700_000_000, None)
    uids.claim_recorded(reassign=False)
    assert uids.router_uid() is None
    assert ROUTER.startswith("-")  # never an app's name


# Two real daemons on one host record


BASE = "720000000"


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))


def app_uid(d: Daemon, app: str) -> int:
    """The uid of the app's one web process, once processes a restart replaced have drained."""
    for _ in range(300):
        processes = d.api().get(f"apps/{app}/processes").json()
        if len(processes) == 1:
            return uid_of(processes[0]["pid"])
        time.sleep(0.1)
    raise AssertionError(f"{app} still has {len(processes)} processes")


def router_uid(d: Daemon) -> int:
    routers = live_routers(d.data / "run")
    for client, _ in routers:
        client.close()
    [pid] = [client.pid for client, _ in routers]
    return uid_of(pid)


def record_of(directory: Path, uid: int) -> dict:
    return json.loads((directory / str(uid)).read_text())


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> Iterator[tuple[Daemon, Path]]:
    """A root daemon with an app, on a host record of this module's own."""
    if os.getuid() != 0:
        pytest.skip(reason="only a root daemon runs apps as uids of their own")
    if shutil.which("git") is None or shutil.which("ssh") is None:
        pytest.skip(reason="needs the C git and OpenSSH clients")
    tmp = tmp_path_factory.mktemp("host-uids")
    record = tmp / "uids"
    d = start_daemon(tmp / "first", extra_args=("--uids-dir", str(record), "--app-uid-base", BASE))
    try:
        push(d, app_repo(d, "stdlib", "web"), "web")
        yield d, record
    finally:
        stop_daemon(d)


def test_two_daemons_on_one_base_run_their_apps_and_routers_as_different_uids(first, tmp_path: Path) -> None:
    a, record = first
    b = start_daemon(tmp_path, extra_args=("--uids-dir", str(record), "--app-uid-base", BASE))
    try:
        push(b, app_repo(b, "stdlib", "web"), "web")  # the same app name, too
        assert get(a, "web").text == get(b, "web").text == "stdlib v1"
        uids = {"a web": app_uid(a, "web"), "a router": router_uid(a), "b web": app_uid(b, "web"),
                "b router": router_uid(b)}
        assert len(set(uids.values())) == 4, uids
        assert min(uids.values()) >= int(BASE)
        for holder, uid in uids.items():  # and the record says which daemon, and what of it, has each
            daemon, what = holder.split()
            assert record_of(record, uid)["data_dir"] == str((a if daemon == "a" else b).data)
            assert record_of(record, uid)["holder"] == ("app web" if what == "web" else "the router")
    finally:
        stop_daemon(b)


def test_a_daemon_whose_table_names_a_uid_another_holds_refuses_to_start(first, tmp_path: Path) -> None:
    a, record = first
    a_uids = {app_uid(a, "web"), router_uid(a)}
    # A daemon from before the host record: its table has the same uids as the first daemon's.
    c = start_daemon(tmp_path, extra_args=("--uids-dir", str(tmp_path / "its-own-record"), "--app-uid-base", BASE))
    try:
        push(c, app_repo(c, "stdlib", "shop"), "shop")
        before = {app_uid(c, "shop"), router_uid(c)}
        assert before == a_uids  # the bug, reproduced
        stop_daemon(c, stop_apps=False)

        c.extra_args = ("--apps-dir", str(c.apps_dir), "--uids-dir", str(record), "--app-uid-base", BASE)
        with pytest.raises(RuntimeError, match="devflow up exited"):
            launch(c)
        last = c.log.read_text().splitlines()[-1]
        assert last.startswith(f"devflow: uid {BASE}, which the router runs as, is held by the router of the "
                               f"DevFlow at {a.data} (record {record / BASE}), and 1 more of this daemon's uids are "
                               "held elsewhere: whatever shares a uid can read the other's files and signal its "
                               "processes. Start this daemon once with --reassign-uids")
        assert get(c, "shop").text == "stdlib v1"  # the refused start changed nothing: the app still serves

        c.extra_args = (*c.extra_args, "--reassign-uids")
        launch(c)
        assert get(c, "shop").text == "stdlib v1"
        after = {app_uid(c, "shop"), router_uid(c)}
        assert not after & a_uids and len(after) == 2  # the app restarted, and the router was replaced, as new uids
        assert {record_of(record, uid)["data_dir"] for uid in after} == {str(c.data)}
        assert {app_uid(a, "web"), router_uid(a)} == a_uids  # the first daemon's apps are left alone
        stop_daemon(c, stop_apps=False)
        c.extra_args = c.extra_args[:-1]
        launch(c)  # settled: the next start is not refused
        assert {app_uid(c, "shop"), router_uid(c)} == after
    finally:
        stop_daemon(c)
