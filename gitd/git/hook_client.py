"""The repository hook: reports a push to the daemon and relays its answer.

git runs this as the pre-receive hook (see hooks_dir.py); dulwich_service.py calls
ask_gate() directly. Both speak JSON lines over the daemon's Unix socket: one request,
then any number of {"say": ...} lines and one {"accept": ..., "reason": ...}.
Kept to the standard library so the hook starts fast.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable

OBJECT_ENV = ("GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_QUARANTINE_PATH")


def ask_gate(
    socket_path: str, push_id: str, updates: list[list[str]], options: list[str],
    object_env: dict[str, str], say: Callable[[str], None],
) -> tuple[bool, str]:
    request = {"push_id": push_id, "updates": updates, "options": options, "object_env": object_env}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(socket_path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            with conn.makefile("rb") as answers:
                for line in answers:
                    answer = json.loads(line)
                    if "say" in answer:
                        say(answer["say"])
                    else:
                        return bool(answer["accept"]), answer.get("reason", "")
    except OSError as exc:
        return False, f"DevFlow daemon unreachable ({exc})"
    return False, "DevFlow daemon closed the connection before answering"


def push_options_from_env() -> list[str]:
    count = int(os.environ.get("GIT_PUSH_OPTION_COUNT", "0") or 0)
    return [os.environ.get(f"GIT_PUSH_OPTION_{i}", "") for i in range(count)]


def main() -> int:
    updates = [line.split() for line in sys.stdin.read().splitlines() if line.strip()]
    object_env = {k: os.environ[k] for k in OBJECT_ENV if k in os.environ}
    object_env["GIT_DIR"] = os.path.abspath(os.environ.get("GIT_DIR", "."))

    def say(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    accept, reason = ask_gate(
        os.environ["DEVFLOW_HOOK_SOCKET"], os.environ["DEVFLOW_PUSH_ID"],
        updates, push_options_from_env(), object_env, say,
    )
    if not accept:
        say(f"error: push refused: {reason}")
    return 0 if accept else 1


if __name__ == "__main__":
    sys.exit(main())
