"""A push's output on its way to the hook: a pusher that reads slowly (or never) costs lines, not memory."""

from __future__ import annotations

import asyncio
import json
import socket

from gitd.git.hook_server import BUFFERED_BYTES, _StreamReply


def test_output_to_a_reader_that_does_not_read_is_bounded_and_the_loss_is_told() -> None:
    async def scenario() -> tuple[int, int, list[str]]:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        _, writer = await asyncio.open_connection(sock=ours)
        reply = _StreamReply(writer)
        line = "x" * 1000
        for _ in range(20_000):  # 20 MB of output while nobody reads
            reply.say(line)
        held, dropped = writer.transport.get_write_buffer_size(), reply.dropped
        received = bytearray()
        loop = asyncio.get_running_loop()
        while True:  # the reader catches up...
            try:
                received += await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 1)
            except TimeoutError:
                break
        reply.say("after")  # ...and the next line comes after a word on what it missed
        await writer.drain()
        received += await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 5)
        writer.close()
        theirs.close()
        return held, dropped, [json.loads(raw)["say"] for raw in received.splitlines()]

    held, dropped, said = asyncio.run(scenario())
    assert held <= BUFFERED_BYTES + 2000
    assert dropped > 10_000
    assert said[-2] == f"[{dropped} lines of output dropped: the push read them too slowly; the app's `logs` have them]"
    assert said[-1] == "after"
