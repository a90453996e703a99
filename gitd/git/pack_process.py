"""Runs a pack program (C git or dulwich_service) between a client stream and its output."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# Passed through to pack programs; everything else in the daemon's environment stays out.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT")


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    # The user's ~/.gitconfig must not change how the server behaves.
    env["GIT_CONFIG_GLOBAL"] = os.devnull
    env["HOME"] = os.devnull
    env.update(extra)
    return env


class PackProcess:
    def __init__(self, proc: asyncio.subprocess.Process, on_stderr: Callable[[bytes], Awaitable[None]]) -> None:
        self.proc = proc
        self._stderr_task = asyncio.create_task(self._pump_stderr(on_stderr))

    @classmethod
    async def start(cls, argv: list[str], env: dict[str, str],
                    on_stderr: Callable[[bytes], Awaitable[None]]) -> PackProcess:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=clean_env(env), limit=CHUNK,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, on_stderr)

    async def _pump_stderr(self, on_stderr: Callable[[bytes], Awaitable[None]]) -> None:
        """`on_stderr` waits while its reader is behind: the program then waits on its full pipe, and nothing
        piles up in the daemon (a push's hook output is its deploy's, as long as the deploy chooses)."""
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(CHUNK):
            await on_stderr(chunk)

    async def feed(self, chunks: AsyncIterator[bytes]) -> None:
        """Copy the client's bytes to the program, then close its stdin."""
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            async for chunk in chunks:
                stdin.write(chunk)
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.debug("pack program stopped reading its input")
        except RuntimeError:
            if not stdin.is_closing():
                raise
            log.debug("pack program exited before reading all its input")  # uvloop's word for a closed pipe
        finally:
            if not stdin.is_closing():
                stdin.close()

    async def output(self) -> AsyncIterator[bytes]:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(CHUNK):
            yield chunk

    async def wait(self) -> int:
        code = await self.proc.wait()
        await self._stderr_task
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
