"""Opening a database store (Optuna's, MLflow's) that other processes may be creating at the same moment.

Optuna and MLflow create their tables on first use. Workers started together on an empty
PostgreSQL database all see no tables and all run CREATE TABLE, and all but one die with
`UniqueViolation ... pg_type_typname_nsp_index`; on SQLite they race in MLflow's migrations.
`open_store` runs the opening under one lock per database (a PostgreSQL advisory lock, a lock
file beside a SQLite file), so the first process creates the tables and the others find them.
It also turns what goes wrong at that moment (missing driver, unreachable server, bad
credentials) into one line naming the URL with its password masked.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from research.errors import UserError
from research.store_url import parse

T = TypeVar("T")
CREATION_LOCK = 0x6D696E696C6D  # any fixed 64-bit number: the advisory lock every worker takes by name


def open_store(url: str, opener: Callable[[], T], what: str, fix: str) -> T:
    """`opener()` while no other process creates tables in this database; any failure is one line naming `what`, the URL and `fix`."""
    try:
        with creation_lock(url):
            return opener()
    except UserError:
        raise
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        store = parse(url)
        if store.password:
            reason = reason.replace(store.password, "***")
        raise UserError(f"cannot open {what} {store.masked} ({reason}); {fix}") from None


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Held by one process at a time per database: PostgreSQL's session advisory lock, or a lock file beside a SQLite file."""
    store = parse(url)
    if store.kind == "sqlite":
        db = store.path
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    if store.kind != "postgresql":
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)  # a missing driver fails here, a bad server or password on connect
    try:
        with engine.connect() as connection:  # closing the connection releases the lock
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": CREATION_LOCK})
            yield
    finally:
        engine.dispose()
