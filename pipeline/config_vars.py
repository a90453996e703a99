"""App config vars: what `config:set` stores. Values are opaque strings, kept intact."""

from __future__ import annotations

import re

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from pipeline.errors import PipelineInputError
from pipeline.schema import ConfigVar

KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
# Set by the platform for every release; an app may not override them.
RESERVED = ("PORT", "DEVFLOW_APP", "DEVFLOW_RELEASE", "DEVFLOW_URL", "DEVFLOW_PROCESS_TYPE", "DYNO")


def check_key(key: str) -> str:
    if not KEY.fullmatch(key):
        raise PipelineInputError(
            f"invalid config key {key[:60]!r}: use letters, digits and underscores, not starting with a digit"
        )
    if key in RESERVED:
        raise PipelineInputError(f"{key} is set by DevFlow for every process and cannot be configured")
    return key


def check_value(key: str, value: str) -> str:
    if "\x00" in value:
        raise PipelineInputError(f"the value of {key} contains a NUL byte, which no environment can hold")
    return value


class ConfigVars:
    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def get_all(self, app: str) -> dict[str, str]:
        with self.sessions() as db:
            rows = db.scalars(select(ConfigVar).where(ConfigVar.app == app).order_by(ConfigVar.key))
            return {row.key: row.value for row in rows}

    def set(self, app: str, values: dict[str, str]) -> dict[str, str]:
        checked = {check_key(k): check_value(k, v) for k, v in values.items()}
        with self.sessions.begin() as db:
            for key, value in checked.items():
                db.merge(ConfigVar(app=app, key=key, value=value))
        return self.get_all(app)

    def replace(self, app: str, values: dict[str, str]) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(ConfigVar).where(ConfigVar.app == app))
            db.add_all(ConfigVar(app=app, key=k, value=v) for k, v in values.items())

    def unset(self, app: str, keys: list[str]) -> dict[str, str]:
        with self.sessions.begin() as db:
            db.execute(delete(ConfigVar).where(ConfigVar.app == app, ConfigVar.key.in_(keys)))
        return self.get_all(app)

    def forget(self, app: str) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(ConfigVar).where(ConfigVar.app == app))
