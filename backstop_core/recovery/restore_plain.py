"""The minimal restore: one table of a snapshot, recreated under a new name.

It proves a snapshot round-trips; the guided recovery (validation report, copy-back SQL)
builds on it. Everything happens in one transaction, so a failed restore leaves nothing
behind:

1. enum and domain types the table uses are created if they are missing (an existing
   enum must have the same labels);
2. the table is created from the manifest's column definitions: types, collations,
   defaults, NOT NULL, identity and generated columns; a column fed by a sequence of its
   own (serial) gets a new sequence owned by the restored table;
3. each Parquet part is downloaded, its size and sha256 checked before it is read, and
   streamed into `COPY ... FROM STDIN (FORMAT csv)`, converted back to CSV by pyarrow in
   a worker thread (generated columns are left to PostgreSQL to recompute);
4. primary key, unique, exclusion and check constraints, then the other indexes, are
   added after the load (foreign keys are only recorded: they point at other tables);
5. sequences are set to where the snapshot found them.

A partitioned table comes back as one plain table holding all its rows; an UNLOGGED table
stays unlogged.

`table_checksum` recomputes, on any table, the checksum a snapshot records (by the method
snapshots on this server record, or the one given, with the table's columns read from the
catalog); validation instead builds it from the manifest (`validate.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from backstop_core.sidecar.objectstore import ObjectStore, ObjectStoreError
from backstop_core.sidecar.pgtypes import qualified, quote_ident, quote_literal, set_local_sql
from backstop_core.sidecar.snapshot import (
    ColumnDef,
    Manifest,
    PartInfo,
    TableSnapshot,
    TypeDef,
    load_manifest,
    table_checksum,
    table_count_and_checksum,
)

__all__ = [
    "RestoreError",
    "restore_plain",
    "restored_name",
    "table_checksum",
    "table_count_and_checksum",
]

_MAX_IDENT = 63
# Rows per Arrow batch turned into CSV: bounds memory (rows with MB-sized values aside).
_BATCH_ROWS = 16_384


class RestoreError(Exception):
    """The restore could not be done; the message says why."""


def restored_name(table: str, snapshot_id: str) -> str:
    """`<table>__restored_<id>` (DESIGN.md), shortened to fit an identifier."""
    suffix = "__restored_" + snapshot_id.replace(".", "").replace("-", "_").lower()
    return _fit(table + suffix, keep_end=len(suffix))


def _fit(name: str, *, keep_end: int = 0) -> str:
    """`name` cut to PostgreSQL's 63 bytes, with a short hash where it had to be cut."""
    if len(name.encode()) <= _MAX_IDENT:
        return name
    tag = "_" + hashlib.sha256(name.encode()).hexdigest()[:6]
    end = name[len(name) - keep_end :] if keep_end else ""
    head = name[: len(name) - keep_end] if keep_end else name
    room = _MAX_IDENT - len(tag.encode()) - len(end.encode())
    while len(head.encode()) > max(room, 0):
        head = head[:-1]
    return (head + tag + end)[:_MAX_IDENT]


def _derived_name(original: str, source_table: str, target_table: str) -> str:
    """A constraint or index name for the restored table, after the original's."""
    if original.startswith(source_table):
        return _fit(target_table + original[len(source_table) :])
    return _fit(f"{target_table}_{original}")


async def restore_plain(
    conn: asyncpg.Connection,
    store: ObjectStore,
    manifest: Manifest | str,
    table: str,
    target_name: str,
    *,
    work_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Recreate `table` of the snapshot as `target_name` ("schema.table", or a bare name
    in the source table's schema) and load its rows; returns the number of rows loaded."""
    if isinstance(manifest, str):
        manifest = await load_manifest(store, manifest)
    source = manifest.table(table)
    schema, _, name = target_name.rpartition(".")
    target_schema = schema or source.schema
    target = qualified(target_schema, name)
    exists = await conn.fetchval(
        "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
        target_schema,
        name,
    )
    if exists:
        raise RestoreError(f"{target_schema}.{name} already exists; choose another name")
    tmp = Path(tempfile.mkdtemp(prefix="backstop-restore-", dir=work_dir))
    try:
        async with conn.transaction():
            await conn.execute(set_local_sql(manifest.text_settings))
            await _ensure_types(conn, source.types)
            sequences = await _create_table(conn, source, target_schema, name)
            rows = await _load(conn, store, source, target_schema, name, tmp)
            await _add_constraints_and_indexes(conn, source, target, name)
            await _set_sequences(conn, source, target, sequences)
            if rows != source.rows:
                raise RestoreError(
                    f"loaded {rows} rows into {target_schema}.{name}, but the snapshot"
                    f" recorded {source.rows}"
                )
    except asyncpg.PostgresError as exc:
        raise RestoreError(f"restoring {source.name} as {target_schema}.{name}: {exc}") from exc
    except ObjectStoreError as exc:
        raise RestoreError(f"restoring {source.name}: {exc}") from exc
    finally:
        await asyncio.to_thread(_rmtree, tmp)
    return rows


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def _ensure_types(conn: asyncpg.Connection, types: Sequence[TypeDef]) -> None:
    for typedef in types:
        oid = await conn.fetchval("SELECT to_regtype($1)::oid", typedef.name)
        if typedef.kind == "enum":
            if oid is None:
                labels = ", ".join(quote_literal(label) for label in typedef.labels)
                await conn.execute(f"CREATE TYPE {typedef.name} AS ENUM ({labels})")
                continue
            current = await conn.fetchval(
                "SELECT array_agg(enumlabel ORDER BY enumsortorder) FROM pg_enum"
                " WHERE enumtypid = $1",
                oid,
            )
            if tuple(current or ()) != typedef.labels:
                # Order decides comparisons, so a different label list is a different type.
                raise RestoreError(
                    f"type {typedef.name} exists with labels {list(current or ())},"
                    f" the snapshot has {list(typedef.labels)}"
                )
        elif typedef.kind == "domain":
            if oid is not None:
                continue
            ddl = f"CREATE DOMAIN {typedef.name} AS {typedef.base_type}"
            if typedef.collation:
                ddl += f" COLLATE {typedef.collation}"
            if typedef.default is not None:
                ddl += f" DEFAULT {typedef.default}"
            if typedef.not_null:
                ddl += " NOT NULL"
            for check in typedef.checks:
                ddl += f" {check}"
            await conn.execute(ddl)
        elif oid is None:
            raise RestoreError(f"type {typedef.name} does not exist; create it, then restore again")


def _column_sql(column: ColumnDef, default: str | None) -> str:
    sql = f"{quote_ident(column.name)} {column.type}"
    if column.collation:
        sql += f" COLLATE {column.collation}"
    if column.generated is not None:
        sql += f" GENERATED ALWAYS AS ({column.generated}) STORED"
    elif column.identity is not None:
        sql += f" GENERATED {column.identity.upper()} AS IDENTITY"
        if column.sequence is not None:
            s = column.sequence
            sql += (
                f" (START WITH {s.start} INCREMENT BY {s.increment} MINVALUE {s.min_value}"
                f" MAXVALUE {s.max_value} CACHE {s.cache}{' CYCLE' if s.cycle else ''})"
            )
    elif default is not None:
        sql += f" DEFAULT {default}"
    if column.not_null:
        sql += " NOT NULL"
    return sql


async def _create_table(
    conn: asyncpg.Connection, source: TableSnapshot, schema: str, name: str
) -> dict[str, str]:
    """Create the table; returns column -> the restored table's own sequence (serials)."""
    sequences: dict[str, str] = {}
    defaults: dict[str, str | None] = {}
    for column in source.columns:
        default = column.default
        s = column.sequence
        if s is not None and column.identity is None and default is not None:
            # The column's default draws from a sequence the original table owns: give the
            # restored table a sequence of its own rather than share (or miss) that one.
            own = qualified(schema, _fit(f"{name}_{column.name}_seq"))
            await conn.execute(
                f"CREATE SEQUENCE {own} AS {s.data_type} START WITH {s.start}"
                f" INCREMENT BY {s.increment} MINVALUE {s.min_value} MAXVALUE {s.max_value}"
                f" CACHE {s.cache}{' CYCLE' if s.cycle else ''}"
            )
            if s.name in default:
                default = default.replace(s.name, own)
            else:
                default = f"nextval({quote_literal(own)}::regclass)"
            sequences[column.name] = own
        defaults[column.name] = default
    body = ",\n  ".join(_column_sql(c, defaults[c.name]) for c in source.columns)
    unlogged = "UNLOGGED " if source.unlogged else ""
    target = qualified(schema, name)
    await conn.execute(f"CREATE {unlogged}TABLE {target} (\n  {body}\n)")
    for column_name, own in sequences.items():
        await conn.execute(f"ALTER SEQUENCE {own} OWNED BY {target}.{quote_ident(column_name)}")
    return sequences


async def _load(
    conn: asyncpg.Connection,
    store: ObjectStore,
    source: TableSnapshot,
    schema: str,
    name: str,
    tmp: Path,
) -> int:
    target = qualified(schema, name)
    if not source.columns:
        # A table without columns still has rows; there is nothing to read but their number.
        await conn.execute(f"INSERT INTO {target} SELECT FROM generate_series(1, {source.rows})")
        return source.rows
    columns = [c.name for c in source.columns if c.generated is None]
    if not source.parts:
        return 0
    status = await conn.copy_to_table(
        name,
        schema_name=schema,
        source=_csv_chunks(store, source, columns, tmp),
        columns=columns,
        format="csv",
    )
    return int(status.split()[-1])


async def _csv_chunks(
    store: ObjectStore, source: TableSnapshot, columns: Sequence[str], tmp: Path
) -> AsyncIterator[bytes]:
    """The snapshot's rows as CSV, part by part; the next part downloads while this one
    is converted."""
    parts = list(source.parts)
    downloads: dict[int, asyncio.Task[Path]] = {}

    def start(index: int) -> None:
        if index < len(parts) and index not in downloads:
            downloads[index] = asyncio.ensure_future(_fetch_part(store, source, parts[index], tmp))

    try:
        start(0)
        for index in range(len(parts)):
            path = await downloads[index]
            start(index + 1)
            try:
                reader = await asyncio.to_thread(_open_parquet, path)
                for group in range(reader.metadata.num_row_groups):
                    for chunk in await asyncio.to_thread(_row_group_csv, reader, group, columns):
                        yield chunk
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
    finally:
        for task in downloads.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _fetch_part(store: ObjectStore, source: TableSnapshot, part: PartInfo, tmp: Path) -> Path:
    path = tmp / part.name
    await store.get_to_file(source.part_key(part), path)
    size, digest = await asyncio.to_thread(_size_and_sha256, path)
    if size != part.size or digest != part.sha256:
        raise RestoreError(
            f"{source.name}: {part.name} in the store does not match the manifest"
            f" ({size} bytes, sha256 {digest[:12]}…; expected {part.size} bytes,"
            f" sha256 {part.sha256[:12]}…): the snapshot is damaged"
        )
    return path


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def _row_group_csv(reader: Any, group: int, columns: Sequence[str]) -> list[bytes]:
    import pyarrow.csv as pcsv

    table = reader.read_row_group(group, columns=list(columns))
    options = pcsv.WriteOptions(include_header=False, quoting_style="needed")
    chunks: list[bytes] = []
    for batch in table.to_batches(max_chunksize=_BATCH_ROWS):
        out = io.BytesIO()
        # Strings are quoted, so "" is the empty string and a bare empty field is NULL.
        pcsv.write_csv(batch, out, options)
        chunks.append(out.getvalue())
    return chunks


async def _add_constraints_and_indexes(
    conn: asyncpg.Connection, source: TableSnapshot, target: str, target_table: str
) -> None:
    for constraint in source.constraints:
        if constraint.type == "foreign_key":
            continue  # it points at other tables; the manifest keeps it for the record
        name = _derived_name(constraint.name, source.table, target_table)
        await conn.execute(
            f"ALTER TABLE {target} ADD CONSTRAINT {quote_ident(name)} {constraint.definition}"
        )
    for index in source.indexes:
        if index.constraint is not None or index.using is None:
            continue
        name = _derived_name(index.name, source.table, target_table)
        unique = "UNIQUE " if index.unique else ""
        await conn.execute(
            f"CREATE {unique}INDEX {quote_ident(name)} ON {target} USING {index.using}"
        )


async def _set_sequences(
    conn: asyncpg.Connection, source: TableSnapshot, target: str, own: dict[str, str]
) -> None:
    for column in source.columns:
        s = column.sequence
        if s is None or s.last_value is None:
            continue
        if column.identity is not None:
            sequence = await conn.fetchval(
                "SELECT pg_get_serial_sequence($1, $2)", target, column.name
            )
        else:
            sequence = own.get(column.name)
        if sequence is not None:
            await conn.execute(
                "SELECT setval($1::regclass, $2, $3)", sequence, s.last_value, s.is_called
            )
