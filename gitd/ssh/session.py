"""One SSH exec request: a git pack exchange or a management command. No shell, ever."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import AsyncIterator

import asyncssh

from gitd.commands import table
from gitd.commands.command_threads import CommandThreads
from gitd.errors import DevflowError
from gitd.git.git_service import GitService
from gitd.identity.directory import Directory
from gitd.identity.roles import Actor
from pipeline.limits import Limits

log = logging.getLogger(__name__)

GIT_COMMANDS = {"git-upload-pack": "upload-pack", "git-receive-pack": "receive-pack"}
MAX_COMMAND = 64 * 1024
READ_ALL_BUFFERED = 1 << 30  # read() returns what is buffered, up to this
SLICE = 256 * 1024
CLOSE_WAIT = 10  # seconds a client may take to close a refused session


def split_git_command(argv: list[str]) -> tuple[str, str] | None:
    """('upload-pack', '/app.git') for `git-upload-pack '/app.git'` or `git upload-pack ...`."""
    if len(argv) == 3 and argv[0] == "git" and f"git-{argv[1]}" in GIT_COMMANDS:
        argv = [f"git-{argv[1]}", argv[2]]
    if argv and argv[0] in GIT_COMMANDS:
        if len(argv) != 2:
            raise DevflowError(f"{argv[0]} takes exactly one repository path")
        return GIT_COMMANDS[argv[0]], argv[1]
    return None


async def client_bytes(process: asyncssh.SSHServerProcess) -> AsyncIterator[bytes]:
    """The client's stdin, read with real back pressure.

    asyncssh reopens the whole channel window whenever it hands buffered data to the stream,
    even while it still holds more, so with small reads a fast pusher and a slower pack program
    made the daemon buffer most of a push. Here the channel stays paused while a chunk is being
    written on, and each read takes everything buffered: memory stays within a few windows.
    The chunk goes on in slices, so the pipe to the pack program never holds a copy of all of it.
    """
    channel = process.channel
    while True:
        channel.resume_reading()
        chunk = await process.stdin.read(READ_ALL_BUFFERED)
        channel.pause_reading()
        if not chunk:
            return
        for start in range(0, len(chunk), SLICE):
            yield chunk[start:start + SLICE]


async def _to(stream: asyncssh.SSHWriter, chunk: bytes) -> None:
    """Written as fast as the client reads: a client that stops reading holds the program, not memory."""
    stream.write(chunk)
    await stream.drain()


class SessionHandler:
    def __init__(self, git: GitService, directory: Directory, management_for, limits: Limits,
                 commands: CommandThreads) -> None:
        self.git = git
        self.directory = directory
        self.management_for = management_for  # Actor -> Management
        self.limits = limits
        self.commands = commands
        self._sessions: dict[asyncssh.SSHServerConnection, int] = {}  # open sessions per connection

    async def handle(self, process: asyncssh.SSHServerProcess) -> None:
        """One session at a time past the limit per connection: each may run a pack program or a command."""
        connection = process.channel.get_connection()
        if self._sessions.get(connection, 0) >= self.limits.max_ssh_sessions:
            refusal = self.limits.refuse("max_ssh_sessions", "too many sessions on one connection")
            process.stderr.write(f"error: {refusal}\n".encode())
            process.exit(1)
            return
        self._sessions[connection] = self._sessions.get(connection, 0) + 1
        try:
            await self._handle(process)
        finally:
            self._sessions[connection] -= 1
            if not self._sessions[connection]:
                del self._sessions[connection]

    async def _handle(self, process: asyncssh.SSHServerProcess) -> None:
        # Each command looks its key up again: a connection kept open (ssh ControlMaster) must not keep a
        # removed key's access, or a role its user has lost since.
        actor = await asyncio.to_thread(self.directory.actor_for_key, process.get_extra_info("devflow_key"))
        if actor is None:
            process.stderr.write(b"error: this SSH key was removed from DevFlow; reconnect with a registered key\n")
            process.exit(255)
            # Close the connection once the client has the message and the status, not over them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.channel.wait_closed(), CLOSE_WAIT)
            process.channel.get_connection().close()
            return
        try:
            status = await self._dispatch(process, actor)
        except DevflowError as exc:
            process.stderr.write(f"error: {exc.message}\n".encode())
            status = 1
        except (asyncssh.BreakReceived, asyncssh.SignalReceived, asyncssh.TerminalSizeChanged):
            status = 1
        except (BrokenPipeError, ConnectionError, asyncssh.DisconnectError):
            log.info("ssh: client %s went away", actor.name)
            return
        except Exception:
            # Only the command's name: its arguments may be config values.
            log.exception("ssh: command from %s failed: %s", actor.name, (process.command or "").split(" ", 1)[0])
            process.stderr.write(b"error: internal error in the DevFlow daemon; see its log\n")
            status = 1
        process.exit(status)

    async def _dispatch(self, process: asyncssh.SSHServerProcess, actor: Actor) -> int:
        if process.subsystem:
            raise DevflowError(f"the {process.subsystem} subsystem is not available")
        command = process.command
        if command is None:
            process.stderr.write(
                f"Hi {actor.name}! You are authenticated, but DevFlow provides no shell access.\n"
                "Run `ssh ... help` for the commands.\n".encode()
            )
            return 1
        if len(command) > MAX_COMMAND:
            raise DevflowError("command too long")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise DevflowError(f"cannot parse the command: {exc}") from None
        if not argv:
            argv = ["help"]
        git = split_git_command(argv)
        if git is not None:
            return await self._git(process, actor, *git)
        if argv[0] == "logs" and {"-f", "--follow"} & set(argv):
            return await self._follow_logs(process, actor, argv)
        return await self._management(process, actor, argv)

    async def _git(self, process: asyncssh.SSHServerProcess, actor: Actor, service: str, path: str) -> int:
        app = await self.git.authorize(actor, path, service)  # type: ignore[arg-type]
        protocol = process.env.get("GIT_PROTOCOL")

        async with self.git.exchange(
            actor, app, service, "ssh",  # type: ignore[arg-type]
            protocol=protocol, stateless=False, advertise=False, on_stderr=lambda chunk: _to(process.stderr, chunk),
        ) as pack:
            feeder = asyncio.create_task(pack.feed(client_bytes(process)))
            try:
                async for chunk in pack.output():
                    process.stdout.write(chunk)
                    await process.stdout.drain()
                return await pack.wait()
            finally:
                feeder.cancel()

    async def _follow_logs(self, process: asyncssh.SSHServerProcess, actor: Actor, argv: list[str]) -> int:
        """`logs APP -f`: the tail, then new lines as they come, until the client hangs up."""
        args = table.parser_for(table.BY_NAME["logs"]).parse_args(argv[1:])
        lines = await self.management_for(actor).follow_logs(args.app, args.tail, args.process,
                                                             stop=process.is_closing)
        async for line in lines:
            process.stdout.write(line.encode() + b"\n")
            await process.stdout.drain()
        return 0

    async def _management(self, process: asyncssh.SSHServerProcess, actor: Actor, argv: list[str]) -> int:
        loop = asyncio.get_running_loop()

        async def read_all() -> bytes:
            data = b""
            while len(data) <= MAX_COMMAND and (chunk := await process.stdin.read(MAX_COMMAND)):
                data += chunk
            if len(data) > MAX_COMMAND:
                raise DevflowError("standard input too large")
            return data

        def read_stdin() -> str:
            return asyncio.run_coroutine_threadsafe(read_all(), loop).result().decode("utf-8", "replace")

        output = await self.commands.run(actor.name, table.run, argv, self.management_for(actor), read_stdin)
        process.stdout.write(output.encode())
        return 0
