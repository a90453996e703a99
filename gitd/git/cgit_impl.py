"""Pack exchange through C git's upload-pack / receive-pack, as Gitea and GitLab do."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gitd.git.pack_backend import PackLimits, Service, service_argv
from gitd.git.pack_process import clean_env


class CGitBackend:
    name = "cgit"
    protocol_v2 = True

    def __init__(self, git: str, limits: PackLimits) -> None:
        self.git = git
        self.limits = limits

    def _config(self) -> list[str]:
        settings = {
            "core.hooksPath": str(self.limits.hooks_dir),
            "receive.fsckObjects": "true",
            "receive.advertisePushOptions": "true",
            "receive.advertiseAtomic": "true",
            "uploadpack.allowFilter": "true",
            "uploadpack.allowAnySHA1InWant": "true",
            # index-pack and unpack-objects hold a blob below this whole in memory (git's default is 512m: a
            # pushed 500 MB zero blob, 500 KB on the wire, took 516 MB; at 16m they stream it in 4 MB).
            "core.bigFileThreshold": "16m",
        }
        if self.limits.max_push_bytes:
            settings["receive.maxInputSize"] = str(self.limits.max_push_bytes)
        return [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]

    def command(self, service: Service, repo: Path, *, stateless: bool, advertise: bool) -> list[str]:
        return service_argv([self.git, *self._config(), service], repo, stateless=stateless, advertise=advertise)

    async def is_ancestor(self, repo: Path, old: str, new: str, object_env: dict[str, str]) -> bool:
        env = clean_env({**object_env, "GIT_DIR": str(repo)})
        proc = await asyncio.create_subprocess_exec(
            self.git, "merge-base", "--is-ancestor", old, new, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait() == 0
