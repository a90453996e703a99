"""The hooks directory every repository uses (via core.hooksPath), written at daemon start."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

HOOKS = ("pre-receive",)


def write_hooks(directory: Path) -> Path:
    """Point the hooks at this daemon's interpreter, so they find the gitd package."""
    directory.mkdir(parents=True, exist_ok=True)
    for hook in HOOKS:
        path = directory / hook
        script = f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gitd.git.hook_client {hook}\n"
        if not path.exists() or path.read_text() != script:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(script)
            tmp.chmod(0o755)
            tmp.replace(path)
    return directory
