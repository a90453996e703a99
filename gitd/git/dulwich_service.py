"""`upload-pack` / `receive-pack` on stdin/stdout with dulwich: C git's stand-in.

Run as `python -m gitd.git.dulwich_service SERVICE [--stateless-rpc] [--advertise-refs] REPO`.
Pushes go through the same daemon gate as C git's pre-receive hook, and push options
are supported, so both backends behave the same for a pusher.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

from dulwich.protocol import (
    CAPABILITY_ATOMIC,
    CAPABILITY_FILTER,
    CAPABILITY_PUSH_OPTIONS,
    SIDE_BAND_CHANNEL_PROGRESS,
    ReceivableProtocol,
)
from dulwich.errors import GitProtocolError
from dulwich.repo import Repo
from dulwich.server import DictBackend, ReceivePackHandler, UploadPackHandler

from gitd.git import dulwich_shallow
from gitd.git.dulwich_refs import CheckedRefs
from gitd.git.hook_client import ask_gate

DECLINED = b"pre-receive hook declined"


class FullCloneUploadPackHandler(UploadPackHandler):
    """Does not offer `filter`: dulwich can send a filtered pack, but then refuses the fetches by
    object id with which a partial clone gets its missing blobs (checkout fails). Without the
    capability the client says "filtering not recognized by server" and makes a full clone.
    """

    def capabilities(self):
        return [cap for cap in super().capabilities() if cap != CAPABILITY_FILTER]

    def set_client_capabilities(self, caps) -> None:
        # git still names `filter` among its capabilities after that warning; dulwich would refuse it.
        super().set_client_capabilities([cap for cap in caps if not cap.startswith(CAPABILITY_FILTER)])


class GatedReceivePackHandler(ReceivePackHandler):
    max_input_size: int | None = None

    def capabilities(self):
        return [*super().capabilities(), CAPABILITY_PUSH_OPTIONS]

    def _receive_max_input_size(self) -> int | None:
        return self.max_input_size

    def _apply_pack(self, refs: list[tuple[bytes, bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
        # dulwich leaves its objects/tmp_pack_* file behind when a pack is cut short, corrupt or
        # over the size limit, so every refused push would leave up to the limit in garbage.
        # This process serves one push: the tmp_pack_* files made while it unpacks are its own.
        made: list[str] = []
        mkstemp = tempfile.mkstemp

        def recording_mkstemp(*args, **kwargs) -> tuple[int, str]:
            fd, path = mkstemp(*args, **kwargs)
            made.append(path)
            return fd, path

        tempfile.mkstemp = recording_mkstemp
        try:
            for name, status in super()._apply_pack(refs):
                yield name, status
                if name == b"unpack" and status != b"ok":
                    # Name every ref, as C git does: the client then says "unpacker error"
                    # instead of "remote failed to report status".
                    yield from ((ref, b"unpacker error") for _, _, ref in refs)
        finally:
            tempfile.mkstemp = mkstemp
            for path in made:
                # A pack that arrived whole was renamed into objects/pack/ and is gone from here.
                if os.path.basename(path).startswith("tmp_pack_"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    def _on_pre_receive(self, client_refs) -> None:
        # Called right after the command list, which is where push options follow.
        self._updates = [[old.decode(), new.decode(), ref.decode()] for old, new, ref in client_refs]
        self._options: list[str] = []
        if self.has_capability(CAPABILITY_PUSH_OPTIONS):
            while (line := self.proto.read_pkt_line()) is not None:
                self._options.append(line.rstrip(b"\n").decode())
        self._verdict: bool | None = None
        self.repo.refs = CheckedRefs(self.repo.refs, client_refs, atomic=self.has_capability(CAPABILITY_ATOMIC))

    def _say(self, text: str) -> None:
        if self.has_capability(b"side-band-64k"):
            self.proto.write_sideband(SIDE_BAND_CHANNEL_PROGRESS, text.encode() + b"\n")
        else:
            sys.stderr.write(text + "\n")

    def _on_update(self, ref_name, old_sha, new_sha) -> bytes | None:
        # The first ref decides for the whole push, with every update in view (pre-receive semantics).
        if self._verdict is None:
            accept, reason = ask_gate(
                os.environ["DEVFLOW_HOOK_SOCKET"], os.environ["DEVFLOW_PUSH_ID"],
                self._updates, self._options, {"GIT_DIR": self.repo.path}, self._say,
            )
            if not accept:
                self._say(f"error: push refused: {reason}")
            self._verdict = accept
        return None if self._verdict else DECLINED


def main() -> int:
    parser = argparse.ArgumentParser(prog="dulwich_service")
    parser.add_argument("service", choices=["upload-pack", "receive-pack"])
    parser.add_argument("--stateless-rpc", action="store_true")
    parser.add_argument("--advertise-refs", action="store_true")
    parser.add_argument("--max-input-size", type=int, default=0)
    parser.add_argument("repo")
    args = parser.parse_args()

    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()

    dulwich_shallow.install()
    proto = ReceivableProtocol(sys.stdin.buffer.read, write)
    repo = Repo(args.repo)
    backend = DictBackend({"/": repo})
    handler_cls = FullCloneUploadPackHandler if args.service == "upload-pack" else GatedReceivePackHandler
    GatedReceivePackHandler.max_input_size = args.max_input_size or None
    handler = handler_cls(backend, ["/"], proto, stateless_rpc=args.stateless_rpc, advertise_refs=args.advertise_refs)
    try:
        handler.handle()
    except GitProtocolError as exc:
        # The client hung up or said something dulwich does not take: the client's user (over
        # SSH this stderr is theirs) gets one line, not a traceback.
        sys.stderr.write(f"error: {args.service}: {exc}\n")
        return 1
    finally:
        repo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
