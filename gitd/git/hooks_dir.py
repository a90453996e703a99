"""The hooks directory every repository uses (via core.hooksPath), written at daemon start."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from gitd.git import hook_client

HOOKS = ("pre-receive",)


def write_hooks(directory: Path) -> Path:
    """Hooks run hook_client.py with this daemon's interpreter; it needs only the standard
    library, so `-I -S` skips site-packages and saves ~50 ms per push."""
    directory.mkdir(parents=True, exist_ok=True)
    for hook in HOOKS:
        path = directory / hook
        command = shlex.join([sys.executable, "-I", "-S", hook_client.__file__, hook])
        script = f"#!/bin/sh\nexec {command}\n"
        if not path.exists() or path.read_text() != script:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(script)
            tmp.chmod(0o755)
            tmp.replace(path)
    return directory
