"""Fetches a network remote (a submodule's URL) as the app's own user, and checks it out into the app's tree.

The daemon never runs git on a URL a user named, nor reads what such a fetch wrote: that repository is the
app's user's (a process of the app could change it at any moment), so git runs as that user, in the
deployment's build unit (killed whole with the build, and by the next daemon if this one dies), for the
fetch, for the listing the export plans with, and for the checkout, which waits until the build tree is the
user's too. git gets nothing of root's: no system or global config, no credentials, no terminal, HOME in the
app's space, network transports only (GIT_ALLOW_PROTOCOL, protocol.file.allow=never) and ssh in batch mode
without config. What a live process of the app may write in the repository's config cannot make git start
a command of its choosing beside the transfer (a proxy, hooks, an fsmonitor, an alternate refs command, a
background gc): command-line settings and environment variables override those keys. The caller bounds the
time (--submodule-timeout) and the repository's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.builders import Sandbox
from pipeline.limits import KiB
from pipeline.object_reader import OBJECT_ID

ALLOWED_PROTOCOLS = "https:http:ssh:git"
GIT_CONFIG = (
    "-c", "protocol.file.allow=never", "-c", "protocol.ext.allow=never", "-c", "credential.helper=",
    "-c", "core.askPass=", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
    "-c", "core.alternateRefsCommand=", "-c", "gc.auto=0", "-c", "gc.autoDetach=false",
    "-c", "maintenance.auto=false", "-c", "transfer.fsckObjects=true",
    # Blobs past this are streamed by git rather than held whole in its memory.
    "-c", "core.bigFileThreshold=8m",
)
SSH_COMMAND = "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/dev/null"
STDERR_TAIL = 4 * KiB
SHOWN_ERROR = 600
OUTPUT_STEP = 64 * KiB
GITLINK = 0o160000


class GitFailed(Exception):
    """git, run on a network URL, failed: the message is git's own (the URL is the user's, the host another)."""


@dataclass(frozen=True)
class TreeEntry:
    mode: int
    sha: str
    size: int  # a blob's; 0 for trees and gitlinks
    path: str


class RemoteFetch:
    """git in `sandbox` (the deployment's build unit, as the app's user; the daemon's own user when it is not
    root), in `scratch`, which `prepare` makes the user's."""

    def __init__(self, scratch: Path, sandbox: Sandbox | None, env: dict[str, str]) -> None:
        self.scratch = scratch
        self.sandbox = sandbox
        self.path = env.get("PATH", os.defpath)
        self.git: str | None = None
        self.env = {
            "PATH": self.path, "LANG": "C", "HOME": str(scratch), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false", "GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS, "GIT_PROTOCOL_FROM_USER": "0",
            "GIT_SSH_COMMAND": SSH_COMMAND, "GIT_SSH_VARIANT": "ssh",
            # core.gitProxy takes its first match, so a repository's own wins over `-c`; this variable wins over both.
            "GIT_PROXY_COMMAND": "",
        }

    def prepare(self) -> None:
        """Blocking: find git, make the scratch directory the app user's and private to it."""
        self.git = shutil.which("git", path=self.path)
        if self.sandbox is not None:
            self.sandbox.hand_over(self.scratch)
        else:
            self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def fetch(self, url: str, sha: str, git_dir: Path) -> None:
        """The commit `sha` of `url` into a new bare repository `git_dir`; raises GitFailed."""
        if _over_ssh(url) and self.sandbox is not None and not _has_passwd_entry(self.sandbox.uid):
            # OpenSSH will not run for a uid it cannot look up (and there would be no key to offer anyway).
            raise GitFailed("ssh needs a build user with a passwd entry and an SSH key (devflow up --app-user "
                            "NAME); give the submodule its https URL instead")
        await self._run("init", "--bare", "--quiet", str(git_dir))
        try:  # what GitHub and GitLab allow: just that commit
            await self._run("-C", str(git_dir), "fetch", "--quiet", "--no-tags", "--depth=1", "--", url, sha)
        except GitFailed:  # servers that only hand out what their refs reach
            await self._run("-C", str(git_dir), "fetch", "--quiet", "--no-tags", "--", url,
                            "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")
        try:
            await self._run("-C", str(git_dir), "cat-file", "-e", f"{sha}^{{commit}}")
        except GitFailed:
            raise GitFailed(f"it has no commit {sha[:12]}") from None

    async def listing(self, git_dir: Path, sha: str, each: Callable[[TreeEntry], None]) -> None:
        """Every entry of the commit's tree to `each`, as git lists it (which `each` may stop by raising)."""
        pending = b""

        def take(chunk: bytes) -> None:
            nonlocal pending
            *records, pending = (pending + chunk).split(b"\0")
            for record in records:
                meta, _, path = record.partition(b"\t")
                mode, _, rest = meta.partition(b" ")
                _, _, rest = rest.partition(b" ")
                object_id, _, size = rest.partition(b" ")
                if not OBJECT_ID.fullmatch(object_id.decode("ascii", "replace")):
                    raise GitFailed("git's tree listing is malformed")
                each(TreeEntry(int(mode, 8), object_id.decode(), int(size) if size.strip() != b"-" else 0,
                               path.decode("utf-8", "surrogateescape")))
            if len(pending) > OUTPUT_STEP:  # git ends a record within a path's length
                raise GitFailed("git's tree listing is malformed")

        try:
            await self._run("-C", str(git_dir), "ls-tree", "-r", "-t", "-l", "-z", "--full-tree", sha, output=take)
        except ValueError:
            raise GitFailed("git's tree listing is malformed") from None

    async def blob(self, git_dir: Path, sha: str, limit: int) -> bytes | None:
        """A blob's content, or None past `limit` bytes."""
        parts: list[bytes] = []
        size = 0

        def take(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > limit:
                raise _TooMuch
            parts.append(chunk)

        try:
            await self._run("-C", str(git_dir), "cat-file", "blob", sha, output=take)
        except _TooMuch:
            return None
        return b"".join(parts)

    async def check_out(self, git_dir: Path, sha: str, work_tree: Path) -> None:
        """The commit's files into `work_tree`, which the user owns by now; directories there stay."""
        index = {"GIT_INDEX_FILE": str(git_dir.with_suffix(".index"))}
        tree = ("--git-dir", str(git_dir), "--work-tree", str(work_tree))
        await self._run(*tree, "read-tree", sha, env=index)
        await self._run(*tree, "checkout-index", "--all", "--force", env=index)

    async def _run(self, *args: str, env: dict[str, str] | None = None,
                   output: Callable[[bytes], None] | None = None) -> None:
        if self.git is None:
            raise GitFailed("fetching it needs git installed on the build host")
        proc = await asyncio.create_subprocess_exec(
            self.git, *GIT_CONFIG, *args, cwd=self.scratch, env={**self.env, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=self.sandbox.preexec if self.sandbox is not None else None)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            _, errors = await asyncio.gather(_each_chunk(proc.stdout, output), _tail(proc.stderr))
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if code != 0:
            text = errors.decode("utf-8", "replace").replace(str(self.scratch), "...").strip()
            raise GitFailed(text[-SHOWN_ERROR:] or f"git exited with status {code}")


class _TooMuch(Exception):
    """git's output went past what the caller takes."""


def _over_ssh(url: str) -> bool:
    """ssh://, git+ssh:// and scp-like `host:path` (a colon before any slash, with no scheme)."""
    scheme, sep, _ = url.partition("://")
    if sep:
        return "ssh" in scheme.lower()
    head = url.split("/", 1)[0]
    return ":" in head


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


async def _each_chunk(stream: asyncio.StreamReader, output: Callable[[bytes], None] | None) -> None:
    while chunk := await stream.read(OUTPUT_STEP):
        if output is not None:
            output(chunk)


async def _tail(stream: asyncio.StreamReader) -> bytes:
    tail = b""
    while chunk := await stream.read(OUTPUT_STEP):
        tail = (tail + chunk)[-STDERR_TAIL:]
    return tail
