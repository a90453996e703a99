"""The few lines of a failed build step's output that say why it failed, for the push's error message.

The whole output is in the build log already; the excerpt is what a user reads first, so it keeps the lines
that explain: a Python traceback's last frame and its exception, a JavaScript exception with the frame that
threw it, npm's `npm error` lines (not its notices, warnings or the path of its own log), pip's and other
tools' `ERROR:` lines, Go compiler errors. With none of those, the last lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_LINES = 20
MAX_LINE_CHARS = 300
LAST_LINES = 8

_FRAME = re.compile(r'^\s+File "[^"]*", line \d+')
_EXCEPTION = re.compile(r"^\s*(?:Uncaught )?(?:[A-Za-z_$][\w$.]*(?:Error|Exception)|Error)(?::\s|$)")
_JS_FRAME = re.compile(r"^\s+at \S")
_TOOL_ERROR = re.compile(r"^\s*(?:error\b|fatal\b|npm err!|npm error\b|err!|yarn error\b|\[error\])", re.IGNORECASE)
_GO_ERROR = re.compile(r"^(?:\S+\.go:\d+(?::\d+)?: |go: (?!downloading |finding |extracting |upgraded |added ))")
_NOISE = re.compile(r"^\s*(?:npm (?:notice|warn)\b|npm error (?:A complete log of this run|Log files were not)|"
                    r"npm ERR! A complete log)", re.IGNORECASE)


def failure_excerpt(lines: Sequence[str]) -> list[str]:
    """The explaining lines of `lines` (a step's output, oldest first), in their order, bounded."""
    lines = [line for line in lines if line.strip()]
    picked = _python_traceback(lines)
    for index, line in enumerate(lines):
        if _NOISE.match(line):
            continue
        if _EXCEPTION.match(line) and not line.startswith(" "):
            picked.add(index)
            if index + 1 < len(lines) and _JS_FRAME.match(lines[index + 1]):
                picked.add(index + 1)  # where it was thrown
        elif _TOOL_ERROR.match(line) or _GO_ERROR.match(line):
            picked.add(index)
    chosen = [lines[i] for i in sorted(picked)] or lines[-LAST_LINES:]
    if len(chosen) > MAX_LINES:  # the first lines are the cause more often than the last
        chosen = [*chosen[: MAX_LINES - 1], f"... and {len(chosen) - MAX_LINES + 1} more lines in the build log"]
    return [line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 3] + "..." for line in chosen]


def _python_traceback(lines: list[str]) -> set[int]:
    """The last traceback's header, its last frame (file, line and source) and the exception it ended in."""
    frames = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    if not frames:
        return set()
    last = frames[-1]
    end = next((i for i in range(last + 1, len(lines)) if not lines[i].startswith(" ")), None)
    if end is None:
        return set()
    header = next((i for i in range(last, -1, -1) if lines[i].startswith("Traceback (most recent call last)")), None)
    picked = set(range(last, end + 1))  # the frame, its source line (and a SyntaxError's caret), the exception
    if header is not None:
        picked.add(header)
    return picked
