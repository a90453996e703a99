"""`scripts/bench [NAME ...] [OPTIONS]`: run every benchmark, or those named (`git` selects git_transport).

A benchmark is a module here whose name does not start with "_"; it has `main(argv) -> int` and
its own options (all take --runs), which follow the names: `scripts/bench git --runs 5`.
The exit status says whether the benchmarks ran, never how fast DevFlow was.
"""

from __future__ import annotations

import importlib
import pkgutil
import signal
import sys

import benchmarks


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))


def select(names: list[str], modules: list[str]) -> list[str] | None:
    """A name matches a module exactly or as the part before an underscore; None if one matches nothing."""
    if not names:
        return modules
    chosen: list[str] = []
    for name in names:
        matches = [m for m in modules if m == name or m.startswith(name + "_")]
        if not matches:
            return None
        chosen += [m for m in matches if m not in chosen]
    return chosen


def main(argv: list[str]) -> int:
    modules = available()
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip() + f"\n\nbenchmarks: {', '.join(modules)}; `scripts/bench NAME --help` for options")
        return 0
    names = []
    for arg in argv:
        if arg.startswith("-"):
            break
        names.append(arg)
    chosen = select(names, modules)
    if chosen is None:
        print(f"bench: unknown benchmark in {' '.join(names)}; available: {', '.join(modules)}", file=sys.stderr)
        return 2
    # A plain `kill` must stop the servers a benchmark started, too: make SIGTERM unwind like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    status = 0
    try:
        for name in chosen:
            print(f"== benchmark {name}", flush=True)
            status = max(status, importlib.import_module(f"benchmarks.{name}").main(argv[len(names):]))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
