"""A restore that counts and checksums its rows while it builds the indexes (`check_data`),
against the real PostgreSQL: the side table ends with the same constraints and indexes as
the original, validation reports that scan (and scans again when the table is not the one
that was read), damaged keys still fail validation, and a restore that fails after the load
leaves nothing to validate."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from backstop_core.recovery.restore import (
    RestoreError,
    RestoreResult,
    _attach_clause,
    restore_to_side_table,
)
from backstop_core.recovery.validate import validate_restore
from backstop_core.recovery.wizard import Recovery
from backstop_core.sidecar.objectstore import LocalObjectStore
from backstop_core.sidecar.snapshot import (
    ColumnDef,
    ConstraintDef,
    IndexDef,
    Manifest,
    take_snapshot,
)

pytestmark = pytest.mark.integration

TABLE = """
CREATE TABLE shop_items (
    id int NOT NULL,
    grp int NOT NULL,
    sku text,
    label text,
    during tsrange,
    amount numeric CHECK (amount >= 0),
    CONSTRAINT shop_items_pkey PRIMARY KEY (id, grp) INCLUDE (label) WITH (fillfactor = 70),
    CONSTRAINT shop_items_sku_key UNIQUE NULLS NOT DISTINCT (sku) DEFERRABLE
        INITIALLY DEFERRED,
    CONSTRAINT shop_items_label_key UNIQUE (label, grp),
    CONSTRAINT shop_items_during_excl EXCLUDE USING gist (during WITH &&)
);
CREATE INDEX shop_items_lower_label ON shop_items (lower(label)) WHERE grp > 3;
CREATE INDEX shop_items_grp ON shop_items (grp DESC);
INSERT INTO shop_items
SELECT g, g % 10, CASE WHEN g = 7 THEN NULL ELSE 'sku-' || g END, 'label ' || g || repeat('x', 40),
       tsrange(timestamp '2024-01-01' + g * interval '1 hour',
               timestamp '2024-01-01' + g * interval '1 hour' + interval '30 minutes'),
       g * 1.5
FROM generate_series(1, 20000) g;
"""

DEFINITION_SQL = """
SELECT format('constraint %s %s %s deferrable=%s deferred=%s', conname, contype,
              pg_get_constraintdef(oid), condeferrable, condeferred)
FROM pg_constraint WHERE conrelid = $1::regclass
UNION ALL
SELECT format('index %s primary=%s immediate=%s options=%s', pg_get_indexdef(indexrelid),
              indisprimary, indimmediate, c.reloptions)
FROM pg_index JOIN pg_class c ON c.oid = indexrelid WHERE indrelid = $1::regclass
ORDER BY 1
"""


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fresh_db)
    await conn.execute(TABLE)
    yield conn
    await conn.close()


@pytest.fixture
async def snapshot(db: asyncpg.Connection, fresh_db: str, tmp_path: Path) -> Manifest:
    # A part per 32 KB block: enough work for two loading connections.
    return await take_snapshot(
        fresh_db,
        LocalObjectStore(tmp_path / "store"),
        ["public.shop_items"],
        block_bytes=32 * 1024,
        part_bytes=1,
    )


async def definition(conn: asyncpg.Connection, table: str, side: str | None = None) -> list[str]:
    """Constraints and indexes of `table`, with the side table's name put back."""
    lines = [r[0] for r in await conn.fetch(DEFINITION_SQL, f"public.{side or table}")]
    return sorted(line.replace(side, table) for line in lines) if side else lines


async def restore(
    conn: asyncpg.Connection,
    store_dir: Path,
    manifest: Manifest,
    dsn: str,
    *,
    workers: int,
    name: str,
    check_data: bool = True,
) -> RestoreResult:
    return await restore_to_side_table(
        conn,
        LocalObjectStore(store_dir),
        manifest,
        "public.shop_items",
        dsn=dsn,
        workers=workers,
        target_name=name,
        check_data=check_data,
    )


async def test_the_scan_beside_the_index_build_is_what_validation_reports(
    db: asyncpg.Connection, fresh_db: str, snapshot: Manifest, tmp_path: Path
) -> None:
    (table,) = snapshot.tables
    assert len(table.parts) > 2
    result = await restore(db, tmp_path / "store", snapshot, fresh_db, workers=2, name="side_a")
    assert result.workers == 2 and not result.skipped
    check = result.data_check
    assert check is not None and check.table == result.qualified
    assert (check.rows, check.checksum, check.problem) == (20000, table.checksum, None)
    assert result.as_dict()["data_check_seconds"] == round(check.seconds, 3)
    # Every index first, then the constraints attached to theirs: the same catalog as the
    # original table (storage options and deferrability included).
    assert await definition(db, "shop_items", "side_a") == await definition(db, "shop_items")

    report = await validate_restore(db, result)
    assert report.passed, report.failed
    checks = {c.name: c for c in report.checks}
    assert "while the restore built the indexes" in checks["checksum"].detail
    assert (checks["row count"].actual, checks["checksum"].actual) == (20000, table.checksum)
    assert "proven by building the primary key" in checks["primary key unique"].detail

    # On one connection there is nothing to overlap with: validation scans.
    single = await restore(db, tmp_path / "store", snapshot, fresh_db, workers=1, name="side_b")
    assert single.workers == 1 and single.data_check is None
    assert await definition(db, "shop_items", "side_b") == await definition(db, "shop_items")
    report = await validate_restore(db, single)
    assert report.passed, report.failed
    detail = next(c.detail for c in report.checks if c.name == "checksum")
    assert "while the restore built" not in detail


async def test_a_table_that_is_not_the_one_read_is_scanned_again(
    db: asyncpg.Connection, fresh_db: str, snapshot: Manifest, tmp_path: Path
) -> None:
    result = await restore(db, tmp_path / "store", snapshot, fresh_db, workers=2, name="side_c")
    assert result.data_check is not None
    # Another table under the same name, one value changed: the oid tells them apart.
    await db.execute(
        "ALTER TABLE side_c RENAME TO side_c_old;"
        " CREATE TABLE side_c (LIKE side_c_old INCLUDING ALL);"
        " INSERT INTO side_c SELECT * FROM side_c_old;"
        " UPDATE side_c SET amount = amount + 1 WHERE id = 5"
    )
    report = await validate_restore(db, result)
    failed = {c.name: c for c in report.failed}
    assert list(failed) == ["checksum"]
    assert "while the restore built" not in failed["checksum"].detail
    # Without the restore's scan, validation reads the table as it is now.
    await db.execute("DROP TABLE side_c; ALTER TABLE side_c_old RENAME TO side_c")
    await db.execute("UPDATE side_c SET label = label || '!' WHERE id = 9")
    report = await validate_restore(db, dataclasses.replace(result, data_check=None))
    assert [c.name for c in report.failed] == ["checksum"]


def _key_on_grp(manifest: Manifest) -> Manifest:
    """The snapshot as if its primary key were (grp): thousands of duplicated keys."""
    (table,) = manifest.tables
    constraints = tuple(
        dataclasses.replace(c, definition="PRIMARY KEY (grp)", columns=("grp",))
        if c.type == "primary_key"
        else c
        for c in table.constraints
    )
    indexes = tuple(
        dataclasses.replace(i, using="btree (grp)") if i.constraint == "shop_items_pkey" else i
        for i in table.indexes
    )
    forged = dataclasses.replace(table, constraints=constraints, indexes=indexes)
    return dataclasses.replace(manifest, tables=(forged,))


async def test_duplicated_keys_fail_validation_and_leave_no_index_behind(
    db: asyncpg.Connection, fresh_db: str, snapshot: Manifest, tmp_path: Path
) -> None:
    damaged = _key_on_grp(snapshot)
    result = await restore(db, tmp_path / "store", damaged, fresh_db, workers=2, name="side_d")
    assert result.data_check is not None
    assert len(result.skipped) == 1 and result.skipped[0].startswith(
        "primary key shop_items_pkey: could not create unique index"
    )
    assert "shop_items_pkey" not in result.renamed
    indexes = await db.fetchval(
        "SELECT count(*) FROM pg_index WHERE indrelid = 'public.side_d'::regclass"
    )
    assert indexes == 5  # the other unique, exclusion and plain ones; no stray key index
    report = await validate_restore(db, result)
    failed = {c.name: c for c in report.failed}
    assert set(failed) == {"primary key unique", "constraints and indexes"}
    assert failed["primary key unique"].actual == 10  # grp 0..9, each duplicated


async def test_a_restore_that_fails_after_the_load_leaves_nothing_to_validate(
    db: asyncpg.Connection, fresh_db: str, tmp_path: Path
) -> None:
    await db.execute(
        "CREATE TABLE counters (id serial PRIMARY KEY, note text);"
        " INSERT INTO counters (note) SELECT repeat('n', 200) || g FROM generate_series(1, 5000) g"
    )
    store = LocalObjectStore(tmp_path / "store")
    manifest = await take_snapshot(
        fresh_db, store, ["public.counters"], block_bytes=32 * 1024, part_bytes=1
    )
    (table,) = manifest.tables

    def beyond(column: ColumnDef) -> ColumnDef:
        if column.sequence is None:
            return column
        # setval refuses it: the restore fails once the rows are in and being checked.
        sequence = dataclasses.replace(column.sequence, last_value=2**31)
        return dataclasses.replace(column, sequence=sequence)

    forged = dataclasses.replace(table, columns=tuple(beyond(c) for c in table.columns))
    await store.put(table.manifest_key, dataclasses.replace(manifest, tables=(forged,)).to_json())
    recovery = Recovery(fresh_db, store, workers=2)
    try:
        with pytest.raises(RestoreError, match="out of bounds"):
            await recovery.recover(table="public.counters", snapshot_id=manifest.id)
    finally:
        await recovery.close()
    left = await db.fetchval(
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'counters!_!_restored%' ESCAPE '!'"
    )
    assert left == 0  # neither the side table nor its sequence
    lingering = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'backstop-recovery'"
    )
    assert lingering == 0


def test_constraints_attach_to_their_index_only_in_known_shapes() -> None:
    def constraint(kind: str, definition: str) -> ConstraintDef:
        return ConstraintDef("c", kind, definition, ("a",))

    def index(using: str | None, *, unique: bool = True) -> IndexDef:
        return IndexDef("c", "...", unique, using, "c")

    assert _attach_clause(
        constraint("primary_key", "PRIMARY KEY (a)"), index("btree (a)"), "s"
    ) == ('PRIMARY KEY USING INDEX "s"')
    assert _attach_clause(
        constraint("unique", "UNIQUE (a) DEFERRABLE INITIALLY DEFERRED"), index("btree (a)"), "s"
    ) == ('UNIQUE USING INDEX "s" DEFERRABLE INITIALLY DEFERRED')
    assert _attach_clause(
        constraint("unique", "UNIQUE (a) DEFERRABLE"), index("btree (a)"), "s"
    ) == ('UNIQUE USING INDEX "s" DEFERRABLE')
    for kind, text, idx in [
        ("check", "CHECK ((a > 0))", index("btree (a)")),
        ("exclusion", "EXCLUDE USING gist (a WITH &&)", index("gist (a)")),
        ("primary_key", "PRIMARY KEY (a)", index(None)),
        ("primary_key", "PRIMARY KEY (a)", index("btree (a)", unique=False)),
        ("primary_key", "PRIMARY KEY (a) USING INDEX TABLESPACE x", index("btree (a)")),
        ("unique", "UNIQUE (a)", index("hash (a)")),
    ]:
        assert _attach_clause(constraint(kind, text), idx, "s") is None, text
    assert _attach_clause(constraint("primary_key", "PRIMARY KEY (a)"), None, "s") is None
