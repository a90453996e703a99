"""Bare repositories on disk, one per app, created and read with dulwich."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dulwich.repo import Repo

log = logging.getLogger(__name__)

DEFAULT_BRANCH = b"refs/heads/main"


class Repositories:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, app: str) -> Path:
        # `app` is always a validated app name, so this cannot leave the root.
        return self.root / f"{app}.git"

    def exists(self, app: str) -> bool:
        return (self.path(app) / "HEAD").is_file()

    def create(self, app: str) -> Path:
        path = self.path(app)
        self.root.mkdir(parents=True, exist_ok=True)
        repo = Repo.init_bare(path, mkdir=True)
        repo.refs.set_symbolic_ref(b"HEAD", DEFAULT_BRANCH)
        repo.close()
        return path

    def destroy(self, app: str) -> None:
        path = self.path(app)
        if path.exists():
            shutil.rmtree(path)

    def point_head_at_existing_branch(self, app: str) -> None:
        """After a push, make HEAD name a branch that exists, so clones check something out.

        Like GitHub, a branch pushed to an empty repository becomes its default: main, else master,
        else (several branches in one push) the alphabetically first.
        """
        with Repo(str(self.path(app))) as repo:
            refs = repo.refs
            target = refs.get_symrefs().get(b"HEAD", DEFAULT_BRANCH)
            if target in refs:
                return
            branches = sorted(r for r in refs.allkeys() if r.startswith(b"refs/heads/"))
            if not branches:
                return
            choice = DEFAULT_BRANCH if DEFAULT_BRANCH in branches else (
                b"refs/heads/master" if b"refs/heads/master" in branches else branches[0]
            )
            refs.set_symbolic_ref(b"HEAD", choice)
            log.info("HEAD of %s now points at %s", app, choice.decode())
