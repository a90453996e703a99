"""The one state database: engine creation and schema migrations (Alembic)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the SSH, HTTP and hook paths read while one of them writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine, script_location: Path = MIGRATIONS) -> None:
    """Bring one package's tables to their newest revision; safe to run at every start."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_state(url: str, *more_migrations: Path) -> sessionmaker:
    """The one engine every package shares; each package's migrations run in turn."""
    engine = make_engine(url)
    for location in (MIGRATIONS, *more_migrations):
        migrate(engine, location)
    return sessionmaker(engine, expire_on_commit=False)
