"""The app log's line format, `TIMESTAMP SOURCE | TEXT`, written by the daemon and by every supervisor.

Its own small module so the supervisors, started at each deploy, import it without asyncio.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

LINE = re.compile(r"^(\S+) (\S+) \| ")


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def prefix(source: str) -> str:
    """What goes before the text: the time and the line's source (`build`, `web.1`, ...)."""
    return f"{timestamp()} {source} | "
