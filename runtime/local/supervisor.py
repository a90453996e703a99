"""Supervises one app process: restarts it, timestamps its output, and outlives the daemon.

Run as `python -m runtime.local.supervisor SPEC.json`. The daemon starts one per process
(in its own session; it forks once more so the daemon is not its parent), reads
status.json to see how it fares, and sends SIGTERM to stop it. App processes therefore
keep serving while the daemon restarts; the new daemon re-adopts them from their specs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime.local.app_user import AppUser
from runtime.log_lines import prefix
from runtime.rotating_log import DEFAULT_MAX_BYTES, RotatingLog

PR_SET_PDEATHSIG = 1
STARTUP_OUTPUT_BYTES = 64 * 1024  # what a failed start shows comes first; a chatty process stops adding early
LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


class Supervisor:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.status_path = Path(spec["status"])
        self.log = RotatingLog(Path(spec["log"]), spec.get("log_max_bytes", DEFAULT_MAX_BYTES))
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.pump: threading.Thread | None = None
        self.state = {"supervisor_pid": os.getpid(), "child_pid": None, "state": "starting", "restarts": 0,
                      "last_exit": None, "started_at": None, "limits": spec.get("limits", {})}

    def write_status(self, **changes) -> None:
        self.state.update(changes)
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.status_path)

    def log_line(self, text: str) -> None:
        self.log.write(f"{prefix(self.name)}{text}\n".encode())

    def _pump(self, stream) -> None:
        startup = self._startup_output()
        for raw in iter(stream.readline, b""):
            line = raw.rstrip(b"\n") + b"\n"
            self.log.write(prefix(self.name).encode() + line)
            if startup is not None:
                startup = _append_bounded(startup, line)
        if startup is not None:
            os.close(startup)

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

    def _preexec(self) -> None:
        os.setpgrp()
        for procs in self.spec.get("cgroup_procs", []):
            with open(procs, "w") as cgroup:
                cgroup.write(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for name, value in self.spec.get("rlimits", {}).items():
            kind = getattr(resource, name)
            _, hard = resource.getrlimit(kind)
            soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(kind, (soft, hard))
        if self.spec.get("user"):
            AppUser(self.spec["user"]["uid"], self.spec["user"]["gid"], "").drop_privileges()
        # After the user change, which clears it: if the supervisor is killed, the process follows.
        if LIBC is not None:
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def start_child(self) -> None:
        try:
            self.child = subprocess.Popen(
                ["/bin/sh", "-c", self.spec["command"]], cwd=self.spec["cwd"], env=self.spec["env"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=self._preexec,
            )
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

    def stop(self, *_: object) -> None:
        self.stopping = True
        if self.child and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        policy = self.spec.get("restart", {})
        fast_seconds = policy.get("fast_seconds", 10)
        give_up_after = policy.get("give_up_after", 5)
        stop_timeout = self.spec.get("stop_timeout", 10)
        fast_crashes = 0
        self.start_child()
        while True:
            assert self.child is not None
            code = self.child.wait()
            if not self.stopping:
                # What the command started outlives it (sh -c forks the app; a server's workers): gone with it,
                # or it keeps the port, and the restarted process cannot bind.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.child.pid, signal.SIGKILL)
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
            deadline = time.time() + delay
            while time.time() < deadline and not self.stopping:
                time.sleep(0.1)
            if self.stopping:
                break
            self.start_child()
        if self.child and self.child.poll() is None:
            try:
                self.child.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                self.log_line(f"did not stop within {stop_timeout}s of SIGTERM; sending SIGKILL")
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait()
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)  # leftovers of the process group
        self._drain_output()
        self.write_status(state="stopped", child_pid=None)
        return 0


def _append_bounded(fd: int, line: bytes) -> int | None:
    """Add `line` to the startup output; past its bound the file is closed and kept as it is."""
    if os.fstat(fd).st_size + len(line) > STARTUP_OUTPUT_BYTES:
        os.close(fd)
        return None
    os.write(fd, line)
    return fd


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
    supervisor = Supervisor(spec)
    supervisor.write_status()
    os.write(ready_write, b"1")
    os.close(ready_write)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
