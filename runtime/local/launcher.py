"""The last step before an app's command runs (an app process, a release phase, a deploy script): the new
process enters its unit, gets its view of the files (its release at /app) and its user, and becomes the command,
so a dyno is the command's own process, its pid the one `ps` shows.

Run as `python -s -P -m runtime.local.launcher PLAN.json PARENT_PID` by a supervisor or the daemon. It is a
fresh, single-threaded process, so it may unshare its mount namespace, which a fork of a threaded process
should not. Its plan is a root-private file: the command's environment never passes through this interpreter,
whose start-up would change it (locale coercion), and no app variable (PYTHONPATH, PYTHONHOME) reaches it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
from pathlib import Path

from runtime.local.app_user import AppUser
from runtime.local.process_unit import ProcessUnit
from runtime.local.release_mount import enter

MODULE = "runtime.local.launcher"
SOURCE = Path(__file__).resolve().parents[2]  # where `runtime` is: the source tree, or site-packages
PR_SET_PDEATHSIG = 1
CANNOT_RUN = 127
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: a forked child of a threaded daemon calls it


def command(plan: Path, parent: int) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run the launcher on `plan`, for a process whose parent is `parent`.

    It needs the standard library and DevFlow's runtime only: no site-packages (-S), whose start-up costs more
    than the rest, and no directory but the one that holds `runtime`."""
    argv = [sys.executable, "-S", "-s", "-P", "-m", MODULE, str(plan), str(parent)]
    return argv, {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(SOURCE)}


def die_with_parent(parent: int) -> None:
    """SIGKILL when the parent (its thread that forked this process) dies; set after any change of user, which
    clears it. A parent that died before this line would go unnoticed, hence the check."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def _default_signals() -> None:
    """The command starts with every signal at its default and none blocked; this interpreter ignores SIGPIPE and
    SIGXFSZ, a supervisor SIGHUP, and an ignored signal stays ignored across exec."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def rlimit_bounds(rlimits: dict[str, int]) -> list[tuple[int, tuple[int, int]]]:
    """Each rlimit as (resource, (soft, hard)) at its value, within this process's own hard limit: soft and hard
    alike, so the command cannot raise it again. A process running as root may set any, before it drops them."""
    bounds = []
    for name, value in rlimits.items():
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        capped = value if hard == resource.RLIM_INFINITY else min(value, hard)
        bounds.append((kind, (capped, capped)))
    return bounds


def launch(plan: dict, parent: int) -> None:
    os.setsid()
    ProcessUnit.from_json(plan["unit"]).join()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for kind, limit in rlimit_bounds(plan.get("rlimits", {})):  # before the user changes: it cannot raise them
        resource.setrlimit(kind, limit)
    cwd = plan["cwd"]
    if plan.get("mount_at"):
        enter(cwd, Path(plan["mount_at"]))
        cwd = plan["mount_at"]
    if plan.get("user"):
        AppUser(plan["user"]["uid"], plan["user"]["gid"], "").drop_privileges()
    os.chdir(cwd)  # as the app's user: it must be able to enter its own release
    die_with_parent(parent)
    _default_signals()
    os.execve(plan["argv"][0], plan["argv"], plan["env"])


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    try:
        launch(plan, int(sys.argv[2]))
    except OSError as exc:
        print(f"devflow: cannot start {plan.get('name', 'the process')}: {exc}", file=sys.stderr, flush=True)
    return CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())
