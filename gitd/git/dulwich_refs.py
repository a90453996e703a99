"""Ref updates for dulwich's receive-pack that honour the old value the client sent, as C git does.

dulwich's ReceivePackHandler ignores the False that `set_if_equals` / `remove_if_equals` return
when a ref is no longer at the client's old value, and reports "ok": of several racing pushers
all were told their push landed, and an `--atomic` push could move one ref and leave the other.
With these refs a stale update is an error ("failed to write" to the client), and an atomic push
locks every ref it names, checks them all, then writes all or none.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from dulwich.file import FileLocked
from dulwich.refs import DiskRefsContainer, locked_ref

ZERO_OID = b"0" * 40


class StaleRef(OSError):
    """An OSError, so that dulwich's handler reports the ref as not updated instead of crashing."""


class CheckedRefs:
    def __init__(self, refs: DiskRefsContainer, updates: list[tuple[bytes, bytes, bytes]], atomic: bool) -> None:
        self._refs = refs
        self._updates = updates  # (old, new, ref) as the client sent them
        self._atomic = atomic
        self._tried = False
        self._error: StaleRef | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._refs, name)

    def set_if_equals(self, name: bytes, old: bytes | None, new: bytes, *args: Any, **kwargs: Any) -> bool:
        if self._atomic:
            return self._all_or_none()
        try:
            if self._refs.set_if_equals(name, old, new, *args, **kwargs):
                return True
        except FileLocked:
            pass
        raise StaleRef(f"{name.decode()} changed during the push")

    def remove_if_equals(self, name: bytes, old: bytes | None, *args: Any, **kwargs: Any) -> bool:
        if self._atomic:
            return self._all_or_none()
        try:
            if self._refs.remove_if_equals(name, old, *args, **kwargs):
                return True
        except FileLocked:
            pass
        raise StaleRef(f"{name.decode()} changed during the push")

    def _all_or_none(self) -> bool:
        """The first update of an atomic push writes them all; each later one reports that outcome."""
        if not self._tried:
            self._tried = True
            self._error = self._write_all()
        if self._error is not None:
            raise self._error
        return True

    def _write_all(self) -> StaleRef | None:
        # Leaving a locked_ref without an exception commits its lock file, so every way out
        # short of writing all the refs raises inside the `with`: the locks are then abandoned.
        try:
            with ExitStack() as locks:
                held = []
                for old, new, ref in self._updates:
                    try:
                        held.append((locks.enter_context(locked_ref(self._refs, ref)), old, new, ref))
                    except (FileLocked, OSError) as exc:
                        raise StaleRef(f"cannot lock {ref.decode()}: {exc}") from None
                for lock, old, _, ref in held:
                    if not lock.ensure_equals(None if old == ZERO_OID else old):
                        raise StaleRef(f"{ref.decode()} changed during the push")
                for lock, _, new, _ in held:
                    if new == ZERO_OID:
                        lock.delete()
                    else:
                        lock.set(new)
        except StaleRef as exc:
            return exc
        return None
