"""HTTP authentication: a token as the Basic password (git) or as a Bearer token (API)."""

from __future__ import annotations

import asyncio
import base64
import binascii

from starlette.requests import Request

from gitd.errors import Unauthorized
from gitd.identity.directory import Directory
from gitd.identity.roles import Actor

REALM = 'Basic realm="DevFlow", charset="UTF-8"'


def token_from(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            user_pass = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        # Any user name works, as with GitHub tokens: the token alone says who you are.
        return user_pass.partition(":")[2] or None
    return None


async def authenticate(request: Request, directory: Directory) -> Actor:
    token = token_from(request)
    if token is None:
        raise Unauthorized("authentication required: use an HTTP token (devflow tokens create) as the password")
    actor = await asyncio.to_thread(directory.actor_for_token, token)
    if actor is None:
        raise Unauthorized("invalid, expired or revoked token")
    return actor
