"""A request body read within bounds: gzip inflated a window at a time, refused past a size limit.

A few MiB of gzip can hold GiBs of zeros, and inflating a received chunk whole holds all of it at once.
Here inflation stops at WINDOW bytes of output and resumes from zlib's unconsumed tail, so a body holds
no more than a window however far it inflates, and its limit stops the work early.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator

from starlette.datastructures import Headers
from starlette.types import Receive

from gitd.errors import DevflowError, InvalidInput
from pipeline.limits import KiB, Limits

WINDOW = 64 * KiB
GZIP = 16 + zlib.MAX_WBITS


class PayloadTooLarge(DevflowError):
    status = 413


class UnsupportedEncoding(DevflowError):
    status = 415


class RequestBody:
    """The body of one request; the headers alone are checked at once (encoding, declared size)."""

    def __init__(self, headers: Headers, limits: Limits, bound: str | None = None,
                 what: str = "the request body is too large") -> None:
        """`bound` names the Limits field the (inflated) body may not exceed; None: none does."""
        self.limits = limits
        self.bound = bound
        self.limit = getattr(limits, bound) if bound else 0
        self.what = what
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip"):
            raise UnsupportedEncoding(f"Content-Encoding {encoding[:40]!r} is not supported: send gzip or none")
        self.gzipped = encoding != "identity"
        declared = headers.get("content-length", "")
        if self.limit and declared.isdigit() and int(declared) > self.limit:
            raise self._too_large()

    async def chunks(self, receive: Receive) -> AsyncIterator[bytes]:
        """The body as it arrives, inflated; ends early if the client disconnects."""
        inflater = zlib.decompressobj(GZIP) if self.gzipped else None
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
            data = message.get("body", b"")
            for piece in _inflated(inflater, data) if inflater else (data,):
                size += len(piece)
                if self.limit and size > self.limit:
                    raise self._too_large()
                if piece:
                    yield piece
        if inflater is not None and not inflater.eof:
            raise InvalidInput("the gzip request body ends before its gzip stream does")

    async def read(self, receive: Receive) -> bytes:
        return b"".join([chunk async for chunk in self.chunks(receive)])

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(str(self.limits.refuse(self.bound, self.what)))


def _inflated(inflater: zlib._Decompress, data: bytes) -> Iterator[bytes]:
    """What `data` inflates to, WINDOW bytes at a time."""
    try:
        while not inflater.eof:
            out = inflater.decompress(data, WINDOW)
            if out:
                yield out
            data = inflater.unconsumed_tail
            if not data and len(out) < WINDOW:
                break
    except zlib.error as exc:
        raise InvalidInput(f"the request body is not valid gzip: {exc}") from None
    # Past the end zlib would keep whatever follows, so nothing may follow.
    if inflater.eof and (data or inflater.unused_data):
        raise InvalidInput("the request body goes on after its gzip stream ends")
