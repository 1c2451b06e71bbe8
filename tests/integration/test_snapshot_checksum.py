"""The table checksum against the real PostgreSQL: snapshots record `hash-record-sum64/2`
with the form of every column, a restored side table validates, and validation notices
changes that a checksum over values alone would miss (equal values with different text
forms, array bounds, values moved between rows, ...). Manifests of the md5 method still
validate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from backstop_core.recovery.restore import RestoreResult, restore_to_side_table
from backstop_core.recovery.validate import ValidationCheck, validate_restore
from backstop_core.sidecar.objectstore import LocalObjectStore, ObjectStore
from backstop_core.sidecar.pgtypes import CHECKSUM_HASH, CHECKSUM_MD5, checksum_value
from backstop_core.sidecar.snapshot import (
    Manifest,
    SnapshotError,
    snapshot_checksum_sql,
    table_checksum,
    table_count_and_checksum,
    take_snapshot,
)

pytestmark = pytest.mark.integration

TABLE = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN amount AS numeric;
CREATE TABLE t (
    id bigint PRIMARY KEY,
    amount numeric,
    price amount,
    ratio double precision,
    span interval,
    mood mood,
    moods mood[],
    tags text[],
    big bigint,
    at timestamptz,
    label varchar(20),
    doc jsonb,
    code char(3),
    day date
);
INSERT INTO t VALUES
    (1, 1.0, 5.0, 0, '1 day', 'ok', '{ok}', '{a,b}', 4294967298, '2024-01-01 00:00+00',
     'abc', '{"n": 1.0}', 'x', '2024-01-01'),
    (2, 2.5, 7, 1.5, '2 hours', 'happy', '{sad,happy}', '{c}', 7, '2024-06-01 12:00+00',
     'def', '{"n": 2}', 'yz', '2024-06-01');
INSERT INTO t
SELECT g, g * 1.25, g, g / 7.0, g * interval '1 minute',
       (ARRAY['sad', 'ok', 'happy'])[1 + g % 3]::mood, NULL, ARRAY['t' || g, NULL],
       g * 1000003, timestamptz '2024-01-01 00:00+00' + g * interval '1 hour', 'label ' || g,
       jsonb_build_object('k', g), NULL, date '2024-01-01' + g
FROM generate_series(3, 500) g;
"""


@dataclass(frozen=True)
class Restored:
    conn: asyncpg.Connection
    store: ObjectStore
    manifest: Manifest
    result: RestoreResult

    async def checksum_check(self) -> ValidationCheck:
        report = await validate_restore(self.conn, self.result, foreign_keys=False)
        return next(c for c in report.checks if c.name == "checksum")


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_db)
    await conn.execute(TABLE)
    yield conn
    await conn.close()


@pytest.fixture
async def restored(db: asyncpg.Connection, fresh_db: str, tmp_path: Path) -> Restored:
    store = LocalObjectStore(tmp_path / "store")
    manifest = await take_snapshot(fresh_db, store, ["public.t"])
    result = await restore_to_side_table(db, store, manifest, "public.t", dsn=fresh_db)
    return Restored(db, store, manifest, result)


async def test_snapshot_records_the_hash_method_and_each_columns_form(
    db: asyncpg.Connection, fresh_db: str, tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    manifest = await take_snapshot(fresh_db, store, ["public.t"])
    assert manifest.checksum_method == CHECKSUM_HASH
    (table,) = manifest.tables
    assert {c.name: c.checksum_form for c in table.columns} == {
        "id": "int8send",
        "amount": "text",
        "price": "text",  # a domain over numeric
        "ratio": "text",
        "span": "text",
        "mood": "text",
        "moods": "text",
        "tags": "array_c",
        "big": "int8send",
        "at": "timestamptz_send",
        "label": "value_c",
        "doc": "text",
        "code": "value_c",
        "day": "value",
    }
    stored = json.loads(await store.get(table.manifest_key))
    assert stored["checksum_method"] == "hash-record-sum64/2"
    assert stored["tables"][0]["columns"][0]["checksum_form"] == "int8send"
    assert await table_count_and_checksum(db, "public.t") == (500, table.checksum)
    # The md5 method gives another number for the same rows.
    assert await table_checksum(db, "public.t", method=CHECKSUM_MD5) != table.checksum


async def test_a_snapshot_on_one_connection_records_the_same_checksum(
    db: asyncpg.Connection, fresh_db: str, tmp_path: Path
) -> None:
    """Without a DSN the checksum runs in the snapshot's own transaction."""
    parallel = await take_snapshot(fresh_db, LocalObjectStore(tmp_path / "a"), ["public.t"])
    serial = await take_snapshot(db, LocalObjectStore(tmp_path / "b"), ["public.t"])
    assert serial.tables[0].checksum == parallel.tables[0].checksum
    assert serial.tables[0].columns == parallel.tables[0].columns


async def test_a_restored_table_validates(restored: Restored) -> None:
    report = await validate_restore(restored.conn, restored.result, foreign_keys=False)
    assert report.passed, report.failed
    check = next(c for c in report.checks if c.name == "checksum")
    assert check.expected == check.actual == restored.manifest.tables[0].checksum
    assert "hash-record-sum64/2" in check.detail
    side = restored.result.restored_table
    assert await table_checksum(restored.conn, side) == restored.manifest.tables[0].checksum


# Each: a change to row 1 (or between rows 1 and 2) of the side table, and how to undo it.
# Most keep the value equal for its type's `=` and change only its text form.
CHANGES = {
    "numeric 1.0 -> 1.00": ("amount = 1.00", "amount = 1.0"),
    "domain over numeric 5.0 -> 5": ("price = 5", "price = 5.0"),
    "float 0 -> -0": ("ratio = '-0'", "ratio = 0"),
    "interval 1 day -> 24 hours": ("span = '24 hours'", "span = '1 day'"),
    "enum ok -> happy": ("mood = 'happy'", "mood = 'ok'"),
    "array lower bound 1 -> 0": ("tags = '[0:1]={a,b}'", "tags = '{a,b}'"),
    "array shape {a,b} -> {{a},{b}}": ("tags = '{{a},{b}}'", "tags = '{a,b}'"),
    "bigint halves swapped": ("big = 8589934593", "big = 4294967298"),
    "jsonb 1.0 -> 1.00": ("doc = '{\"n\": 1.00}'", "doc = '{\"n\": 1.0}'"),
    "char(3) case": ("code = 'X'", "code = 'x'"),
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_validation_notices_a_changed_value(restored: Restored, change: str) -> None:
    do, undo = CHANGES[change]
    side = restored.result.qualified
    assert (await restored.checksum_check()).passed
    await restored.conn.execute(f"UPDATE {side} SET {do} WHERE id = 1")
    check = await restored.checksum_check()
    assert not check.passed, change
    assert f"the manifest says {restored.manifest.tables[0].checksum}" in check.detail
    await restored.conn.execute(f"UPDATE {side} SET {undo} WHERE id = 1")
    assert (await restored.checksum_check()).passed, change


async def test_values_moved_between_rows_are_noticed(restored: Restored) -> None:
    """hash_record_extended is linear in the columns' hashes: summed over rows as it is,
    swapping one column's values between two rows would leave the sum unchanged. The
    per-row mixing step is what catches it."""
    conn, side = restored.conn, restored.result.qualified
    naive = f"SELECT sum(hash_record_extended(ROW(id, label), 0))::text FROM {side}"
    before = checksum_value(await conn.fetchval(naive))
    swap = f"UPDATE {side} s SET label = o.label FROM {side} o"
    swap += " WHERE (s.id, o.id) IN ((1, 2), (2, 1))"
    await conn.execute(swap)
    assert checksum_value(await conn.fetchval(naive)) == before  # blind to it
    assert not (await restored.checksum_check()).passed
    await conn.execute(swap)
    assert (await restored.checksum_check()).passed


async def test_duplicated_and_missing_rows_are_noticed(restored: Restored) -> None:
    conn, side = restored.conn, restored.result.qualified
    primary_key = restored.result.renamed["t_pkey"]
    await conn.execute(f'ALTER TABLE {side} DROP CONSTRAINT "{primary_key}"')
    await conn.execute(f"DELETE FROM {side} WHERE id = 3")
    await conn.execute(f"INSERT INTO {side} SELECT * FROM {side} WHERE id = 4")
    report = await validate_restore(conn, restored.result, foreign_keys=False)
    failed = {c.name for c in report.failed}
    assert "checksum" in failed and "row count" not in failed  # same count, other rows


async def test_case_under_a_nondeterministic_collation_is_noticed(
    db: asyncpg.Connection, fresh_db: str, tmp_path: Path
) -> None:
    try:
        await db.execute(
            "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2',"
            " deterministic = false)"
        )
    except asyncpg.PostgresError as exc:
        pytest.skip(f"no ICU collations on this server: {exc}")
    await db.execute(
        "CREATE DOMAIN ci_text AS text COLLATE ci;"
        "CREATE TABLE names (id int PRIMARY KEY, name text COLLATE ci, alias ci_text,"
        " names text[] COLLATE ci);"
        "INSERT INTO names VALUES (1, 'abc', 'abc', '{abc}'), (2, 'Straße', 'x', '{y}')"
    )
    store = LocalObjectStore(tmp_path / "store")
    manifest = await take_snapshot(fresh_db, store, ["public.names"])
    assert [c.checksum_form for c in manifest.tables[0].columns] == [
        "value", "value_c", "value_c", "array_c",
    ]  # fmt: skip
    result = await restore_to_side_table(db, store, manifest, "public.names")
    side = result.qualified
    # Equal under the collation, so a hash that followed it would not see the changes.
    assert await db.fetchval("SELECT 'abc' = 'ABC' COLLATE ci")
    for do, undo in (
        ("name = 'ABC'", "name = 'abc'"),
        ("alias = 'ABC'", "alias = 'abc'"),
        ("names = '{ABC}'", "names = '{abc}'"),
    ):
        await db.execute(f"UPDATE {side} SET {do} WHERE id = 1")
        report = await validate_restore(db, result, foreign_keys=False)
        assert [c.name for c in report.failed] == ["checksum"], do
        await db.execute(f"UPDATE {side} SET {undo} WHERE id = 1")
    assert (await validate_restore(db, result, foreign_keys=False)).passed


async def test_an_enum_created_again_hashes_alike(
    db: asyncpg.Connection, fresh_db: str, tmp_path: Path
) -> None:
    """Enums are hashed by their text form: after the table and its type are dropped, the
    restore creates the type again under new OIDs, and the checksum still matches."""
    store = LocalObjectStore(tmp_path / "store")
    manifest = await take_snapshot(fresh_db, store, ["public.t"])
    labels = (
        "SELECT array_agg(e.oid ORDER BY e.enumsortorder) FROM pg_enum e"
        " JOIN pg_type t ON t.oid = e.enumtypid WHERE t.typname = $1"
    )
    old_oids = await db.fetchval(labels, "mood")
    await db.execute("DROP TABLE t; DROP TYPE mood")
    result = await restore_to_side_table(db, store, manifest, "public.t")
    new_oids = await db.fetchval(labels, "mood")
    assert len(new_oids) == 3 and not set(new_oids) & set(old_oids)
    report = await validate_restore(db, result, foreign_keys=False)
    assert report.passed, report.failed


def _as_md5_manifest(manifest: Manifest, checksum: str) -> Manifest:
    """The manifest as a Backstop of the md5 method wrote it: no per-column forms."""
    doc = json.loads(manifest.to_json())
    doc["checksum_method"] = CHECKSUM_MD5
    for table in doc["tables"]:
        table["checksum"] = checksum
        for column in table["columns"]:
            del column["checksum_form"]
    return Manifest.from_json(json.dumps(doc).encode())


async def test_a_manifest_of_the_md5_method_still_validates(
    db: asyncpg.Connection, fresh_db: str, tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    md5 = await table_checksum(db, "public.t", method=CHECKSUM_MD5)
    old = _as_md5_manifest(await take_snapshot(fresh_db, store, ["public.t"]), md5)
    assert old.checksum_method == CHECKSUM_MD5
    assert all(c.checksum_form is None for c in old.tables[0].columns)
    result = await restore_to_side_table(db, store, old, "public.t")
    report = await validate_restore(db, result, foreign_keys=False)
    assert report.passed, report.failed
    check = next(c for c in report.checks if c.name == "checksum")
    assert check.actual == md5 and "md5-row-text-sum64/1" in check.detail
    # And it still notices a change of text form.
    await db.execute(f"UPDATE {result.qualified} SET amount = 1.00 WHERE id = 1")
    report = await validate_restore(db, result, foreign_keys=False)
    assert [c.name for c in report.failed] == ["checksum"]


async def test_a_method_that_cannot_be_computed_fails_validation_clearly(
    restored: Restored,
) -> None:
    manifest, source = restored.manifest, restored.manifest.tables[0]
    # Unknown to this Backstop: the row count is still checked, the checksum fails.
    unknown = await restore_to_side_table(
        restored.conn,
        restored.store,
        Manifest.from_json(manifest.to_json().replace(b"hash-record-sum64/2", b"crc32/9")),
        "public.t",
        target_name="t_unknown_method",
    )
    report = await validate_restore(restored.conn, unknown, foreign_keys=False)
    assert [c.name for c in report.failed] == ["checksum"]
    (check,) = report.failed
    assert check.detail.startswith("cannot recompute the snapshot's checksum:")
    assert "'crc32/9' is unknown to this Backstop" in check.detail and check.actual is None
    # A server before PostgreSQL 14 has no hash_record_extended.
    with pytest.raises(SnapshotError, match=r"needs PostgreSQL 14 or later .* PostgreSQL 13"):
        snapshot_checksum_sql(manifest, source, "public", "t", 130012)
    # A manifest of the hash method must say how each column was hashed.
    doc = json.loads(manifest.to_json())
    del doc["tables"][0]["columns"][2]["checksum_form"]
    incomplete = Manifest.from_json(json.dumps(doc).encode())
    with pytest.raises(SnapshotError, match="does not record how column 'price'"):
        snapshot_checksum_sql(incomplete, incomplete.tables[0], "public", "t", 150000)
