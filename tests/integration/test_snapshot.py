"""Snapshots against the real PostgreSQL, into a local directory and a real S3 server, and
restore_plain back: the rows that come back are the rows that went in."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from backstop_core.recovery.restore_plain import RestoreError, restore_plain, restored_name
from backstop_core.s3local import LocalS3Info
from backstop_core.sidecar.objectstore import (
    LocalObjectStore,
    ObjectStore,
    ObjectStoreError,
    open_object_store,
)
from backstop_core.sidecar.snapshot import (
    Manifest,
    SnapshotError,
    SnapshotProgress,
    list_snapshots,
    load_manifest,
    snapshot_time,
    table_checksum,
    take_snapshot,
    verify_snapshot,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        yield open_object_store(f"file://{tmp_path / 'store'}")
        return
    s3: LocalS3Info = request.getfixturevalue("s3")
    store = open_object_store(
        f"s3://{s3.bucket}/backstop-{uuid.uuid4().hex[:8]}?endpoint={s3.endpoint_url}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
    )
    yield store
    await store.delete_prefix("")


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_db)
    yield conn
    await conn.close()


async def rows_as_text(conn: asyncpg.Connection, table: str, order: str = "1") -> list[str]:
    """Every row in its text form, ordered: what a person comparing two tables reads."""
    return [r[0] for r in await conn.fetch(f"SELECT (t.*)::text FROM {table} t ORDER BY {order}")]


ORDERS = """
CREATE TYPE status AS ENUM ('new', 'paid', 'shipped');
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer int REFERENCES customers (id),
    placed timestamptz NOT NULL DEFAULT now(),
    amount numeric(12, 2) CHECK (amount >= 0),
    status status NOT NULL DEFAULT 'new',
    note text,
    tags text[],
    UNIQUE (customer, placed)
);
CREATE INDEX orders_note ON orders (lower(note)) WHERE note IS NOT NULL;
INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 50) g;
INSERT INTO orders (customer, placed, amount, status, note, tags)
SELECT 1 + g % 50, timestamptz '2024-01-01 00:00+00' + g * interval '1 minute', g * 1.25,
       (ARRAY['new', 'paid', 'shipped'])[1 + g % 3]::status,
       CASE WHEN g % 7 = 0 THEN NULL WHEN g % 11 = 0 THEN '' ELSE 'note "' || g || E'"\\n,x' END,
       ARRAY['t' || g, NULL]
FROM generate_series(1, 3000) g;
"""


async def test_round_trip_is_row_for_row_equal(
    db: asyncpg.Connection, store: ObjectStore, fresh_db: str
) -> None:
    await db.execute(ORDERS)
    database = await db.fetchval("SELECT current_database()")
    manifest = await take_snapshot(fresh_db, store, ["public.orders"], prefix_db=database)

    # The object layout of DESIGN.md, the manifest's own sha256, and what it records.
    directory = f"{database}/public.orders/{manifest.id}/"
    keys = [o.key for o in await store.list(directory)]
    assert keys == [directory + "manifest.json", directory + "part-00000.parquet"]
    loaded = await load_manifest(store, directory + "manifest.json")
    assert loaded == manifest and loaded.sha256 == manifest.sha256 != ""
    doc = json.loads(await store.get(directory + "manifest.json"))
    assert doc["format"] == "backstop-snapshot/1" and "sha256" not in doc
    (table,) = manifest.tables
    assert table.rows == 3000 and manifest.rows == 3000
    assert [c.name for c in table.columns] == [
        "id", "customer", "placed", "amount", "status", "note", "tags",
    ]  # fmt: skip
    assert [c.type for c in table.columns][:5] == [
        "bigint", "integer", "timestamp with time zone", "numeric(12,2)", "public.status",
    ]  # fmt: skip
    assert table.columns[0].sequence is not None and table.columns[0].sequence.last_value == 3000
    assert {c.type for c in table.constraints} == {"primary_key", "unique", "check", "foreign_key"}
    assert [t.labels for t in table.types] == [("new", "paid", "shipped")]
    assert any(i.name == "orders_note" and i.using for i in table.indexes)
    assert manifest.wal_lsn and "/" in manifest.wal_lsn
    assert manifest.started_at <= manifest.finished_at
    assert snapshot_time(manifest.id) <= manifest.started_at
    assert table.checksum == await table_checksum(db, "public.orders")
    assert (await verify_snapshot(store, manifest, full=True)).ok

    target = restored_name("orders", manifest.id)
    assert await restore_plain(db, store, manifest, "public.orders", target) == 3000
    assert await rows_as_text(db, f'"{target}"') == await rows_as_text(db, "orders")
    assert await table_checksum(db, target) == table.checksum
    # Constraints and indexes came back under names of the restored table; the sequence too.
    constraints = await db.fetch(
        "SELECT contype::text FROM pg_constraint WHERE conrelid = $1::regclass ORDER BY 1",
        f'"{target}"',
    )
    assert [c[0] for c in constraints] == ["c", "p", "u"]  # the foreign key is only recorded
    assert await db.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = $1", target) == 3
    next_id = await db.fetchval(f'INSERT INTO "{target}" (placed) VALUES (now()) RETURNING id')
    assert next_id == 3001


async def test_many_parts_and_progress(
    db: asyncpg.Connection, tmp_path: Path, fresh_db: str
) -> None:
    await db.execute(ORDERS)
    await db.execute(
        "INSERT INTO orders (amount, note) SELECT g, encode(sha256(g::text::bytea), 'hex')"
        " || md5(g::text) FROM generate_series(1, 20000) g"
    )
    store = LocalObjectStore(tmp_path / "store")
    progress: list[SnapshotProgress] = []
    manifest = await take_snapshot(
        fresh_db,
        store,
        ["orders"],
        block_bytes=128 * 1024,
        part_bytes=256 * 1024,
        on_progress=progress.append,
    )
    (table,) = manifest.tables
    assert len(table.parts) > 3
    assert sum(p.rows for p in table.parts) == table.rows == 23000
    assert [p.name for p in table.parts] == [
        f"part-{i:05d}.parquet" for i in range(len(table.parts))
    ]
    assert progress and progress[-1].rows == 23000 and progress[-1].parts == len(table.parts)
    assert all(p.snapshot_id == manifest.id and p.table == "public.orders" for p in progress)
    await restore_plain(db, store, manifest, "orders", "orders_back")
    assert await rows_as_text(db, "orders_back") == await rows_as_text(db, "orders")


async def test_group_snapshot_is_consistent_under_concurrent_writes(
    db: asyncpg.Connection, store: ObjectStore, fresh_db: str
) -> None:
    await db.execute(
        "CREATE TABLE ledger (id int PRIMARY KEY, amount int);"
        "CREATE TABLE journal (id int PRIMARY KEY, memo text);"
        "INSERT INTO ledger SELECT g, g FROM generate_series(1, 20000) g;"
        "INSERT INTO journal SELECT g, 'm' FROM generate_series(1, 20000) g;"
    )
    stop = asyncio.Event()
    warmed_up = asyncio.Event()
    written = 0

    async def writer() -> None:
        nonlocal written
        conn = await asyncpg.connect(fresh_db)
        try:
            next_id = 20001
            while not stop.is_set():
                async with conn.transaction():
                    await conn.execute("INSERT INTO ledger VALUES ($1, $1)", next_id)
                    await conn.execute("INSERT INTO journal VALUES ($1, 'w')", next_id)
                next_id += 1
                written += 1
                if written == 20:
                    warmed_up.set()
        finally:
            await conn.close()

    task = asyncio.create_task(writer())
    try:
        await warmed_up.wait()
        manifest = await take_snapshot(
            fresh_db, store, ["ledger", "journal"], group="money", block_bytes=64 * 1024
        )
        await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    assert manifest.group == "money" and manifest.table_names == ("public.ledger", "public.journal")
    # One document, in each table's directory.
    copies = {await store.get(t.manifest_key) for t in manifest.tables}
    assert len(copies) == 1
    await restore_plain(db, store, manifest, "ledger", "ledger_back")
    await restore_plain(db, store, manifest, "journal", "journal_back")
    ledger = {r[0] for r in await db.fetch("SELECT id FROM ledger_back")}
    journal = {r[0] for r in await db.fetch("SELECT id FROM journal_back")}
    assert ledger == journal
    assert 20000 < len(ledger) < 20000 + written  # writes before it, and some after it
    for table in manifest.tables:
        restored = table.name.split(".")[1] + "_back"
        assert await table_checksum(db, restored) == table.checksum


async def test_truncate_waits_for_a_running_snapshot(
    db: asyncpg.Connection, tmp_path: Path, fresh_db: str
) -> None:
    await db.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 50000)")

    class SlowStore(LocalObjectStore):
        async def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
            await asyncio.sleep(0.5)
            await super().put_file(key, path)

    store = SlowStore(tmp_path / "store")
    truncating: list[asyncio.Task[Any]] = []

    def on_progress(_event: SnapshotProgress) -> None:
        if not truncating:
            truncating.append(asyncio.ensure_future(db.execute("TRUNCATE t")))

    manifest = await take_snapshot(
        fresh_db, store, ["t"], block_bytes=16 * 1024, part_bytes=64 * 1024,
        on_progress=on_progress,
    )  # fmt: skip
    await truncating[0]
    assert manifest.tables[0].rows == 50000
    assert await db.fetchval("SELECT count(*) FROM t") == 0


async def test_damaged_snapshots_are_detected(
    db: asyncpg.Connection, store: ObjectStore, fresh_db: str, tmp_path: Path
) -> None:
    await db.execute(ORDERS)
    manifest = await take_snapshot(fresh_db, store, ["orders"], part_bytes=4 * 1024,
                                   block_bytes=8 * 1024)  # fmt: skip
    (table,) = manifest.tables
    assert len(table.parts) >= 2
    first, second = table.parts[0], table.parts[1]

    # Same size, different bytes: only the sha256 check sees it, and restore refuses it.
    data = bytearray(await store.get(table.part_key(first)))
    data[len(data) // 2] ^= 0xFF
    await store.put(table.part_key(first), bytes(data))
    assert (await verify_snapshot(store, manifest)).ok
    result = await verify_snapshot(store, manifest, full=True)
    assert not result.ok and "part-00000.parquet does not match its sha256" in result.problems[0]
    with pytest.raises(RestoreError, match="does not match the manifest"):
        await restore_plain(db, store, manifest, "orders", "orders_bad")
    assert await db.fetchval("SELECT to_regclass('orders_bad')") is None  # nothing left behind

    await store.delete(table.part_key(second))
    result = await verify_snapshot(store, manifest.tables[0].manifest_key)
    assert result.problems == ("public.orders: part-00001.parquet is missing",)
    (summary,) = await list_snapshots(store, manifest.database, "public.orders")
    assert not summary.complete and summary.id == manifest.id


async def test_checksum_mismatch_when_restored_data_differs(
    db: asyncpg.Connection, tmp_path: Path, fresh_db: str
) -> None:
    await db.execute(ORDERS)
    store = LocalObjectStore(tmp_path)
    manifest = await take_snapshot(fresh_db, store, ["orders"])
    await restore_plain(db, store, manifest, "orders", "orders_back")
    checksum = manifest.tables[0].checksum
    assert await table_checksum(db, "orders_back") == checksum
    await db.execute("UPDATE orders_back SET amount = amount + 0.01 WHERE id = 17")
    assert await table_checksum(db, "orders_back") != checksum
    await db.execute("UPDATE orders_back SET amount = amount - 0.01 WHERE id = 17")
    assert await table_checksum(db, "orders_back") == checksum
    # Order does not matter, duplicates do.
    await db.execute("CREATE TABLE twice AS SELECT * FROM orders_back ORDER BY random()")
    assert await table_checksum(db, "twice") == checksum
    await db.execute("INSERT INTO twice SELECT * FROM orders_back WHERE id = 1")
    assert await table_checksum(db, "twice") != checksum


async def test_list_snapshots_newest_first(
    db: asyncpg.Connection, store: ObjectStore, fresh_db: str
) -> None:
    await db.execute("CREATE TABLE a (id int); CREATE TABLE b (id int); INSERT INTO a VALUES (1)")
    first = await take_snapshot(fresh_db, store, ["a"])
    second = await take_snapshot(fresh_db, store, ["a", "b"], group="g")
    database = first.database
    listed = await list_snapshots(store, database, "public.a")
    assert [s.id for s in listed] == [second.id, first.id]
    assert listed[0].group == "g" and listed[0].group_tables == ("public.a", "public.b")
    assert listed[1].rows == 1 and listed[1].complete
    everything = await list_snapshots(store, database)
    assert sorted((s.id, s.table) for s in everything) == sorted(
        [(first.id, "public.a"), (second.id, "public.a"), (second.id, "public.b")]
    )
    assert await list_snapshots(store, "no_such_db") == []
    # A manifest that cannot be read is listed, as incomplete, with the reason.
    broken = f"{database}/public.a/20240101T000000.000000Z-00000000/manifest.json"
    await store.put(broken, b"{not json")
    oldest = (await list_snapshots(store, database, "public.a"))[-1]
    assert (oldest.manifest_key, oldest.table, oldest.complete) == (broken, "public.a", False)
    assert "not a valid snapshot manifest" in oldest.problems[0]


async def test_awkward_names_partitions_and_inheritance(
    db: asyncpg.Connection, store: ObjectStore, fresh_db: str
) -> None:
    await db.execute(
        """
        CREATE SCHEMA "My Schema";
        CREATE TABLE "My Schema"."we.ird/Name" ("Id" int PRIMARY KEY, "select" text);
        INSERT INTO "My Schema"."we.ird/Name" VALUES (1, 'a'), (2, NULL);
        CREATE TABLE events (at date NOT NULL, what text) PARTITION BY RANGE (at);
        CREATE TABLE events_2023 PARTITION OF events
            FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
        CREATE TABLE events_2024 PARTITION OF events
            FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        INSERT INTO events VALUES ('2023-05-01', 'x'), ('2024-05-01', 'y');
        CREATE TABLE parent (id int);
        CREATE TABLE child () INHERITS (parent);
        INSERT INTO parent VALUES (1); INSERT INTO child VALUES (2);
        """
    )
    manifest = await take_snapshot(fresh_db, store, ["My Schema.we.ird/Name", "events", "parent"])
    weird, events, parent = manifest.tables
    assert weird.name == "My Schema.we.ird/Name"
    assert weird.directory.split("/")[1] == "My%20Schema.we%2Eird%2FName"
    assert (events.kind, events.rows, parent.rows) == ("partitioned", 2, 1)
    assert events.partition_key == "RANGE (at)"
    for table, target in ((weird, "weird_back"), (events, "events_back"), (parent, "parent_back")):
        await restore_plain(db, store, manifest, table.name, target)
        # A bare target name lands in the source table's schema.
        assert await table_checksum(db, f"{table.schema}.{target}") == table.checksum
    assert await rows_as_text(db, '"My Schema".weird_back') == ["(1,a)", "(2,)"]
    assert await rows_as_text(db, "events_back") == await rows_as_text(db, "events")


async def test_failed_snapshots_leave_nothing_behind(
    db: asyncpg.Connection, tmp_path: Path, fresh_db: str
) -> None:
    await db.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)")

    class BrokenStore(LocalObjectStore):
        async def put(self, key: str, data: bytes) -> None:
            raise ObjectStoreError("the store is full")

    store = BrokenStore(tmp_path)
    with pytest.raises(SnapshotError, match="the store is full"):
        await take_snapshot(fresh_db, store, ["t"])
    assert await store.list("") == []
    with pytest.raises(SnapshotError, match=r"table public\.nope does not exist"):
        await take_snapshot(fresh_db, store, ["public.nope"])
    await db.execute("CREATE VIEW v AS SELECT 1")
    with pytest.raises(SnapshotError, match="not a table"):
        await take_snapshot(fresh_db, store, ["v"])
    with pytest.raises(SnapshotError, match="cannot connect"):
        await take_snapshot("postgresql://nobody@127.0.0.1:1/x", store, ["t"])


async def test_snapshot_on_a_given_connection(db: asyncpg.Connection, tmp_path: Path) -> None:
    """With a connection instead of a DSN the checksum runs in the same transaction."""
    await db.execute("CREATE TABLE t (id int, v text); INSERT INTO t VALUES (1, 'x'), (2, '')")
    store = LocalObjectStore(tmp_path)
    manifest = await take_snapshot(db, store, ["t"])
    assert manifest.tables[0].checksum == await table_checksum(db, "t")
    assert not db.is_in_transaction()


def test_manifest_round_trips_through_json() -> None:
    from datetime import UTC, datetime

    manifest = Manifest(
        id="20240101T000000.000000Z-0123abcd",
        database="d",
        group=None,
        tables=(),
        started_at=datetime(2024, 1, 1, tzinfo=UTC),
        finished_at=datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC),
        wal_lsn="0/1",
        server_version="15",
        backstop_version="0.1.0",
    )
    data = manifest.to_json()
    again = Manifest.from_json(data)
    assert again.sha256 and again == Manifest.from_json(data)
    assert again.to_json() == data
    with pytest.raises(SnapshotError, match="not a valid snapshot manifest"):
        Manifest.from_json(b"{")
    with pytest.raises(SnapshotError, match="unknown manifest format"):
        Manifest.from_json(b'{"format": "other"}')
