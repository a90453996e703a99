"""Where an app's builds and dependency caches live on disk, and which user they belong to.

The apps directory is reachable by the app users (each builds as its own uid); everything here that an
app's user owns is touched by root only through walks that never follow a link.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.builders import Sandbox
from runtime.local.app_trees import remove_tree
from runtime.local.app_user import nobody_uid

KEEP_BUILDS = 5
OWNER_RECORD = "owner"
"""In an app's directory, root's: the uid its builds and caches belong to."""


class AppWorkspace:
    """The methods touch the disk: async callers run them in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def build_dir(self, app: str, deployment_id: int) -> Path:
        return self.root / app / "builds" / str(deployment_id)

    def cache(self, app: str) -> Path:
        return self.root / app / "cache"

    def adopt_trees(self, app: str, user: Sandbox | None) -> None:
        """The app's builds and caches become its user's if another user made them: DevFlow ran every app as
        `nobody` before apps had uids of their own, and `--app-user` may change. A record the app cannot write
        says whose they are."""
        previous = self._recorded_owner(app)
        if user is None or previous == user.uid:
            return
        if previous is None:  # made before the record: by the one user every app ran as then
            previous = nobody_uid()
        for tree in [self.cache(app), *(self.root / app / "builds").glob("*")]:
            if tree.is_dir() and not tree.is_symlink():
                user.hand_over_tree(tree, previous)
        record = self.root / app / OWNER_RECORD
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{user.uid}\n")

    def owner_changed(self, app: str, user: Sandbox | None) -> bool:
        """The app's trees belong to another user than the one it runs as now (see `adopt_trees`)."""
        return user is not None and self._recorded_owner(app) != user.uid

    def _recorded_owner(self, app: str) -> int | None:
        try:
            return int((self.root / app / OWNER_RECORD).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def prune_builds(self, app: str, newest: int, in_use: set[str]) -> None:
        """Keep the builds of recent releases (rollback targets); never touch queued newer ones."""
        for build in (self.root / app / "builds").glob("*"):
            if build.name.isdigit() and int(build.name) < newest and str(build) not in in_use:
                remove_tree(build)

    def remove_build(self, app: str, deployment_id: int) -> None:
        remove_tree(self.build_dir(app, deployment_id))

    def remove(self, app: str) -> None:
        remove_tree(self.root / app)
