"""The store on its own: schema migrations and the counters its triggers keep."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from devserver.errors import ConfigError
from devserver.schema import SCHEMA, SCHEMA_VERSION, statements
from devserver.store import Store


def make_v1_database(path: Path) -> None:
    """A database as devserver's first schema version left it, with one event in it."""
    db = sqlite3.connect(path, isolation_level=None)
    for statement in statements(SCHEMA):
        db.execute(statement)
    db.execute("INSERT INTO events (internal_id, env, name, ts, received_at, data, sessions) "
               "VALUES ('01J00000000000000000000000', 'dev', 'app/old', 1, 1, '{}', '{}')")
    db.execute("PRAGMA user_version = 1")
    db.close()


@pytest.mark.asyncio
async def test_an_older_database_migrates_on_open_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    make_v1_database(path)
    store = Store(path)
    await store.open()
    try:
        old = await store.event("01J00000000000000000000000")
        assert old is not None
        assert old.name == "app/old"
    finally:
        await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "events_by_name" in indexes
    db.close()


@pytest.mark.asyncio
async def test_a_newer_or_foreign_database_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigError, match="newer than this devserver"):
        await Store(newer).open()

    foreign = tmp_path / "foreign.sqlite3"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE mine (x)")
    db.close()
    with pytest.raises(ConfigError, match="not a devserver database"):
        await Store(foreign).open()

    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ConfigError, match="cannot open database"):
        await Store(junk).open()
