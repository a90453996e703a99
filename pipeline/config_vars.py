"""App config vars: what `config:set` stores. Values are opaque strings, kept intact."""

from __future__ import annotations

import re
from collections.abc import Mapping

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from pipeline.errors import PipelineInputError
from pipeline.limits import MAX_ARG_STRLEN, Limits
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
    try:
        size = len(key) + 1 + len(value.encode()) + 1
    except UnicodeEncodeError:
        raise PipelineInputError(f"the value of {key} is not valid UTF-8 text") from None
    if size > MAX_ARG_STRLEN:
        raise PipelineInputError(f"{key} would take {size} bytes; one environment variable can hold at most "
                                 f"{MAX_ARG_STRLEN // 1024} KiB (Linux refuses to start a process with a longer one)")
    return value


def check_config(values: Mapping[str, str], limits: Limits) -> None:
    """A whole config as a release would run it: every process gets all of it in its environment."""
    if len(values) > limits.max_config_vars:
        raise limits.refuse("max_config_vars", f"{len(values)} config vars")
    total = sum(len(k) + len(v.encode()) + 2 for k, v in values.items())
    if total > limits.max_config_bytes:
        raise limits.refuse("max_config_bytes", f"the config vars would take {total} bytes")


class ConfigVars:
    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def get_all(self, app: str) -> dict[str, str]:
        with self.sessions() as db:
            rows = db.scalars(select(ConfigVar).where(ConfigVar.app == app).order_by(ConfigVar.key))
            return {row.key: row.value for row in rows}

    def replace(self, app: str, values: Mapping[str, str]) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(ConfigVar).where(ConfigVar.app == app))
            db.add_all(ConfigVar(app=app, key=k, value=v) for k, v in values.items())

    def forget(self, app: str) -> None:
        with self.sessions.begin() as db:
            db.execute(delete(ConfigVar).where(ConfigVar.app == app))
