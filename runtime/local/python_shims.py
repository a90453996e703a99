"""`python` and `pip` on every app process's and build's PATH, as on Heroku, where the host has none of its own.

A stock Debian host has python3 but no `python` (that is the python-is-python3 package), so `web: python
app.py` would fail. The shims live in a root-owned directory every app user can read, at the end of the PATH:
the host's own commands and an app's virtual environment (first on the PATH) win over them.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
from pathlib import Path


def install(directory: Path, search_path: str) -> Path:
    """Make `directory` hold the shims that `search_path` (the PATH as an app's user sees it) lacks: `python`, a
    link to the host's python3, and `pip`, which runs `python3 -m pip`."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.chmod(0o755)
    python3 = shutil.which("python3", path=search_path)
    for name in ("python", "pip"):
        target = directory / name
        if python3 is None or shutil.which(name, path=search_path):
            target.unlink(missing_ok=True)
            continue
        staging = directory / f".{name}.{secrets.token_hex(4)}"
        if name == "python":
            staging.symlink_to(python3)
        else:
            staging.write_text(f'#!/bin/sh\nexec {shlex.quote(python3)} -m pip "$@"\n')
            staging.chmod(0o755)
        staging.replace(target)
    return directory
