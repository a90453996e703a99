"""The daemon's end of the hook socket: turns hook reports into gate decisions."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from gitd.git.push_gate import PushGate
from gitd.git.push_sessions import PushSessions
from receivers.push_events import PushRejected, RefUpdate

log = logging.getLogger(__name__)

REQUEST_LIMIT = 64 * 1024 * 1024
BUFFERED_BYTES = 1024 * 1024  # of output waiting for a slow pusher


class _StreamReply:
    """The push's output to its hook, never more than BUFFERED_BYTES held for a client that reads slowly (or
    not at all): past that, lines are dropped, and the client is told how many once it catches up."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.dropped = 0

    def say(self, line: str) -> None:
        if self.writer.transport.get_write_buffer_size() > BUFFERED_BYTES:
            self.dropped += len(line.splitlines()) or 1
            return
        if self.dropped:
            self._write(f"[{self.dropped} lines of output dropped: the push read them too slowly; the app's "
                        "`logs` have them]")
            self.dropped = 0
        for part in line.splitlines() or [""]:
            self._write(part)

    def _write(self, part: str) -> None:
        self.writer.write(json.dumps({"say": part}).encode() + b"\n")


class HookServer:
    def __init__(self, socket_path: Path, sessions: PushSessions, gate: PushGate) -> None:
        self.socket_path = socket_path
        self.sessions = sessions
        self.gate = gate
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        # A push may carry thousands of ref updates on its one request line.
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket_path), limit=REQUEST_LIMIT)
        self.socket_path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.socket_path.unlink(missing_ok=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accept, reason = False, "internal error in the DevFlow daemon"
        try:
            request = json.loads(await reader.readline())
            session = self.sessions.get(request.get("push_id", ""))
            if session is None:
                reason = "unknown push session"
            else:
                updates = [RefUpdate(ref=ref, old=old, new=new) for old, new, ref in request["updates"]]
                try:
                    await self.gate.check(
                        session, updates, list(request.get("options", [])),
                        dict(request.get("object_env", {})), _StreamReply(writer),
                    )
                    accept, reason = True, ""
                except PushRejected as exc:
                    accept, reason = False, exc.reason
                    log.info("push %s to %s refused: %s", session.id, session.app, reason)
        except Exception:
            log.exception("hook request failed")
        try:
            writer.write(json.dumps({"accept": accept, "reason": reason}).encode() + b"\n")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            log.warning("hook went away before the verdict")
