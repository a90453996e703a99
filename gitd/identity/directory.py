"""The user directory: users, their SSH keys and tokens, and who a key or token belongs to."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import asyncssh
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from gitd.errors import Conflict, InvalidInput, NotFound
from gitd.identity import tokens
from gitd.identity.public_keys import fingerprint_of, parse_public_key
from gitd.identity.roles import Actor
from gitd.schema import SSHKey, Token, User
from pipeline.limits import Limits

USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def check_user_name(name: str) -> str:
    if not USER_NAME.fullmatch(name or ""):
        raise InvalidInput(
            f"invalid user name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def actor_of(user: User, via: str) -> Actor:
    return Actor(user.id, user.name, user.is_admin, user.is_admin or user.can_create_apps, via)


def key_record(key: SSHKey) -> dict:
    return {
        "fingerprint": key.fingerprint,
        "user": key.user.name,
        "type": key.algorithm,
        "comment": key.comment,
        "created_at": key.created_at.isoformat(timespec="seconds"),
    }


def token_record(token: Token) -> dict:
    state = "revoked" if token.revoked_at else "expired" if token.expires_at and token.expires_at <= now() else "active"
    return {
        "id": token.id,
        "user": token.user.name,
        "prefix": token.prefix,
        "description": token.description,
        "state": state,
        "created_at": token.created_at.isoformat(timespec="seconds"),
        "expires_at": token.expires_at.isoformat(timespec="seconds") if token.expires_at else None,
        "last_used_at": token.last_used_at.isoformat(timespec="seconds") if token.last_used_at else None,
    }


def user_record(user: User) -> dict:
    return {"name": user.name, "admin": user.is_admin, "create_apps": user.is_admin or user.can_create_apps}


class Directory:
    def __init__(self, sessions: sessionmaker, limits: Limits) -> None:
        self.sessions = sessions
        self.limits = limits

    # users

    def _user(self, db: Session, name: str) -> User:
        user = db.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"no user named {name!r}")
        return user

    def _ensure_user(self, db: Session, name: str, admin: bool) -> User:
        user = db.scalar(select(User).where(User.name == check_user_name(name)))
        if user is None:
            user = User(name=name, is_admin=admin, can_create_apps=True, created_at=now())
            db.add(user)
            db.flush()
        elif admin and not user.is_admin:
            user.is_admin = True
        return user

    def user_id(self, name: str) -> int:
        with self.sessions() as db:
            return self._user(db, name).id

    def list_users(self) -> list[dict]:
        with self.sessions() as db:
            return [user_record(u) for u in db.scalars(select(User).order_by(User.name))]

    def set_user_flag(self, name: str, flag: str, value: bool) -> dict:
        with self.sessions.begin() as db:
            user = self._user(db, name)
            if flag == "admin":
                user.is_admin = value
            elif flag == "create-apps":
                user.can_create_apps = value
            else:
                raise InvalidInput(f"unknown user flag {flag!r}; use admin or create-apps")
            return user_record(user)

    def user(self, name: str) -> dict:
        with self.sessions() as db:
            return user_record(self._user(db, name))

    def actor(self, name: str, via: str = "local") -> Actor:
        with self.sessions() as db:
            return actor_of(self._user(db, name), via)

    # SSH keys

    def add_key(self, user_name: str, key_text: str, admin: bool = False, create_user: bool = True) -> dict:
        parsed = parse_public_key(key_text)
        with self.sessions.begin() as db:
            existing = db.scalar(select(SSHKey).where(SSHKey.fingerprint == parsed.fingerprint))
            if existing is not None:
                raise Conflict(f"key {parsed.fingerprint} is already registered to user {existing.user.name}")
            if create_user:
                user = self._ensure_user(db, user_name, admin)
            else:
                user = self._user(db, user_name)
            count = db.scalar(select(func.count()).select_from(SSHKey).where(SSHKey.user_id == user.id))
            if count >= self.limits.max_keys_per_user:
                raise InvalidInput(str(self.limits.refuse(
                    "max_keys_per_user", f"user {user.name} has {count} SSH keys already; remove one first")))
            key = SSHKey(
                user=user,
                fingerprint=parsed.fingerprint,
                algorithm=parsed.algorithm,
                public_key=parsed.openssh,
                comment=parsed.comment,
                created_at=now(),
            )
            db.add(key)
            db.flush()
            return key_record(key)

    def list_keys(self, user_name: str | None = None) -> list[dict]:
        with self.sessions() as db:
            query = select(SSHKey).join(User).order_by(User.name, SSHKey.id)
            if user_name is not None:
                query = query.where(User.name == user_name)
            return [key_record(k) for k in db.scalars(query)]

    def key_owner(self, fingerprint: str) -> str:
        with self.sessions() as db:
            key = db.scalar(select(SSHKey).where(SSHKey.fingerprint == fingerprint))
            if key is None:
                raise NotFound(f"no key with fingerprint {fingerprint}")
            return key.user.name

    def remove_key(self, fingerprint: str) -> dict:
        with self.sessions.begin() as db:
            key = db.scalar(select(SSHKey).where(SSHKey.fingerprint == fingerprint))
            if key is None:
                raise NotFound(f"no key with fingerprint {fingerprint}")
            record = key_record(key)
            db.delete(key)
            return record

    def actor_for_key(self, key: asyncssh.SSHKey) -> Actor | None:
        fingerprint = fingerprint_of(key)
        with self.sessions() as db:
            row = db.scalar(select(SSHKey).where(SSHKey.fingerprint == fingerprint))
            # The fingerprint is a hash of the key blob; compare the blob too.
            if row is None or row.public_key.split()[1] != key.export_public_key("openssh").decode().split()[1]:
                return None
            return actor_of(row.user, f"ssh-key {fingerprint}")

    # tokens

    def create_token(
        self, user_name: str, description: str = "", expires_at: datetime | None = None, create_user: bool = False
    ) -> dict:
        if expires_at is not None and expires_at <= now():
            raise InvalidInput("the expiry must be in the future")
        secret = tokens.new_token()
        with self.sessions.begin() as db:
            user = self._ensure_user(db, user_name, False) if create_user else self._user(db, user_name)
            active = db.scalar(select(func.count()).select_from(Token).where(
                Token.user_id == user.id, Token.revoked_at.is_(None),
                or_(Token.expires_at.is_(None), Token.expires_at > now())))
            if active >= self.limits.max_tokens_per_user:
                raise InvalidInput(str(self.limits.refuse(
                    "max_tokens_per_user", f"user {user.name} has {active} active tokens already; revoke one first")))
            token = Token(
                user=user,
                digest=tokens.digest(secret),
                prefix=tokens.display_prefix(secret),
                description=description[:256],
                created_at=now(),
                expires_at=expires_at,
            )
            db.add(token)
            db.flush()
            return {**token_record(token), "token": secret}

    def list_tokens(self, user_name: str | None = None) -> list[dict]:
        with self.sessions() as db:
            query = select(Token).join(User).order_by(User.name, Token.id)
            if user_name is not None:
                query = query.where(User.name == user_name)
            return [token_record(t) for t in db.scalars(query)]

    def token_owner(self, token_id: int) -> str:
        with self.sessions() as db:
            token = db.get(Token, token_id)
            if token is None:
                raise NotFound(f"no token with id {token_id}")
            return token.user.name

    def revoke_token(self, token_id: int) -> dict:
        with self.sessions.begin() as db:
            token = db.get(Token, token_id)
            if token is None:
                raise NotFound(f"no token with id {token_id}")
            if token.revoked_at is None:
                token.revoked_at = now()
            return token_record(token)

    def actor_for_token(self, secret: str) -> Actor | None:
        if not secret.startswith(tokens.PREFIX):
            return None
        with self.sessions.begin() as db:
            token = db.scalar(select(Token).where(Token.digest == tokens.digest(secret)))
            if token is None or token.revoked_at is not None:
                return None
            moment = now()
            if token.expires_at is not None and token.expires_at <= moment:
                return None
            token.last_used_at = moment
            return actor_of(token.user, f"token {token.prefix}")
