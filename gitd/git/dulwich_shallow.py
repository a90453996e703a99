"""dulwich's upload-pack, taught the plain fetch into a shallow clone (how CI jobs `git pull`).

Such a client sends its `shallow` lines and then a flush, with no `deepen`; dulwich insists on a
`deepen` there and fails. C git's upload-pack treats the client's shallow commits as the ends of
history and sends no shallow-update section, since the client reads one only when it deepens.
"""

from __future__ import annotations

from collections.abc import Sequence

from dulwich import server
from dulwich.protocol import COMMAND_DEEPEN, COMMAND_SHALLOW
from dulwich.server import find_shallow


class ShallowFetchGraphWalker(server._ProtocolGraphWalker):
    def _handle_shallow_request(self, wants: Sequence[bytes]) -> None:
        depth = None
        while True:
            command, value = self.read_proto_line((COMMAND_DEEPEN, COMMAND_SHALLOW, None))
            if command == COMMAND_SHALLOW:
                self.client_shallow.add(value)
                continue
            if command == COMMAND_DEEPEN:
                depth = value
                self.read_proto_line((None,))  # the flush after it
            break
        if depth is None:
            self.shallow.update(self.client_shallow)  # walk no further than the client has
            return
        shallow, not_shallow = find_shallow(self.store, wants, depth)
        self.shallow.update(shallow - not_shallow)
        self.unshallow = not_shallow & self.client_shallow
        self.update_shallow(self.shallow - self.client_shallow, self.unshallow)


def install() -> None:
    """UploadPackHandler.handle builds its walker from this module-level name, with no other hook."""
    server._ProtocolGraphWalker = ShallowFetchGraphWalker
