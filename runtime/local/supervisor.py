"""Supervises one app process: restarts it, timestamps its output, and outlives the daemon.

Run as `python -m runtime.local.supervisor SPEC.json`. The daemon starts one per process
(in its own session; it forks once more so the daemon is not its parent), reads
status.json to see how it fares, and sends SIGTERM to stop it. App processes therefore
keep serving while the daemon restarts; the new daemon re-adopts them from their specs.

The process runs in the instance's unit (runtime.local.process_unit), started through
runtime.local.launcher, and dies with its supervisor (PR_SET_PDEATHSIG). The supervisor is a
child subreaper: what the process daemonizes comes back to it rather than to init, so it is
reaped here and killed with the rest when the process exits. Signals are taken one at a time
from a blocked set (sigtimedwait), as init does, so no handler runs in the middle of the loop.
Where cgroups hold limits the supervisor runs in a cgroup of its own (runtime.local.unit_bounds):
its memory bounded, and the CPU that logging its process's output costs within its process's limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from runtime.local import launcher
from runtime.local.process_unit import ProcessUnit
from runtime.log_lines import MAX_LINE_BYTES, LineSplitter, prefix
from runtime.rotating_log import DEFAULT_MAX_BYTES, RotatingLog

PR_SET_CHILD_SUBREAPER = 36
WAITED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
STRAY_ROUNDS = 50  # a process that keeps forking while it is killed gets this many sweeps, 20 ms apart
STARTUP_OUTPUT_BYTES = 64 * 1024  # what a failed start shows comes first; a chatty process stops adding early


class Supervisor:
    def __init__(self, spec: dict, restarts: int = 0) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.status_path = Path(spec["status"])
        self.log = RotatingLog(Path(spec["log"]), spec.get("log_max_bytes", DEFAULT_MAX_BYTES))
        self.unit = ProcessUnit.from_json(spec["unit"])
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.pump: threading.Thread | None = None
        self.state = {"supervisor_pid": os.getpid(), "child_pid": None, "state": "starting", "restarts": restarts,
                      "last_exit": None, "started_at": None, "limits": spec.get("limits", {})}
        self.events: str | None = spec.get("events")
        self._events = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)

    def write_status(self, **changes) -> None:
        self.state.update(changes)
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.status_path)
        self._tell()

    def _tell(self) -> None:
        """The daemon hears of the change at once (runtime.local.supervisor_events); one that is down, or busy
        past its socket's queue, reads status.json when it looks."""
        if self.events:
            with contextlib.suppress(OSError):
                self._events.sendto(os.fsencode(self.status_path.parent), self.events)

    def log_line(self, text: str) -> None:
        self.log.write(f"{prefix(self.name)}{text}\n".encode())

    def _pump(self, stream: IO[bytes]) -> None:
        """The process's output into the app log, line by line. The supervisor runs as root, outside its
        process's unit, so it reads in bounded chunks and cuts endless lines into pieces: what it holds stays
        bounded whatever the process prints."""
        startup = self._startup_output()
        lines = LineSplitter()
        while chunk := os.read(stream.fileno(), MAX_LINE_BYTES):
            startup = self._log_lines(lines.feed(chunk), startup)
        startup = self._log_lines(lines.end(), startup)
        if startup is not None:
            os.close(startup)

    def _log_lines(self, lines: list[bytes], startup: int | None) -> int | None:
        """A write per line (the log rotates between two); the startup output takes lines until it is full."""
        start = prefix(self.name).encode()
        for line in lines:
            self.log.write(start + line + b"\n")
            if startup is not None:
                startup = _append_bounded(startup, line + b"\n")
        return startup

    def _startup_output(self) -> int | None:
        """The instance's startup.log, begun afresh by each start of the process (its own directory is root's)."""
        path = self.spec.get("startup_output")
        if not path:
            return None
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def _drain_output(self) -> None:
        """The child's last lines (its goodbye on SIGTERM, a crash trace) reach the log before we go on."""
        if self.pump is not None:
            self.pump.join(timeout=5)

    def start_child(self) -> None:
        argv, env = launcher.command(Path(self.spec["launch"]), os.getpid())
        try:
            self.child = subprocess.Popen(argv, cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            self.log_line(f"cannot start the process: {exc}")
            self.write_status(state="crashed", child_pid=None)
            raise SystemExit(1) from None
        self.pump = threading.Thread(target=self._pump, args=(self.child.stdout,), daemon=True)
        self.pump.start()
        self.write_status(child_pid=self.child.pid, state="running", started_at=time.time())

    def _take_restart_request(self) -> str | None:
        """The daemon asked for this exit (a failed liveness check): not a crash, so no backoff, and it does not
        count toward giving up. The file holds the reason, for the log."""
        if not self.spec.get("restart_request"):
            return None
        path = Path(self.spec["restart_request"])
        try:
            reason = path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        return reason or "no reason given"

    def _signal_child(self, sig: int) -> None:
        """The process and its process group. Its pid cannot have been reused: it is ours until reaped."""
        assert self.child is not None
        for send, target in ((os.killpg, self.child.pid), (os.kill, self.child.pid)):
            with contextlib.suppress(ProcessLookupError):
                send(target, sig)

    def _await_signal(self, timeout: float | None) -> None:
        """Until a signal comes (or `timeout` passes); SIGTERM and SIGINT mean stop."""
        info = signal.sigwaitinfo(WAITED) if timeout is None else signal.sigtimedwait(WAITED, max(timeout, 0))
        if info is not None and info.si_signo != signal.SIGCHLD:
            self.stopping = True

    def _reap(self) -> int | None:
        """Collect every child that exited; the process's exit status if it did (the orphans adopted as subreaper
        are only reaped)."""
        code = None
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                return code
            if info is None:
                return code
            if self.child is not None and info.si_pid == self.child.pid:
                code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                self.child.returncode = code

    def _until_exit(self) -> int:
        """The process's exit status; once asked to stop: SIGTERM, and SIGKILL after `stop_timeout`."""
        stop_timeout = self.spec.get("stop_timeout", 10)
        deadline: float | None = None
        while (code := self._reap()) is None:
            if self.stopping and deadline is None:
                self._signal_child(signal.SIGTERM)
                deadline = time.monotonic() + stop_timeout
            if deadline is not None and time.monotonic() >= deadline:
                self.log_line(f"did not stop within {stop_timeout}s of SIGTERM; sending SIGKILL")
                self._signal_child(signal.SIGKILL)
                deadline = float("inf")
            self._await_signal(None if deadline in (None, float("inf")) else deadline - time.monotonic())
        return code

    def _end_unit(self) -> None:
        """What the process left is killed: its unit, then whatever came back to this subreaper (what escaped a
        process group when there are no cgroups)."""
        self.unit.kill()
        for _ in range(STRAY_ROUNDS):
            self._reap()
            strays = _children()
            if not strays:
                return
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        self.log_line(f"processes {_children()} kept coming back after SIGKILL")

    def _pause(self, seconds: float) -> None:
        """Sleep between restarts; a stop request ends it."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self._await_signal(left)
            self._reap()

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)  # before any thread starts: they inherit the mask
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        policy = self.spec.get("restart", {})
        fast_seconds = policy.get("fast_seconds", 10)
        give_up_after = policy.get("give_up_after", 5)
        fast_crashes = 0
        self.start_child()
        while True:
            code = self._until_exit()
            if not self.stopping:  # first of all: the router stops sending it requests, its port being free
                self.write_status(state="restarting", child_pid=None)
            # What the command started outlives it (a server's workers, a daemonized helper): gone with it, or it
            # keeps the port, and the restarted process cannot bind.
            self._end_unit()
            self._drain_output()
            if self.stopping:
                break
            ran = time.time() - (self.state["started_at"] or time.time())
            if (request := self._take_restart_request()) is not None:
                self.log_line(f"process exited with status {code} after {ran:.1f}s; restarting it as asked: {request}")
                self.write_status(state="restarting", last_exit=code, child_pid=None,
                                  restarts=self.state["restarts"] + 1)
                self.start_child()
                continue
            fast_crashes = fast_crashes + 1 if ran < fast_seconds else 0
            self.log_line(f"process exited with status {code} after {ran:.1f}s")
            if fast_crashes >= give_up_after:
                self.log_line(f"crashed {fast_crashes} times within {fast_seconds}s of starting; giving up")
                self.write_status(state="crashed", last_exit=code, child_pid=None)
                return 1
            delay = min(30.0, 0.5 * 2 ** max(fast_crashes - 1, 0))
            self.write_status(state="restarting", last_exit=code, child_pid=None, restarts=self.state["restarts"] + 1)
            self._pause(delay)
            if self.stopping:
                break
            self.start_child()
        self.write_status(state="stopped", child_pid=None)
        return 0


def _append_bounded(fd: int, line: bytes) -> int | None:
    """Add `line` to the startup output; past its bound the file is closed and kept as it is."""
    if os.fstat(fd).st_size + len(line) > STARTUP_OUTPUT_BYTES:
        os.close(fd)
        return None
    os.write(fd, line)
    return fd


def _children() -> list[int]:
    """This process's children, zombies included."""
    found: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            found += [int(pid) for pid in Path(f"/proc/self/task/{task}/children").read_text().split()]
    return found


def _previous_restarts(status: Path) -> int:
    """Started again for an instance whose supervisor died (runtime.supervisor_watch): its count goes on."""
    try:
        return json.loads(status.read_text()).get("restarts", 0) + 1
    except (OSError, ValueError):
        return 0


def main() -> int:
    """Fork away from the launcher (the daemon reaps only that), then report ready once status.json exists."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    ready_read, ready_write = os.pipe()
    if os.fork() > 0:
        os.close(ready_write)
        return 0 if os.read(ready_read, 1) == b"1" else 1
    os.close(ready_read)
    # Detached now: nothing may keep the launcher's pipes open, and our own errors go to the app log.
    log_fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    null_fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(null_fd, 0)
    os.dup2(null_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    if spec.get("supervisor_unit"):  # its own cgroup, made by the daemon (runtime.local.unit_bounds)
        try:
            ProcessUnit.from_json(spec["supervisor_unit"]).enter_cgroups()
        except OSError as exc:
            print(f"devflow: the supervisor of {spec['name']} runs outside its cgroup: {exc}", file=sys.stderr)
    supervisor = Supervisor(spec, _previous_restarts(Path(spec["status"])))
    supervisor.write_status()
    os.write(ready_write, b"1")
    os.close(ready_write)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
