"""Procfile parsing with Heroku's semantics: one `type: command` line per process type."""

from __future__ import annotations

import re

from pipeline.limits import Limits

LINE = re.compile(r"^(?P<type>[A-Za-z0-9_-]+):\s*(?P<command>.*)$")


class ProcfileError(ValueError):
    """The Procfile is malformed; the message names the line so the user can fix it."""


def parse_procfile(text: str, limits: Limits) -> dict[str, str]:
    """Process type -> shell command, in file order.

    Heroku's own parser skips lines it cannot read; we refuse them instead, because a
    silently dropped `web:` line only shows up later as an app that never answers.
    """
    processes: dict[str, str] = {}
    seen_on: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = LINE.match(line)
        if match is None:
            raise ProcfileError(f"Procfile line {number}: expected 'type: command' with a type made of "
                                f"letters, digits, '-' or '_', got {_shorten(line)!r}")
        kind, command = match["type"], match["command"].strip()
        if not command:
            raise ProcfileError(f"Procfile line {number}: the {kind!r} process has no command")
        if "\x00" in command:
            raise ProcfileError(f"Procfile line {number}: the {kind!r} command holds a NUL character")
        if kind in processes:
            raise ProcfileError(f"Procfile line {number}: the {kind!r} process is already declared "
                                f"on line {seen_on[kind]}")
        processes[kind] = command
        seen_on[kind] = number
    if not processes:
        raise ProcfileError("Procfile declares no processes; add a line like 'web: <command that listens on $PORT>'")
    if len(processes) > limits.max_process_types:
        raise ProcfileError(str(limits.refuse("max_process_types", f"Procfile declares {len(processes)} process "
                                                                    "types")))
    return processes


def _shorten(line: str, limit: int = 80) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."
