"""Reads git objects from object directories (a push's quarantine, a repository) with memory bounded
whatever their size.

dulwich inflates whole objects, and a pack holding a 500 MB zero-filled blob is 500 KB on the wire. Here
an object's size comes from its header before anything is inflated (a loose object's header, a pack
entry's header, a delta's result size from the delta's own header), blobs are inflated straight into
their file, and a delta is applied in memory only when it, its base and its result are all small. A
larger one (or a delta bomb: a few bytes of copy instructions that make gigabytes) is applied as a
stream, its base read from a temporary file, and the bytes those files take are counted against a limit.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from dulwich.object_format import SHA1
from dulwich.pack import PackIndex, apply_delta, load_pack_index

from pipeline.limits import MiB

COMMIT, TREE, BLOB, TAG = 1, 2, 3, 4
OFS_DELTA, REF_DELTA = 6, 7
T = TypeVar("T")
OBJECT_ID = re.compile(r"[0-9a-f]{40}")
LOOSE_TYPES = {b"commit": COMMIT, b"tree": TREE, b"blob": BLOB, b"tag": TAG}
CHUNK = 256 * 1024  # compressed bytes read, and inflated bytes made, per step
IN_MEMORY = 8 * MiB  # a delta applied in memory: it, its base and its result each at most this
MAX_CHAIN = 10_000  # git makes delta chains of at most 4095 (pack.depth's ceiling)
HEADER_BYTES = 64  # a pack entry's header: type and size, then a base offset or a base id
LOOSE_HEADER_BYTES = 32  # "blob 123456789\0"
PEEK = 512  # compressed bytes read, and inflated bytes made, to look at a header


class CorruptObject(Exception):
    """An object that cannot be read as what it claims to be."""


class DeltaWorkExceeded(Exception):
    """The temporary files resolving large deltas would take more than the reader may write."""


class ObjectTooLarge(Exception):
    """An object, or the work its deltas take, is past what the caller allows."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} bytes")
        self.size = size


@dataclass(frozen=True)
class _Loose:
    path: Path


@dataclass(frozen=True)
class _Packed:
    pack: _Pack
    offset: int
    kind: int  # 1-4, or a delta
    size: int  # of this entry's inflated data: a delta's is the delta's own
    data: int  # where its zlib stream starts
    base: int | str | None  # a delta's base: its offset in this pack, or its id


_Node = _Loose | _Packed


class _Pack:
    def __init__(self, idx: Path) -> None:
        self.index: PackIndex = load_pack_index(idx, SHA1)
        try:
            self.fd = os.open(idx.with_suffix(".pack"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.index.close()
            raise

    def close(self) -> None:
        self.index.close()
        os.close(self.fd)


def _inflated(fd: int, start: int, step: int = CHUNK) -> Iterator[bytes]:
    """The zlib stream at `start` of `fd`, `step` bytes read and at most `step` inflated at a time."""
    inflater = zlib.decompressobj()
    position, pending = start, b""
    while not inflater.eof:
        if not pending:
            pending = os.pread(fd, step, position)
            if not pending:
                raise CorruptObject("truncated zlib stream")
            position += len(pending)
        try:
            data = inflater.decompress(pending, step)
        except zlib.error as exc:
            raise CorruptObject(str(exc)) from None
        pending = inflater.unconsumed_tail
        if data:
            yield data


def _exactly(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """`chunks`, refused unless they add up to the `size` the header promised."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > size:
            raise CorruptObject(f"more data than the {size} bytes its header says")
        yield chunk
    if seen != size:
        raise CorruptObject(f"{seen} bytes where its header says {size}")


class _Bytes:
    """A delta's instructions, read a byte or a run at a time from its inflated chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = memoryview(b"")

    def take(self, count: int) -> bytes:
        parts = []
        while count:
            if not self.buffer:
                self.buffer = memoryview(next(self.chunks, b""))
                if not self.buffer:
                    raise CorruptObject("delta ends inside an instruction")
            part = self.buffer[:count]
            parts.append(bytes(part))
            self.buffer = self.buffer[len(part):]
            count -= len(part)
        return b"".join(parts)

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80 or shift > 63:
                return value

    def at_end(self) -> bool:
        return not self.buffer and next(self.chunks, b"") == b""


class _Content:
    """An object's bytes while a delta chain is applied: in memory when small, else in a temporary file."""

    def __init__(self, data: bytes | None = None, file: BinaryIO | None = None, size: int = 0) -> None:
        self.data, self.file, self.size = data, file, size if data is None else len(data)

    def copy(self, offset: int, size: int, out: BinaryIO) -> None:
        if self.data is not None:
            out.write(memoryview(self.data)[offset:offset + size])
            return
        assert self.file is not None
        while size:
            part = os.pread(self.file.fileno(), min(size, CHUNK), offset)
            if not part:
                raise CorruptObject("delta base shorter than its header says")
            out.write(part)
            offset += len(part)
            size -= len(part)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class ObjectReader:
    """The objects of `directories`, first found first; `scratch` takes the temporary files of large deltas,
    at most `max_work` bytes of them over the reader's life."""

    def __init__(self, directories: list[Path], scratch: Path, max_work: int) -> None:
        self.directories = [d for d in dict.fromkeys(directories) if d.is_dir()]
        self.scratch = scratch
        self.max_work = max_work
        self.work = 0
        self._packs: dict[Path, _Pack] = {}
        self._scan()

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for pack in self._packs.values():
            pack.close()
        self._packs.clear()

    def _scan(self) -> None:
        """Open the packs not yet open: a repository another push is repacking gains new ones (the old ones'
        open descriptors keep working after they are deleted)."""
        for directory in self.directories:
            for idx in sorted((directory / "pack").glob("pack-*.idx")):
                if idx not in self._packs and idx.with_suffix(".pack").is_file():
                    try:
                        self._packs[idx] = _Pack(idx)
                    except FileNotFoundError:
                        continue

    # public

    def size(self, sha: str) -> int:
        """The size of the object's content, from headers only."""
        return self._retrying(self._size, sha)

    def read(self, sha: str, kind: int, limit: int) -> bytes:
        """The whole content of an object of type `kind`, at most `limit` bytes (ObjectTooLarge past it)."""
        return self._retrying(self._read, sha, kind, limit)

    def copy(self, sha: str, out: BinaryIO) -> int:
        """Write the object's content to `out`, with memory bounded by IN_MEMORY whatever its size."""
        return self._retrying(self._copy, sha, out)

    def _retrying(self, method: Callable[..., T], *args: object) -> T:
        """A loose object (or pack) can vanish under a concurrent repack of a live repository: look again once."""
        try:
            return method(*args)
        except FileNotFoundError:
            self._scan()
            return method(*args)

    # finding objects

    def _locate(self, sha: str) -> _Node:
        if not OBJECT_ID.fullmatch(sha):
            raise CorruptObject(f"{sha[:40]!r} is not an object id")
        for attempt in range(2):
            for directory in self.directories:
                path = os.path.join(directory, sha[:2], sha[2:])
                if os.path.isfile(path):
                    return _Loose(Path(path))
            for pack in self._packs.values():
                try:
                    offset = pack.index.object_offset(sha.encode())
                except KeyError:
                    continue
                return self._entry(pack, offset)
            if attempt == 0:
                self._scan()
        raise KeyError(sha)

    def _entry(self, pack: _Pack, offset: int) -> _Packed:
        head = os.pread(pack.fd, HEADER_BYTES, offset)
        try:
            byte = head[0]
            kind, size, shift, at = (byte >> 4) & 7, byte & 0x0F, 4, 1
            while byte & 0x80:
                byte = head[at]
                size |= (byte & 0x7F) << shift
                shift, at = shift + 7, at + 1
            base: int | str | None = None
            if kind == OFS_DELTA:
                byte = head[at]
                distance, at = byte & 0x7F, at + 1
                while byte & 0x80:
                    byte = head[at]
                    distance, at = ((distance + 1) << 7) | (byte & 0x7F), at + 1
                base = offset - distance
                if not 0 < base < offset:
                    raise CorruptObject(f"delta at {offset} has its base at {base}")
            elif kind == REF_DELTA:
                base = head[at:at + 20].hex()
                at += 20
                if len(base) != 40:
                    raise IndexError
            elif kind not in (COMMIT, TREE, BLOB, TAG):
                raise CorruptObject(f"unknown object type {kind} at {offset}")
        except IndexError:
            raise CorruptObject(f"truncated object header at {offset}") from None
        return _Packed(pack, offset, kind, size, offset + at, base)

    def _chain(self, sha: str) -> list[_Node]:
        """The object and, for a delta, each base down to a whole object."""
        chain = [self._locate(sha)]
        while isinstance(node := chain[-1], _Packed) and node.kind in (OFS_DELTA, REF_DELTA):
            if len(chain) > MAX_CHAIN:
                raise CorruptObject(f"delta chain of {sha} longer than {MAX_CHAIN}")
            base = node.base
            chain.append(self._entry(node.pack, base) if isinstance(base, int) else self._locate(str(base)))
        return chain

    # headers

    @staticmethod
    def _loose_header(path: Path, chunks: Iterator[bytes]) -> tuple[int, int, bytes]:
        """A loose object's type and size, and the content inflated along with its header."""
        head = b""
        while b"\0" not in head:
            chunk = next(chunks, b"")
            if not chunk or len(head) > LOOSE_HEADER_BYTES:
                raise CorruptObject(f"loose object {path.name} has no header")
            head += chunk
        header, rest = head.split(b"\0", 1)
        name, _, size_text = header.partition(b" ")
        if name not in LOOSE_TYPES or not size_text.isdigit():
            raise CorruptObject(f"loose object {path.name} has a bad header")
        return LOOSE_TYPES[name], int(size_text), rest

    def _loose_kind_and_size(self, path: Path) -> tuple[int, int]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            kind, size, _ = self._loose_header(path, _inflated(fd, 0, PEEK))
            return kind, size
        finally:
            os.close(fd)

    def _loose_chunks(self, path: Path) -> Iterator[bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            chunks = _inflated(fd, 0)
            _, size, rest = self._loose_header(path, chunks)
            yield from _exactly(itertools.chain([rest], chunks), size)
        finally:
            os.close(fd)

    def _delta_sizes(self, node: _Packed) -> tuple[int, int]:
        """A delta's base size and result size, from the first bytes of its instructions."""
        head = _Bytes(_inflated(node.pack.fd, node.data, PEEK))
        return head.varint(), head.varint()

    def _whole_kind_and_size(self, node: _Node) -> tuple[int, int]:
        if isinstance(node, _Loose):
            return self._loose_kind_and_size(node.path)
        return node.kind, node.size

    def _size(self, sha: str) -> int:
        node = self._locate(sha)
        if isinstance(node, _Packed) and node.kind in (OFS_DELTA, REF_DELTA):
            return self._delta_sizes(node)[1]
        return self._whole_kind_and_size(node)[1]

    # content

    def _chunks(self, node: _Node) -> Iterator[bytes]:
        """A whole (not delta) object's content."""
        if isinstance(node, _Loose):
            return self._loose_chunks(node.path)
        return _exactly(_inflated(node.pack.fd, node.data), node.size)

    def _read(self, sha: str, kind: int, limit: int) -> bytes:
        chain = self._chain(sha)
        whole_kind, _ = self._whole_kind_and_size(chain[-1])
        if whole_kind != kind:
            raise CorruptObject(f"{sha} is not of the expected type")
        size = self._size(sha)
        if size > limit:
            raise ObjectTooLarge(size)
        if len(chain) == 1:
            return b"".join(self._chunks(chain[0]))
        out = tempfile.SpooledTemporaryFile(max_size=limit, dir=self.scratch)
        with out:
            self._apply_chain(chain, out)
            out.seek(0)
            return out.read()

    def _copy(self, sha: str, out: BinaryIO) -> int:
        chain = self._chain(sha)
        if len(chain) == 1:
            written = 0
            for chunk in self._chunks(chain[0]):
                out.write(chunk)
                written += len(chunk)
            return written
        return self._apply_chain(chain, out)

    def _temporary(self, size: int) -> BinaryIO:
        self.work += size
        if self.work > self.max_work:
            raise DeltaWorkExceeded
        return tempfile.TemporaryFile(dir=self.scratch)

    def _materialized(self, node: _Node) -> _Content:
        _, size = self._whole_kind_and_size(node)
        if size <= IN_MEMORY:
            return _Content(data=b"".join(self._chunks(node)))
        file = self._temporary(size)
        try:
            for chunk in self._chunks(node):
                file.write(chunk)
            file.flush()
        except BaseException:
            file.close()
            raise
        return _Content(file=file, size=size)

    def _apply_chain(self, chain: list[_Node], out: BinaryIO) -> int:
        """Apply the deltas of `chain` from its whole object up; the last result goes to `out`."""
        content = self._materialized(chain[-1])
        try:
            for node in reversed(chain[:-1]):
                assert isinstance(node, _Packed)
                base_size, size = self._delta_sizes(node)
                if base_size != content.size:
                    raise CorruptObject(f"delta at {node.offset} expects a base of {base_size} bytes")
                final = node is chain[0]
                if content.data is not None and max(node.size, size) <= IN_MEMORY:
                    delta = b"".join(_exactly(_inflated(node.pack.fd, node.data), node.size))
                    try:
                        result = b"".join(apply_delta(content.data, delta))
                    except Exception as exc:  # dulwich's ApplyDeltaError, or ValueError from its C module
                        raise CorruptObject(f"delta at {node.offset}: {exc}") from None
                    if len(result) != size:
                        raise CorruptObject(f"delta at {node.offset} makes {len(result)} bytes, not {size}")
                    if final:
                        out.write(result)
                        return size
                    content = _Content(data=result)
                    continue
                if final:
                    self._stream_delta(node, content, size, out)
                    return size
                result_file = self._temporary(size)
                try:
                    self._stream_delta(node, content, size, result_file)
                    result_file.flush()
                except BaseException:
                    result_file.close()
                    raise
                content.close()
                content = _Content(file=result_file, size=size)
            raise AssertionError("a chain ends with its delta")
        finally:
            content.close()

    def _stream_delta(self, node: _Packed, base: _Content, size: int, out: BinaryIO) -> None:
        """git's patch-delta, reading instructions and copying from the base a chunk at a time."""
        delta = _Bytes(_exactly(_inflated(node.pack.fd, node.data), node.size))
        delta.varint(), delta.varint()  # the sizes, already checked
        remaining = size
        while remaining:
            command = delta.byte()
            if command & 0x80:
                offset = sum(delta.byte() << (8 * i) for i in range(4) if command & (1 << i))
                length = sum(delta.byte() << (8 * i) for i in range(3) if command & (0x10 << i)) or 0x10000
                if offset + length > base.size or length > remaining:
                    raise CorruptObject(f"delta at {node.offset} copies past its base or its result")
                while length:  # one copy may be 16 MiB: in pieces
                    part = min(length, CHUNK)
                    base.copy(offset, part, out)
                    offset, length, remaining = offset + part, length - part, remaining - part
            elif command:
                if command > remaining:
                    raise CorruptObject(f"delta at {node.offset} inserts past its result")
                out.write(delta.take(command))
                remaining -= command
            else:
                raise CorruptObject(f"delta at {node.offset} has the reserved instruction 0")
        if not delta.at_end():
            raise CorruptObject(f"delta at {node.offset} goes on past its result")
