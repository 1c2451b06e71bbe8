"""Consistent table snapshots: PostgreSQL -> Parquet parts + a JSON manifest in an object store.

One snapshot covers one table, or every table of a recovery group, read in a single
`REPEATABLE READ READ ONLY` transaction, so a group is consistent across its tables. The
tables are locked in ACCESS SHARE mode before the transaction's snapshot is taken: a
concurrent TRUNCATE (which is not MVCC-safe) or DROP waits until the snapshot is done.

Per table the manifest records the definition read from the catalog (columns with exact
types, defaults, NOT NULL, identity and generated columns, owned sequences, collations,
enum and domain types, constraints, indexes), the row count, a checksum computed inside
PostgreSQL on the same MVCC snapshot, and the Parquet parts with size and sha256.

Data path: `COPY (SELECT ...) TO STDOUT (FORMAT csv)` streams into a buffer; whenever the
buffer holds `block_bytes`, the complete rows in it are cut off (a newline outside quotes
ends a row) and converted by pyarrow in a worker thread into one row group of the current
Parquet part (zstd). A part that reaches `part_bytes` is closed, hashed and uploaded while
the next one is written. At most one block is being converted and one part uploaded at a
time, and asyncpg stops reading from the socket while the converter is busy, so memory
stays bounded whatever the table's size (a single row larger than a block is the exception:
it is held whole).

Values: int2/int4/int8 and bool are stored as Arrow integers and booleans, text, varchar
and char as strings; every other type as its exact PostgreSQL text form in a string
column (numeric, floats incl. NaN/Infinity, dates and times incl. infinity, intervals,
arrays, enums, json/jsonb, bytea as hex `\\x...`, network types, money, ...). NULL is a
Parquet null, distinct from the empty string.

Checksum (see `pgtypes.checksum_value`): on PostgreSQL 14 and later `hash-record-sum64/2`,
a 64-bit hash of each row computed by PostgreSQL's own hash functions (columns whose equal
values can differ in text form, such as numeric or float, are hashed by their text form),
summed modulo 2^64; before 14, `md5-row-text-sum64/1`, the md5 of each row's text form.
Order-independent, and what `table_checksum` recomputes on a restored table without
reading Parquet. The manifest records the method, and, per column, the form it was hashed
in (`ColumnDef.checksum_form`), so validation rebuilds the same expression from the
manifest. When the snapshot is given a DSN, the checksum runs on a second connection that
imports the transaction's exported snapshot, in parallel with the COPY.

Layout (DESIGN.md): `<database>/<schema>.<table>/<snapshot-id>/manifest.json` and
`part-00000.parquet`, ... beside it. A group snapshot writes the same manifest document
(it lists every table of the group) into each table's directory, so each table's
directory is self-describing and one sha256 identifies the whole snapshot. Manifests are
written last: a manifest in the store means every part it lists was uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote as _urlquote
from urllib.parse import unquote as _urlunquote

import asyncpg

import backstop_core
from backstop_core import pgconnect
from backstop_core.events import Event
from backstop_core.sidecar.objectstore import (
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
)
from backstop_core.sidecar.pgtypes import (
    CHECKSUM_HASH,
    CHECKSUM_MD5,
    TEXT_SETTINGS,
    ChecksumColumn,
    arrow_type,
    checksum_form,
    checksum_method_for,
    checksum_sql,
    checksum_unavailable,
    checksum_value,
    qualified,
    quote_ident,
    quote_literal,
    set_local_sql,
    storage_for,
)

__all__ = [
    "BLOCK_BYTES",
    "MANIFEST_FORMAT",
    "PART_BYTES",
    "ColumnDef",
    "ConstraintDef",
    "IndexDef",
    "Manifest",
    "ManifestSummary",
    "PartInfo",
    "SequenceDef",
    "SnapshotError",
    "SnapshotProgress",
    "TableRef",
    "TableSnapshot",
    "TypeDef",
    "VerifyResult",
    "database_prefix",
    "list_snapshots",
    "load_manifest",
    "manifest_key",
    "new_snapshot_id",
    "read_checksum_columns",
    "resolve_tables",
    "server_version_num",
    "snapshot_checksum_sql",
    "snapshot_time",
    "table_checksum",
    "table_count_and_checksum",
    "table_directory",
    "take_snapshot",
    "verify_snapshot",
]

MANIFEST_FORMAT = "backstop-snapshot/1"
MANIFEST_NAME = "manifest.json"
BLOCK_BYTES = 8 * 1024 * 1024
PART_BYTES = 64 * 1024 * 1024
LOCK_TIMEOUT_MS = 30_000
_CHECKSUM_LOCK_TIMEOUT_MS = 2_000
_CHECKSUM_START_TIMEOUT_S = 10.0
_PARSE_CHUNK = 1024 * 1024

_ID_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)-[0-9a-f]{8}$")


class SnapshotError(Exception):
    """A snapshot could not be taken, read or verified; the message says why."""


@dataclass(frozen=True, slots=True)
class SnapshotProgress(Event):
    """Published while a table is copied (also an event: see scheduler.py)."""

    snapshot_id: str
    table: str
    rows: int
    bytes_read: int
    parts: int
    rows_estimate: int | None = None


# --------------------------------------------------------------------------- manifest model


@dataclass(frozen=True, slots=True)
class SequenceDef:
    """A sequence that feeds a column (serial or identity), with its state at snapshot time."""

    name: str  # schema-qualified, quoted as PostgreSQL prints it
    data_type: str
    start: int
    increment: int
    min_value: int
    max_value: int
    cache: int
    cycle: bool
    last_value: int | None  # None when it could not be read (no privilege)
    is_called: bool


@dataclass(frozen=True, slots=True)
class ColumnDef:
    name: str
    type: str  # format_type(): exact, with typmods; user types schema-qualified
    type_oid: int
    storage: str  # how Parquet holds it: int16, int32, int64, bool or string (text form)
    not_null: bool = False
    default: str | None = None
    identity: str | None = None  # "always" or "by default"
    generated: str | None = None  # expression of GENERATED ALWAYS AS (...) STORED
    collation: str | None = None  # when not the type's default
    sequence: SequenceDef | None = None
    # How the checksum hashed it (a key of pgtypes.CHECKSUM_FORMS); None when the
    # snapshot's checksum method takes whole rows (md5-row-text-sum64/1).
    checksum_form: str | None = None


@dataclass(frozen=True, slots=True)
class ConstraintDef:
    name: str
    type: str  # primary_key, unique, check, foreign_key, exclusion
    definition: str  # pg_get_constraintdef()
    columns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IndexDef:
    name: str
    definition: str  # pg_get_indexdef()
    unique: bool
    # What follows "USING " in the definition ("btree (a, lower(b)) WHERE ..."), so the
    # index can be rebuilt on another table; None if the definition had an unexpected shape.
    using: str | None
    constraint: str | None = None  # the constraint that owns it (primary key, unique, ...)


@dataclass(frozen=True, slots=True)
class TypeDef:
    """A user-defined type a column depends on (directly, as an array element, or as a
    domain's base type). Listed dependencies first."""

    name: str
    kind: str  # enum, domain, or the pg_type.typtype letter of anything else
    labels: tuple[str, ...] = ()  # enum
    base_type: str | None = None  # domain
    not_null: bool = False  # domain
    default: str | None = None  # domain
    checks: tuple[str, ...] = ()  # domain CHECK constraints
    collation: str | None = None  # domain


@dataclass(frozen=True, slots=True)
class PartInfo:
    name: str  # file name in the table's snapshot directory
    rows: int
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class TableSnapshot:
    name: str  # schema.table, unquoted
    schema: str
    table: str
    kind: str  # "table" or "partitioned"
    directory: str  # key of the snapshot directory, ending in "/"
    columns: tuple[ColumnDef, ...]
    constraints: tuple[ConstraintDef, ...]
    indexes: tuple[IndexDef, ...]
    types: tuple[TypeDef, ...]
    rows: int
    checksum: str
    parts: tuple[PartInfo, ...]
    unlogged: bool = False
    partition_key: str | None = None

    @property
    def size_bytes(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def manifest_key(self) -> str:
        return self.directory + MANIFEST_NAME

    def part_key(self, part: PartInfo) -> str:
        return self.directory + part.name

    @property
    def primary_key(self) -> ConstraintDef | None:
        return next((c for c in self.constraints if c.type == "primary_key"), None)


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    database: str
    group: str | None
    tables: tuple[TableSnapshot, ...]
    started_at: datetime
    finished_at: datetime
    wal_lsn: str | None
    server_version: str
    backstop_version: str
    # What manifests written before the method was recorded per snapshot used.
    checksum_method: str = CHECKSUM_MD5
    text_settings: Mapping[str, str] = field(default_factory=lambda: dict(TEXT_SETTINGS))
    format: str = MANIFEST_FORMAT
    # sha256 of manifest.json as stored; not part of the document itself.
    sha256: str = ""

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def size_bytes(self) -> int:
        return sum(t.size_bytes for t in self.tables)

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)

    @property
    def manifest_keys(self) -> tuple[str, ...]:
        return tuple(t.manifest_key for t in self.tables)

    def table(self, name: str) -> TableSnapshot:
        """The table called `name` (schema.table; a bare name if it is unambiguous)."""
        for t in self.tables:
            if t.name == name:
                return t
        bare = [t for t in self.tables if t.table == name]
        if len(bare) == 1:
            return bare[0]
        raise SnapshotError(
            f"snapshot {self.id} has no table {name!r} (it has {', '.join(self.table_names)})"
        )

    def to_json(self) -> bytes:
        doc = _to_doc(self)
        doc.pop("sha256", None)
        return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != MANIFEST_FORMAT:
                raise SnapshotError(f"unknown manifest format {doc.get('format')!r}")
            manifest = _manifest_from_doc(doc)
        except SnapshotError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SnapshotError(f"not a valid snapshot manifest: {exc}") from None
        return replace(manifest, sha256=hashlib.sha256(data).hexdigest())


def _to_doc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _to_doc(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_to_doc(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_doc(v) for k, v in value.items()}
    return value


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _manifest_from_doc(doc: dict[str, Any]) -> Manifest:
    def build(cls: Any, data: dict[str, Any], **nested: Any) -> Any:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.update(nested)
        return cls(**values)

    tables = []
    for t in doc["tables"]:
        columns = tuple(
            build(
                ColumnDef,
                c,
                sequence=build(SequenceDef, c["sequence"]) if c.get("sequence") else None,
            )
            for c in t["columns"]
        )
        tables.append(
            build(
                TableSnapshot,
                t,
                columns=columns,
                constraints=tuple(
                    build(ConstraintDef, c, columns=tuple(c.get("columns", ())))
                    for c in t["constraints"]
                ),
                indexes=tuple(build(IndexDef, i) for i in t["indexes"]),
                types=tuple(
                    build(
                        TypeDef,
                        ty,
                        labels=tuple(ty.get("labels", ())),
                        checks=tuple(ty.get("checks", ())),
                    )
                    for ty in t["types"]
                ),
                parts=tuple(build(PartInfo, p) for p in t["parts"]),
            )
        )
    manifest: Manifest = build(
        Manifest,
        doc,
        tables=tuple(tables),
        started_at=_parse_time(doc["started_at"]),
        finished_at=_parse_time(doc["finished_at"]),
        text_settings=dict(doc.get("text_settings", TEXT_SETTINGS)),
    )
    return manifest


# --------------------------------------------------------------------------- names and keys


def new_snapshot_id(now: datetime | None = None) -> str:
    """Sortable: UTC time to the microsecond, then 8 random hex digits."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(4)


def snapshot_time(snapshot_id: str) -> datetime:
    """When the snapshot with this id was started."""
    found = _ID_RE.match(snapshot_id)
    if not found:
        raise SnapshotError(f"{snapshot_id!r} is not a snapshot id")
    return datetime.strptime(found.group(1), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)


def _key_part(name: str) -> str:
    # "." separates schema and table in a directory name, "/" separates keys.
    return _urlquote(name, safe="").replace(".", "%2E")


def database_prefix(database: str) -> str:
    """`<database>/`: the prefix that holds every snapshot of a database."""
    return f"{_key_part(database)}/"


def table_directory(database: str, schema: str, table: str) -> str:
    """`<database>/<schema>.<table>/`: the prefix that holds a table's snapshots."""
    return f"{_key_part(database)}/{_key_part(schema)}.{_key_part(table)}/"


def manifest_key(database: str, schema: str, table: str, snapshot_id: str) -> str:
    return f"{table_directory(database, schema, table)}{snapshot_id}/{MANIFEST_NAME}"


def split_table_name(name: str) -> tuple[str, str]:
    """("schema", "table") from "schema.table"; a bare name is in public."""
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else ("public", name)


@dataclass(frozen=True, slots=True)
class TableRef:
    oid: int
    schema: str
    table: str
    kind: str  # "table" or "partitioned"

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def qualified(self) -> str:
        return qualified(self.schema, self.table)


_EXACT_SQL = """
SELECT c.oid::int, n.nspname, c.relname, c.relkind::text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2
"""

_PARSED_SQL = """
SELECT c.oid::int, n.nspname, c.relname, c.relkind::text
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = pg_catalog.to_regclass($1)
"""


async def resolve_tables(
    conn: asyncpg.Connection, names: Sequence[str], *, missing_ok: bool = False
) -> list[TableRef]:
    """Find each named table: "schema.table" matched exactly first, else as SQL would read
    the name on the connection's search path. Raises SnapshotError for a missing table or
    one that is not a table, unless `missing_ok` (then it is left out)."""
    found: dict[int, TableRef] = {}
    for name in names:
        schema, dot, table = name.partition(".")
        row = await conn.fetchrow(_EXACT_SQL, schema, table) if dot else None
        if row is None:
            try:
                row = await conn.fetchrow(_PARSED_SQL, name)
            except asyncpg.PostgresError:
                row = None  # not even a valid name
        if row is None:
            if missing_ok:
                continue
            raise SnapshotError(f"table {name} does not exist")
        oid, nsp, rel, relkind = row
        if relkind not in ("r", "p"):
            raise SnapshotError(f"{nsp}.{rel} is not a table (relkind {relkind})")
        found.setdefault(oid, TableRef(oid, nsp, rel, "partitioned" if relkind == "p" else "table"))
    return list(found.values())


# --------------------------------------------------------------------------- catalog reads

_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.atttypid::int AS type_oid,
       a.attnotnull, a.attidentity::text, a.attgenerated::text,
       pg_get_expr(d.adbin, d.adrelid) AS default_expr,
       CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END AS collation,
       pg_get_serial_sequence(quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                              a.attname) AS seq
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_SEQUENCE_SQL = """
SELECT format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
       s.seqcache, s.seqcycle, has_sequence_privilege(s.seqrelid, 'SELECT') AS readable
FROM pg_sequence s WHERE s.seqrelid = $1::regclass
"""

_CONSTRAINTS_SQL = """
SELECT con.conname, con.contype::text, pg_get_constraintdef(con.oid) AS def,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
             ORDER BY k.ord) AS columns
FROM pg_constraint con
WHERE con.conrelid = $1 AND con.contype IN ('p', 'u', 'c', 'f', 'x')
ORDER BY CASE con.contype WHEN 'p' THEN 0 WHEN 'u' THEN 1 WHEN 'x' THEN 2 WHEN 'c' THEN 3
         ELSE 4 END, con.conname
"""

_INDEXES_SQL = """
SELECT ic.relname, pg_get_indexdef(i.indexrelid) AS def, i.indisunique,
       (SELECT con.conname FROM pg_constraint con
         WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid
           AND con.contype IN ('p', 'u', 'x') LIMIT 1) AS constraint_name
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = $1
ORDER BY ic.relname
"""

_TABLE_SQL = """
SELECT c.relpersistence::text, c.reltuples::bigint,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END
FROM pg_class c WHERE c.oid = $1
"""

_TYPE_SQL = """
SELECT t.oid::int, format_type(t.oid, NULL) AS name, t.typtype::text, t.typcategory::text,
       t.typelem::int, t.typbasetype::int, t.typtypmod, t.typnotnull, t.typdefault,
       n.nspname,
       CASE WHEN t.typcollation <> 0 AND t.typbasetype <> 0
             AND t.typcollation <> (SELECT b.typcollation FROM pg_type b
                                    WHERE b.oid = t.typbasetype)
            THEN (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname)
                  FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace
                  WHERE co.oid = t.typcollation) END AS collation
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid = $1
"""

_CONSTRAINT_TYPES = {
    "p": "primary_key",
    "u": "unique",
    "c": "check",
    "f": "foreign_key",
    "x": "exclusion",
}


async def _read_types(conn: asyncpg.Connection, type_oids: Sequence[int]) -> tuple[TypeDef, ...]:
    """User-defined types the columns depend on, dependencies first."""
    done: dict[int, TypeDef | None] = {}

    async def visit(oid: int) -> None:
        if oid in done or oid == 0:
            return
        done[oid] = None  # guards against cycles
        row = await conn.fetchrow(_TYPE_SQL, oid)
        if row is None:
            return
        _oid, name, typtype, category, elem, base, typmod, notnull, default, nsp, coll = row
        if category == "A" and elem:
            await visit(elem)
            return
        if base:
            await visit(base)
        if nsp in ("pg_catalog", "information_schema"):
            return
        if typtype == "e":
            labels = await conn.fetchval(
                "SELECT array_agg(enumlabel ORDER BY enumsortorder) FROM pg_enum"
                " WHERE enumtypid = $1",
                oid,
            )
            done.pop(oid)
            done[oid] = TypeDef(name, "enum", labels=tuple(labels or ()))
        elif typtype == "d":
            checks = await conn.fetchval(
                "SELECT coalesce(array_agg(pg_get_constraintdef(oid) ORDER BY conname), '{}')"
                " FROM pg_constraint WHERE contypid = $1 AND contype = 'c'",
                oid,
            )
            base_name = await conn.fetchval("SELECT format_type($1, $2)", base, typmod)
            done.pop(oid)
            done[oid] = TypeDef(
                name,
                "domain",
                base_type=base_name,
                not_null=notnull,
                default=default,
                checks=tuple(checks),
                collation=coll,
            )
        else:
            done.pop(oid)
            done[oid] = TypeDef(name, typtype)

    for oid in type_oids:
        await visit(oid)
    return tuple(t for t in done.values() if t is not None)


def _index_using(definition: str, name: str, schema: str, table: str) -> str | None:
    # pg_get_indexdef prints: CREATE [UNIQUE] INDEX name ON [ONLY] schema.table USING ...
    # with identifiers quoted only where needed; compare against the names as it prints them.
    for head in (f"CREATE UNIQUE INDEX {name} ON ", f"CREATE INDEX {name} ON "):
        if not definition.startswith(head):
            continue
        rest = definition[len(head) :]
        rest = rest.removeprefix("ONLY ")
        target = f"{schema}.{table} USING "
        if rest.startswith(target):
            return rest[len(target) :]
    return None


async def _read_definition(
    conn: asyncpg.Connection, ref: TableRef
) -> tuple[list[ColumnDef], list[ConstraintDef], list[IndexDef], tuple[TypeDef, ...], Any]:
    columns: list[ColumnDef] = []
    for row in await conn.fetch(_COLUMNS_SQL, ref.oid):
        name, type_, type_oid, not_null, identity, generated, default, collation, seq = row
        sequence = None
        if seq is not None:
            sequence = await _read_sequence(conn, seq)
        columns.append(
            ColumnDef(
                name=name,
                type=type_,
                type_oid=type_oid,
                storage=storage_for(type_oid),
                not_null=not_null,
                default=None if generated or identity else default,
                identity={"a": "always", "d": "by default"}.get(identity or ""),
                generated=default if generated == "s" else None,
                collation=collation,
                sequence=sequence,
            )
        )
    constraints = [
        ConstraintDef(name, _CONSTRAINT_TYPES[contype], definition, tuple(cols))
        for name, contype, definition, cols in await conn.fetch(_CONSTRAINTS_SQL, ref.oid)
    ]
    q_schema, q_table = await conn.fetchrow(
        "SELECT quote_ident($1), quote_ident($2)", ref.schema, ref.table
    )
    indexes = []
    for name, definition, unique, constraint in await conn.fetch(_INDEXES_SQL, ref.oid):
        q_name = await conn.fetchval("SELECT quote_ident($1)", name)
        indexes.append(
            IndexDef(
                name=name,
                definition=definition,
                unique=unique,
                using=_index_using(definition, q_name, q_schema, q_table),
                constraint=constraint,
            )
        )
    types = await _read_types(conn, [c.type_oid for c in columns])
    table_row = await conn.fetchrow(_TABLE_SQL, ref.oid)
    return columns, constraints, indexes, types, table_row


async def _read_sequence(conn: asyncpg.Connection, name: str) -> SequenceDef | None:
    row = await conn.fetchrow(_SEQUENCE_SQL, name)
    if row is None:
        return None
    data_type, start, increment, min_value, max_value, cache, cycle, readable = row
    last_value: int | None = None
    is_called = False
    if readable:
        # A sequence is read outside MVCC: this is its state now, not at the snapshot.
        state = await conn.fetchrow(f"SELECT last_value, is_called FROM {name}")
        if state is not None:
            last_value, is_called = state
    return SequenceDef(
        name=name,
        data_type=data_type,
        start=start,
        increment=increment,
        min_value=min_value,
        max_value=max_value,
        cache=cache,
        cycle=cycle,
        last_value=last_value,
        is_called=is_called,
    )


_CHECKSUM_COLUMNS_SQL = """
WITH RECURSIVE walk(attnum, attname, typ, is_array, depth) AS (
    SELECT a.attnum, a.attname, a.atttypid, false, 0
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
    -- Through a domain to its base type, through an array type to its element type.
    SELECT w.attnum, w.attname,
           CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.typelem END,
           w.is_array OR t.typtype <> 'd', w.depth + 1
    FROM walk w JOIN pg_catalog.pg_type t ON t.oid = w.typ
    WHERE w.depth < 16
      AND (t.typtype = 'd'
           -- A true array type is its element type's typarray (not int2vector, oidvector).
           OR (t.typelem <> 0 AND t.typlen = -1
               AND (SELECT e.typarray FROM pg_catalog.pg_type e WHERE e.oid = t.typelem)
                   = t.oid))
)
SELECT DISTINCT ON (attnum) attname, typ::int AS base_oid, is_array
FROM walk ORDER BY attnum, depth DESC
"""


async def read_checksum_columns(
    conn: asyncpg.Connection, rel_oid: int
) -> tuple[ChecksumColumn, ...]:
    """The live columns of a table, in attnum order, each with the form
    `hash-record-sum64/2` hashes it in (from its type, domains and arrays looked through)."""
    rows = await conn.fetch(_CHECKSUM_COLUMNS_SQL, rel_oid)
    return tuple(
        ChecksumColumn(r["attname"], checksum_form(r["base_oid"], r["is_array"])) for r in rows
    )


async def server_version_num(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SHOW server_version_num"))


async def _checksum(
    conn: asyncpg.Connection,
    ref: TableRef,
    method: str,
    columns: Sequence[ChecksumColumn] = (),
) -> tuple[int, str]:
    sql = checksum_sql(
        ref.schema, ref.table, only=ref.kind == "table", method=method, columns=columns
    )
    # fetch, not fetchrow: a row limit would keep PostgreSQL from using parallel workers.
    (row,) = await conn.fetch(sql)
    return int(row["n"]), checksum_value(row["s"])


async def table_checksum(conn: asyncpg.Connection, table: str, *, method: str | None = None) -> str:
    """The checksum of `table` as it is now, by `method` (default: the one snapshots on
    this server record), to compare with a snapshot's."""
    return (await table_count_and_checksum(conn, table, method=method))[1]


async def table_count_and_checksum(
    conn: asyncpg.Connection, table: str, *, method: str | None = None
) -> tuple[int, str]:
    """Row count and checksum of `table` (any table: its columns are read from the
    catalog) by `method`, default the one snapshots on this server record. Raises
    SnapshotError when the server cannot compute `method`."""
    (ref,) = await resolve_tables(conn, [table])
    version = await server_version_num(conn)
    method = method or checksum_method_for(version)
    problem = checksum_unavailable(method, version)
    if problem is not None:
        raise SnapshotError(problem)

    async def compute() -> tuple[int, str]:
        await conn.execute(set_local_sql())
        columns = await read_checksum_columns(conn, ref.oid) if method == CHECKSUM_HASH else ()
        return await _checksum(conn, ref, method, columns)

    if conn.is_in_transaction():
        # The caller's transaction: its snapshot, and the output settings stay set in it.
        return await compute()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await compute()


def snapshot_checksum_sql(
    manifest: Manifest,
    table: TableSnapshot,
    schema: str,
    name: str,
    server_version: int,
) -> str:
    """The query that recomputes `table`'s checksum, by the manifest's method, over a
    restored copy of it at `schema`.`name` (same columns and types), on a server of
    `server_version` (server_version_num). Raises SnapshotError, with the reason, when
    that cannot be done: an unknown method, one the server lacks, or a manifest that does
    not say how a column was hashed."""
    method = manifest.checksum_method
    problem = checksum_unavailable(method, server_version)
    if problem is not None:
        raise SnapshotError(problem)
    columns: list[ChecksumColumn] = []
    if method == CHECKSUM_HASH:
        for column in table.columns:
            if column.checksum_form is None:
                raise SnapshotError(
                    f"the manifest does not record how column {column.name!r} of"
                    f" {table.name} was hashed ({method} needs it)"
                )
            columns.append(ChecksumColumn(column.name, column.checksum_form))
    try:
        return checksum_sql(schema, name, only=True, method=method, columns=columns)
    except ValueError as exc:
        raise SnapshotError(f"{table.name}: {exc}") from None


# --------------------------------------------------------------------------- the data path


def _row_boundary(buf: bytes | bytearray) -> int:
    """Index just past the last complete CSV row in `buf` (which starts at a row), or 0.

    A newline ends a row unless it lies inside a quoted value, i.e. after an odd number of
    quote characters (PostgreSQL doubles quotes inside quoted values, so parity tells).
    """
    pos = buf.rfind(b"\n")
    if pos < 0:
        return 0
    quotes = buf.count(b'"', 0, pos)
    while quotes % 2:
        earlier = buf.rfind(b"\n", 0, pos)
        if earlier < 0:
            return 0
        quotes -= buf.count(b'"', earlier, pos)
        pos = earlier
    return pos + 1


@dataclass(frozen=True, slots=True)
class _ClosedPart:
    info: PartInfo
    path: Path


class _PartWriter:
    """CSV blocks -> Parquet parts. Runs in a worker thread, one call at a time."""

    def __init__(self, columns: Sequence[ColumnDef], work_dir: Path, part_bytes: int) -> None:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        self._pa = pa
        self._pcsv = pcsv
        names = [c.name for c in columns]
        types = {c.name: arrow_type(c.storage) for c in columns}
        self._schema = pa.schema(
            [pa.field(c.name, types[c.name], metadata={"pg_type": c.type}) for c in columns]
        )
        self._names = names
        # A row of a single NULL column is an empty line: it is a row, not a blank line.
        self._parse = pcsv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False)
        self._convert = pcsv.ConvertOptions(
            column_types=types,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,  # "" is the empty string, bare empty is NULL
            true_values=["t"],
            false_values=["f"],
        )
        self._work_dir = work_dir
        self._part_bytes = part_bytes
        self._writer: Any = None
        self._sink: Any = None
        self._path: Path | None = None
        self._part_rows = 0
        self._index = 0
        self.rows = 0

    def _read(self, block: bytes | memoryview, block_size: int) -> Any:
        options = self._pcsv.ReadOptions(column_names=self._names, block_size=block_size)
        return self._pcsv.read_csv(
            self._pa.BufferReader(self._pa.py_buffer(block)),
            read_options=options,
            parse_options=self._parse,
            convert_options=self._convert,
        )

    def write_block(self, block: bytes | memoryview, has_cr: bool) -> _ClosedPart | None:
        """Convert one block of whole CSV rows; `has_cr`: it contains a carriage return."""
        # Chunks of 1 MB are parsed in parallel, but a row longer than a chunk must be parsed
        # in one piece: pyarrow says so ("straddling"), except when a quoted value's CR LF
        # falls on a chunk boundary, where it silently drops the LF. A raw CR only occurs
        # inside quoted values (CSV from COPY ends rows with LF alone): then, one piece.
        whole = len(block) + 1
        if has_cr:
            table = self._read(block, whole)
        else:
            try:
                table = self._read(block, min(whole, _PARSE_CHUNK))
            except self._pa.ArrowInvalid as exc:
                if "straddl" not in str(exc):
                    raise
                table = self._read(block, whole)
        if table.num_rows == 0:
            return None
        if self._writer is None:
            import pyarrow.parquet as pq

            self._path = self._work_dir / f"part-{self._index:05d}.parquet"
            # Unbuffered, so tell() is the part's size so far.
            self._sink = self._pa.OSFile(str(self._path), "wb")
            # Dictionaries rarely pay off for mostly distinct values, and zstd finds the
            # repeats anyway: without them writing is faster and the files smaller.
            self._writer = pq.ParquetWriter(
                self._sink,
                self._schema,
                compression="zstd",
                use_dictionary=False,
                write_statistics=False,
            )
        self._writer.write_table(table.cast(self._schema), row_group_size=table.num_rows)
        self._part_rows += table.num_rows
        self.rows += table.num_rows
        if self._sink.tell() >= self._part_bytes:
            return self.close_part()
        return None

    def close_part(self) -> _ClosedPart | None:
        if self._writer is None or self._path is None:
            return None
        self._writer.close()
        self._sink.close()
        self._writer = None
        path, self._path = self._path, None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        info = PartInfo(path.name, self._part_rows, path.stat().st_size, digest.hexdigest())
        self._part_rows = 0
        self._index += 1
        return _ClosedPart(info, path)

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(Exception):
                self._sink.close()
            self._writer = None


class _TableCopy:
    """Streams one table's COPY output through _PartWriter into the store."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        directory: str,
        writer: _PartWriter,
        block_bytes: int,
        progress: Callable[[int, int, int], None],
    ) -> None:
        self._store = store
        self._directory = directory
        self._writer = writer
        self._block_bytes = block_bytes
        self._progress = progress
        self._chunks: list[bytes] = []
        self._size = 0
        self._next_cut = block_bytes
        self._converting: asyncio.Future[_ClosedPart | None] | None = None
        self._uploading: asyncio.Task[None] | None = None
        self.parts: list[PartInfo] = []
        self.bytes_read = 0

    async def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        self.bytes_read += len(chunk)
        if self._size < self._next_cut:
            return
        data = b"".join(self._chunks)  # the one copy each byte gets
        view = memoryview(data)
        start = 0
        # A read can bring far more than a block: cut it into blocks at row boundaries, so
        # parts stay near their size whatever the network delivers at once.
        while len(data) - start >= self._block_bytes:
            cut = _row_boundary(data[start : start + self._block_bytes])
            if not cut:
                cut = _row_boundary(data[start:])
                if not cut:
                    break
            await self._convert(
                view[start : start + cut], data.find(b"\r", start, start + cut) >= 0
            )
            start += cut
        if start == 0:
            # A row longer than a block: look again once another block has arrived.
            self._chunks = [data]
            self._next_cut = self._size + self._block_bytes
            return
        self._chunks = [data[start:]] if start < len(data) else []
        self._size = len(data) - start
        self._next_cut = self._block_bytes

    async def _convert(self, block: bytes | memoryview, has_cr: bool) -> None:
        await self._settle_conversion()
        self._converting = asyncio.ensure_future(
            asyncio.to_thread(self._writer.write_block, block, has_cr)
        )

    async def _settle_conversion(self) -> None:
        if self._converting is None:
            return
        closed = await self._converting
        self._converting = None
        if closed is not None:
            await self._upload(closed)
        self._progress(self._writer.rows, self.bytes_read, len(self.parts))

    async def _upload(self, closed: _ClosedPart) -> None:
        if self._uploading is not None:
            await self._uploading  # one upload at a time bounds the local disk used
        self.parts.append(closed.info)

        async def put() -> None:
            try:
                await self._store.put_file(self._directory + closed.info.name, closed.path)
            finally:
                with contextlib.suppress(OSError):
                    closed.path.unlink()

        self._uploading = asyncio.ensure_future(put())

    async def finish(self) -> None:
        if self._chunks:
            block = b"".join(self._chunks)
            self._chunks, self._size = [], 0
            if not block.endswith(b"\n"):
                raise SnapshotError("COPY output ended in the middle of a row")
            await self._convert(block, b"\r" in block)
        await self._settle_conversion()
        closed = await asyncio.to_thread(self._writer.close_part)
        if closed is not None:
            await self._upload(closed)
        if self._uploading is not None:
            await self._uploading
            self._uploading = None

    async def abort(self) -> None:
        for task in (self._converting, self._uploading):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        await asyncio.to_thread(self._writer.abort)


# --------------------------------------------------------------------------- take_snapshot


def _select_sql(ref: TableRef, columns: Sequence[ColumnDef]) -> str:
    cols = ", ".join(quote_ident(c.name) for c in columns)
    only = "ONLY " if ref.kind == "table" else ""
    return f"SELECT {cols} FROM {only}{ref.qualified}"


async def _checksums_in_parallel(
    dsn: str,
    exported: str,
    refs: Sequence[TableRef],
    method: str,
    hashed: Mapping[int, Sequence[ChecksumColumn]],
    locked: asyncio.Event,
) -> dict[int, tuple[int, str]]:
    """The checksums on a second connection that shares the snapshot's MVCC snapshot.

    It locks the tables before it reports `locked`, and the snapshot's transaction does
    not start copying before that: otherwise a TRUNCATE queued in between would run as
    soon as the copy commits, and this connection, reading after it, would see the
    emptied table (TRUNCATE is not MVCC-safe)."""
    conn = await pgconnect.connect(dsn, purpose="snapshot")
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute(f"SET TRANSACTION SNAPSHOT {quote_literal(exported)}")
            await conn.execute(
                set_local_sql(
                    {
                        "lock_timeout": str(_CHECKSUM_LOCK_TIMEOUT_MS),
                        # It runs beside the COPY, whose backend and conversion keep the
                        # CPUs busy: parallel workers would take CPU from the COPY (on 2
                        # cores they made the snapshot slower), and one process computes
                        # the checksum faster than the COPY path reads the table anyway.
                        "max_parallel_workers_per_gather": "0",
                    }
                )
            )
            await conn.execute(
                "LOCK TABLE " + ", ".join(r.qualified for r in refs) + " IN ACCESS SHARE MODE"
            )
            locked.set()
            return {
                ref.oid: await _checksum(conn, ref, method, hashed.get(ref.oid, ())) for ref in refs
            }
    finally:
        await conn.close()


async def _start_parallel_checksums(
    dsn: str,
    exported: str,
    refs: Sequence[TableRef],
    method: str,
    hashed: Mapping[int, Sequence[ChecksumColumn]],
) -> asyncio.Task[dict[int, tuple[int, str]]] | None:
    """The checksum task once it holds its locks; None if it cannot get there (a conflicting
    lock request queued meanwhile, or no second connection): then the snapshot's own
    transaction computes the checksums after the copy."""
    locked = asyncio.Event()
    task = asyncio.create_task(_checksums_in_parallel(dsn, exported, refs, method, hashed, locked))
    waiter = asyncio.ensure_future(locked.wait())
    await asyncio.wait(
        {waiter, task}, timeout=_CHECKSUM_START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    waiter.cancel()
    if locked.is_set():
        return task
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None


async def take_snapshot(
    conn_or_dsn: asyncpg.Connection | str,
    store: ObjectStore,
    tables: Sequence[str],
    *,
    prefix_db: str | None = None,
    group: str | None = None,
    snapshot_id: str | None = None,
    block_bytes: int = BLOCK_BYTES,
    part_bytes: int = PART_BYTES,
    on_progress: Callable[[SnapshotProgress], None] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> Manifest:
    """Snapshot `tables` in one consistent transaction; returns the manifest as stored
    (its `sha256` is that of manifest.json). `prefix_db` names the database in the object
    layout (default: current_database()). Raises SnapshotError; a failed snapshot leaves
    no manifest behind, and its parts are removed."""
    if not tables:
        raise SnapshotError("no table to snapshot")
    if not isinstance(conn_or_dsn, str) and conn_or_dsn.is_in_transaction():
        raise SnapshotError("the connection is inside a transaction; a snapshot needs its own")
    snapshot_id = snapshot_id or new_snapshot_id()
    own_conn = isinstance(conn_or_dsn, str)
    try:
        conn = (
            await pgconnect.connect(conn_or_dsn, purpose="snapshot")
            if isinstance(conn_or_dsn, str)
            else conn_or_dsn
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SnapshotError(f"cannot connect to PostgreSQL: {exc}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f"backstop-{snapshot_id}-", dir=work_dir))
    directories: list[str] = []
    try:
        return await _take(
            conn,
            conn_or_dsn if isinstance(conn_or_dsn, str) else None,
            store,
            tables,
            prefix_db=prefix_db,
            group=group,
            snapshot_id=snapshot_id,
            block_bytes=block_bytes,
            part_bytes=part_bytes,
            on_progress=on_progress,
            work_dir=tmp,
            lock_timeout_ms=lock_timeout_ms,
            directories=directories,
        )
    except BaseException as exc:
        for directory in directories:
            with contextlib.suppress(Exception):
                await asyncio.shield(store.delete_prefix(directory))
        if isinstance(exc, SnapshotError) or not isinstance(exc, Exception):
            raise
        detail = str(exc) if isinstance(exc, ObjectStoreError) else f"{type(exc).__name__}: {exc}"
        raise SnapshotError(f"snapshot of {', '.join(tables)} failed: {detail}") from exc
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, ignore_errors=True)
        if own_conn:
            with contextlib.suppress(Exception):
                await conn.close()


async def _take(
    conn: asyncpg.Connection,
    dsn: str | None,
    store: ObjectStore,
    names: Sequence[str],
    *,
    prefix_db: str | None,
    group: str | None,
    snapshot_id: str,
    block_bytes: int,
    part_bytes: int,
    on_progress: Callable[[SnapshotProgress], None] | None,
    work_dir: Path,
    lock_timeout_ms: int,
    directories: list[str],
) -> Manifest:
    refs = await resolve_tables(conn, names)
    database = prefix_db or await conn.fetchval("SELECT current_database()")
    server_version = await conn.fetchval("SHOW server_version")
    method = checksum_method_for(await server_version_num(conn))
    for ref in refs:
        directories.append(f"{table_directory(database, ref.schema, ref.table)}{snapshot_id}/")
    checksum_task: asyncio.Task[dict[int, tuple[int, str]]] | None = None
    results: list[TableSnapshot] = []
    sums: dict[int, tuple[int, str]] = {}
    hashed: dict[int, tuple[ChecksumColumn, ...]] = {}
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # Settings and locks come before the first query, which takes the snapshot: a
            # TRUNCATE or DROP cannot slip in between the snapshot and the first read.
            await conn.execute(set_local_sql({"lock_timeout": str(lock_timeout_ms)}))
            await conn.execute(
                "LOCK TABLE " + ", ".join(r.qualified for r in refs) + " IN ACCESS SHARE MODE"
            )
            started_at = datetime.now(UTC)
            in_recovery, wal_lsn = await conn.fetchrow(
                "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery()"
                " THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text"
            )
            if method == CHECKSUM_HASH:
                # Read under the locks: the columns cannot change before the checksum runs.
                hashed = {ref.oid: await read_checksum_columns(conn, ref.oid) for ref in refs}
            if dsn is not None and not in_recovery:
                exported = await conn.fetchval("SELECT pg_export_snapshot()")
                checksum_task = await _start_parallel_checksums(dsn, exported, refs, method, hashed)
            for ref, directory in zip(refs, directories, strict=True):
                results.append(
                    await _copy_table(
                        conn,
                        store,
                        ref,
                        directory,
                        snapshot_id=snapshot_id,
                        block_bytes=block_bytes,
                        part_bytes=part_bytes,
                        on_progress=on_progress,
                        work_dir=work_dir,
                    )
                )
            if checksum_task is None:
                sums = {
                    ref.oid: await _checksum(conn, ref, method, hashed.get(ref.oid, ()))
                    for ref in refs
                }
        if checksum_task is not None:
            sums = await checksum_task
    finally:
        if checksum_task is not None and not checksum_task.done():
            checksum_task.cancel()
            with contextlib.suppress(BaseException):
                await checksum_task
    finished_at = datetime.now(UTC)
    tables: list[TableSnapshot] = []
    for ref, copied in zip(refs, results, strict=True):
        count, checksum = sums[ref.oid]
        if count != copied.rows:
            raise SnapshotError(
                f"{ref.name}: COPY produced {copied.rows} rows but the table holds {count}"
                " in the same snapshot"
            )
        tables.append(
            replace(
                copied,
                checksum=checksum,
                columns=_with_checksum_forms(ref, copied.columns, hashed.get(ref.oid)),
            )
        )
    manifest = Manifest(
        id=snapshot_id,
        database=database,
        group=group,
        tables=tuple(tables),
        started_at=started_at,
        finished_at=finished_at,
        wal_lsn=wal_lsn,
        server_version=server_version,
        backstop_version=backstop_core.__version__,
        checksum_method=method,
    )
    data = manifest.to_json()
    for table in tables:
        await store.put(table.manifest_key, data)
    return replace(manifest, sha256=hashlib.sha256(data).hexdigest())


def _with_checksum_forms(
    ref: TableRef,
    columns: tuple[ColumnDef, ...],
    hashed: Sequence[ChecksumColumn] | None,
) -> tuple[ColumnDef, ...]:
    """The column definitions with the form each was hashed in, for validation to rebuild
    the same checksum from the manifest."""
    if hashed is None:
        return columns
    if [c.name for c in columns] != [h.name for h in hashed]:
        raise SnapshotError(f"{ref.name}: its columns changed while the snapshot was taken")
    return tuple(replace(c, checksum_form=h.form) for c, h in zip(columns, hashed, strict=True))


async def _copy_table(
    conn: asyncpg.Connection,
    store: ObjectStore,
    ref: TableRef,
    directory: str,
    *,
    snapshot_id: str,
    block_bytes: int,
    part_bytes: int,
    on_progress: Callable[[SnapshotProgress], None] | None,
    work_dir: Path,
) -> TableSnapshot:
    columns, constraints, indexes, types, table_row = await _read_definition(conn, ref)
    persistence, reltuples, partition_key = table_row
    estimate = int(reltuples) if reltuples is not None and reltuples >= 0 else None
    table_dir = work_dir / str(ref.oid)
    table_dir.mkdir()
    writer = _PartWriter(columns, table_dir, part_bytes)
    last_report = 0.0

    def progress(rows: int, bytes_read: int, parts: int) -> None:
        nonlocal last_report
        now = time.monotonic()
        if on_progress is None or now - last_report < 0.25:
            return
        last_report = now
        on_progress(SnapshotProgress(snapshot_id, ref.name, rows, bytes_read, parts, estimate))

    copier = _TableCopy(
        store=store,
        directory=directory,
        writer=writer,
        block_bytes=block_bytes,
        progress=progress,
    )
    try:
        if columns:
            await conn.copy_from_query(_select_sql(ref, columns), output=copier.feed, format="csv")
        await copier.finish()
    except BaseException:
        await copier.abort()
        raise
    if on_progress is not None:
        on_progress(
            SnapshotProgress(
                snapshot_id, ref.name, writer.rows, copier.bytes_read, len(copier.parts), estimate
            )
        )
    rows = writer.rows
    if not columns:
        rows = await conn.fetchval(f"SELECT count(*) FROM {ref.qualified}")
    return TableSnapshot(
        name=ref.name,
        schema=ref.schema,
        table=ref.table,
        kind=ref.kind,
        directory=directory,
        columns=tuple(columns),
        constraints=tuple(constraints),
        indexes=tuple(indexes),
        types=types,
        rows=rows,
        checksum="",
        parts=tuple(copier.parts),
        unlogged=persistence == "u",
        partition_key=partition_key,
    )


# --------------------------------------------------------------------------- reading back


async def load_manifest(store: ObjectStore, key: str) -> Manifest:
    """Read and parse the manifest at `key` (its `sha256` is computed from the bytes)."""
    try:
        data = await store.get(key)
    except ObjectNotFound:
        raise SnapshotError(f"no manifest at {store.describe()}/{key}") from None
    try:
        return Manifest.from_json(data)
    except SnapshotError as exc:
        raise SnapshotError(f"{store.describe()}/{key}: {exc}") from None


@dataclass(frozen=True, slots=True)
class VerifyResult:
    snapshot_id: str
    manifest_sha256: str
    problems: tuple[str, ...]
    parts_checked: int
    bytes_checked: int
    hashed: bool  # every part's sha256 was recomputed

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_snapshot(
    store: ObjectStore,
    manifest: Manifest | str,
    *,
    full: bool = False,
    listings: Mapping[str, Sequence[ObjectInfo]] | None = None,
) -> VerifyResult:
    """Check that the manifest in every table directory and every part exist with the
    recorded sizes (one listing per table); with `full`, also download every part and
    compare its sha256. `listings` (directory -> objects) saves listing a directory again."""
    if isinstance(manifest, str):
        manifest = await load_manifest(store, manifest)
    problems: list[str] = []
    parts = 0
    size = 0
    for table in manifest.tables:
        if listings is not None and table.directory in listings:
            objects = listings[table.directory]
        else:
            objects = await store.list(table.directory)
        sizes = {o.key: o.size for o in objects}
        if table.manifest_key not in sizes:
            problems.append(f"{table.name}: {MANIFEST_NAME} is missing")
        for part in table.parts:
            key = table.part_key(part)
            found = sizes.get(key)
            if found is None:
                problems.append(f"{table.name}: {part.name} is missing")
            elif found != part.size:
                problems.append(
                    f"{table.name}: {part.name} has {found} bytes, the manifest says {part.size}"
                )
            else:
                parts += 1
                size += found
    if full and not problems:
        for table in manifest.tables:
            for part in table.parts:
                digest = await _sha256_of(store, table.part_key(part))
                if digest != part.sha256:
                    problems.append(f"{table.name}: {part.name} does not match its sha256")
    return VerifyResult(
        manifest.id, manifest.sha256, tuple(problems), parts, size, full and not problems
    )


async def _sha256_of(store: ObjectStore, key: str) -> str:
    fd, name = tempfile.mkstemp(prefix="backstop-verify-")
    os.close(fd)
    try:
        await store.get_to_file(key, name)
        return await asyncio.to_thread(_file_sha256, Path(name))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ManifestSummary:
    """One table's entry of one snapshot, as found in the store."""

    id: str
    database: str
    table: str
    group: str | None
    group_tables: tuple[str, ...]
    manifest_key: str
    manifest_sha256: str
    started_at: datetime
    finished_at: datetime
    rows: int
    size_bytes: int
    wal_lsn: str | None
    # Every part of this table is in the listing with its recorded size.
    complete: bool
    problems: tuple[str, ...] = ()

    @property
    def directory(self) -> str:
        return self.manifest_key.rpartition("/")[0] + "/"


async def list_snapshots(
    store: ObjectStore,
    database: str,
    table: str | None = None,
    *,
    concurrency: int = 8,
) -> list[ManifestSummary]:
    """Snapshots in the store, newest first: of one table ("schema.table") or of all tables
    of `database`. Manifests that cannot be read are reported with `complete=False`."""
    if table is None:
        prefix = database_prefix(database)
    else:
        prefix = table_directory(database, *split_table_name(table))
    objects = await store.list(prefix)
    by_dir: dict[str, list[ObjectInfo]] = {}
    for info in objects:
        directory = info.key.rpartition("/")[0]
        by_dir.setdefault(directory + "/", []).append(info)
    manifests = [d for d, items in by_dir.items() if any(i.key == d + MANIFEST_NAME for i in items)]
    limit = asyncio.Semaphore(concurrency)

    async def summarize(directory: str) -> ManifestSummary | None:
        snapshot_id = directory.rstrip("/").rpartition("/")[2]
        key = directory + MANIFEST_NAME
        async with limit:
            try:
                manifest = await load_manifest(store, key)
            except SnapshotError as exc:
                try:
                    when = snapshot_time(snapshot_id)
                except SnapshotError:
                    return None
                table_dir = directory.rstrip("/").split("/")[-2]
                return ManifestSummary(
                    id=snapshot_id,
                    database=database,
                    table=_urlunquote(table_dir),
                    group=None,
                    group_tables=(),
                    manifest_key=key,
                    manifest_sha256="",
                    started_at=when,
                    finished_at=when,
                    rows=0,
                    size_bytes=0,
                    wal_lsn=None,
                    complete=False,
                    problems=(str(exc),),
                )
        entry = next((t for t in manifest.tables if t.directory == directory), None)
        if entry is None:
            return None
        result = await verify_snapshot(
            store,
            replace(manifest, tables=(entry,)),
            listings={directory: by_dir[directory]},
        )
        return ManifestSummary(
            id=manifest.id,
            database=manifest.database,
            table=entry.name,
            group=manifest.group,
            group_tables=manifest.table_names,
            manifest_key=key,
            manifest_sha256=manifest.sha256,
            started_at=manifest.started_at,
            finished_at=manifest.finished_at,
            rows=entry.rows,
            size_bytes=entry.size_bytes,
            wal_lsn=manifest.wal_lsn,
            complete=result.ok,
            problems=result.problems,
        )

    found = await asyncio.gather(*(summarize(d) for d in manifests))
    summaries = [s for s in found if s is not None]
    summaries.sort(key=lambda s: (s.id, s.table), reverse=True)
    return summaries
