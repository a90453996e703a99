"""HTTP tokens: random secrets shown once, stored only as a SHA-256 digest."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "dfp_"


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(30)


def digest(token: str) -> str:
    # Tokens carry 240 random bits, so a fast hash is as safe as a slow one here.
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    return token[: len(PREFIX) + 6]
