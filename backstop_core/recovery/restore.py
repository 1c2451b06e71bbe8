"""Restore one table of a snapshot into a side table, fast, never touching the original.

`restore_to_side_table` recreates `<schema>.<table>__restored_<id>` (`restored_name`: cut to
63 bytes, deterministically, when the name is long) from the manifest's definitions and
loads the snapshot's rows into it:

1. the store's listing is checked against the manifest first (every part present, with its
   recorded size), so a missing part stops the restore before anything is created;
2. enum and domain types the table uses are created when missing; the table is created with
   its columns, defaults, identity and generated columns, and sequences of its own for
   serial columns, but without constraints or indexes;
3. parts are downloaded (two at a time) and each one's size and sha256 are checked before
   it is opened: a tampered or missing part stops the restore with an error that names it,
   and the side table is dropped again;
4. every Parquet row group is turned into COPY text format by pyarrow in a worker thread
   (columns cast to text, escaped only where a value needs it, joined into lines in C++:
   no Python per row) and streamed by `COPY ... FROM STDIN`. With a DSN, several
   connections load at once, fed from one queue of converted row groups; on a single
   connection the table is created and loaded in one transaction with `COPY ... FREEZE`;
5. primary key, unique, exclusion and check constraints, then the other indexes, are built
   after the load, each on its own: one that cannot be built (duplicate keys in a damaged
   snapshot, say) is reported in `RestoreResult.skipped` rather than failing the restore,
   so validation can say what is wrong; sequences are set to where the snapshot found them.

Values go in as the exact text the snapshot read out, under the manifest's output settings,
so validation can recompute the snapshot's checksum on the side table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg

from backstop_core import pgconnect
from backstop_core.recovery.restore_plain import (
    RestoreError,
    _create_table,
    _ensure_types,
    _size_and_sha256,
    restored_name,
)
from backstop_core.recovery.restore_plain import _derived_name as side_object_name
from backstop_core.recovery.restore_plain import _fit as fit_identifier
from backstop_core.sidecar.objectstore import ObjectNotFound, ObjectStore, ObjectStoreError
from backstop_core.sidecar.pgtypes import qualified, quote_ident, quote_literal, set_local_sql
from backstop_core.sidecar.snapshot import (
    Manifest,
    PartInfo,
    TableSnapshot,
    load_manifest,
    verify_snapshot,
)

__all__ = [
    "RestoreError",
    "RestoreProgress",
    "RestoreResult",
    "fit_identifier",
    "restore_to_side_table",
    "restored_name",
    "side_object_name",
]

MAX_IDENTIFIER = 63
# Converted row groups waiting for a loader, per loader: bounds memory (a row group is
# about one 8 MB block of the snapshot's CSV).
_QUEUE_PER_WORKER = 2
_DOWNLOADS = 2
_MAX_WORKERS = 4
_CHUNK_BYTES = 4 * 1024 * 1024
_SPECIAL = (b"\\", b"\t", b"\n", b"\r")
_INDEX_MEMORY = "256MB"


@dataclass(frozen=True, slots=True)
class RestoreProgress:
    """Published while a table is restored (the TUI's progress bar reads these names)."""

    table: str
    phase: str  # checking, loading, indexing, done
    rows_done: int
    rows_total: int
    parts_done: int
    parts_total: int


@dataclass(frozen=True, slots=True)
class RestoreResult:
    table: str  # schema.table as the snapshot names it
    snapshot_id: str
    schema: str  # where the side table is
    name: str  # the side table's name
    rows: int
    seconds: float
    load_seconds: float
    index_seconds: float
    manifest: Manifest = field(repr=False)
    source: TableSnapshot = field(repr=False)
    # Constraint and index names of the snapshot -> their names on the side table.
    renamed: Mapping[str, str] = field(default_factory=dict)
    # Column -> the side table's own sequence ("schema"."name"), for serial columns.
    sequences: Mapping[str, str] = field(default_factory=dict)
    # Constraints and indexes that could not be built, each with the reason.
    skipped: tuple[str, ...] = ()
    workers: int = 1

    @property
    def restored_table(self) -> str:
        """schema.name, unquoted: how a person reads it."""
        return f"{self.schema}.{self.name}"

    @property
    def qualified(self) -> str:
        """The side table, quoted for SQL."""
        return qualified(self.schema, self.name)

    def as_dict(self) -> dict[str, object]:
        return {
            "table": self.table,
            "snapshot_id": self.snapshot_id,
            "side_table": self.restored_table,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "index_seconds": round(self.index_seconds, 3),
            "workers": self.workers,
            "skipped": list(self.skipped),
        }


# --------------------------------------------------------------------------- names


# --------------------------------------------------------------------------- the restore


async def restore_to_side_table(
    conn: asyncpg.Connection | str,
    store: ObjectStore,
    manifest: Manifest | str,
    table: str,
    *,
    on_progress: Callable[[RestoreProgress], None] | None = None,
    dsn: str | None = None,
    workers: int | None = None,
    target_schema: str | None = None,
    target_name: str | None = None,
    replace_existing: bool = False,
    work_dir: str | os.PathLike[str] | None = None,
) -> RestoreResult:
    """Restore `table` of the snapshot into a new side table and return what was built.

    `conn` is a connection or a DSN; with a DSN (or `dsn=`), up to `workers` connections
    load in parallel (default: one per CPU, at most 4). The side table goes into
    `target_schema` (default: the table's own schema) under `target_name` (default:
    `restored_name`). An existing side table is an error unless `replace_existing`.
    Raises RestoreError; a failed restore leaves no side table behind."""
    started = time.perf_counter()
    if not isinstance(conn, str) and conn.is_in_transaction():
        raise RestoreError("the connection is inside a transaction; a restore needs its own")
    if isinstance(manifest, str):
        manifest = await load_manifest(store, manifest)
    source = manifest.table(table)
    schema = target_schema or source.schema
    name = target_name or restored_name(source.table, manifest.id)
    if len(name.encode()) > MAX_IDENTIFIER:
        raise RestoreError(f"{name!r} is longer than PostgreSQL's 63-byte identifiers")
    if isinstance(conn, str):
        dsn = dsn or conn
    own = isinstance(conn, str)
    try:
        control = (
            await pgconnect.connect(conn, purpose="recovery") if isinstance(conn, str) else conn
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise RestoreError(f"cannot connect to PostgreSQL: {exc}") from None
    tmp = Path(tempfile.mkdtemp(prefix="backstop-restore-", dir=work_dir))
    report = _Reporter(source, on_progress)
    try:
        restore = _Restore(control, store, manifest, source, schema, name, tmp, report)
        return await restore.run(
            dsn=dsn,
            workers=workers,
            replace_existing=replace_existing,
            started=started,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        if own:
            with contextlib.suppress(Exception):
                await control.close()


class _Reporter:
    def __init__(
        self, source: TableSnapshot, callback: Callable[[RestoreProgress], None] | None
    ) -> None:
        self._source = source
        self._callback = callback
        self.rows = 0
        self.parts = 0
        self.phase = "checking"

    def __call__(self, phase: str | None = None, *, rows: int = 0, parts: int = 0) -> None:
        self.rows += rows
        self.parts += parts
        if phase is not None:
            self.phase = phase
        if self._callback is not None:
            self._callback(
                RestoreProgress(
                    table=self._source.name,
                    phase=self.phase,
                    rows_done=self.rows,
                    rows_total=self._source.rows,
                    parts_done=self.parts,
                    parts_total=len(self._source.parts),
                )
            )


class _Restore:
    def __init__(
        self,
        conn: asyncpg.Connection,
        store: ObjectStore,
        manifest: Manifest,
        source: TableSnapshot,
        schema: str,
        name: str,
        tmp: Path,
        report: _Reporter,
    ) -> None:
        self.conn = conn
        self.store = store
        self.manifest = manifest
        self.source = source
        self.schema = schema
        self.name = name
        self.target = qualified(schema, name)
        self.tmp = tmp
        self.report = report
        self.settings = set_local_sql(manifest.text_settings)
        self.columns = [c.name for c in source.columns if c.generated is None]

    async def run(
        self, *, dsn: str | None, workers: int | None, replace_existing: bool, started: float
    ) -> RestoreResult:
        source = self.source
        self.report("checking")
        await self._check_listing()
        await self._check_target(replace_existing)
        groups = self._count_work()
        count = _worker_count(workers, groups, dsn is not None)
        created = False
        load_started = time.perf_counter()
        try:
            if count > 1:
                assert dsn is not None
                sequences = await self._create(in_transaction=False)
                created = True
                self.report("loading")
                rows = await self._load_parallel(dsn, count)
            else:
                self.report("loading")
                async with self.conn.transaction():
                    await self.conn.execute(self.settings)
                    sequences = await self._create(in_transaction=True)
                    rows = await self._load_on(self.conn, freeze=True)
                created = True
            if rows != source.rows:
                raise RestoreError(
                    f"loaded {rows} rows into {self.schema}.{self.name}, but the snapshot"
                    f" recorded {source.rows} for {source.name}"
                )
            load_seconds = time.perf_counter() - load_started
            self.report("indexing")
            index_started = time.perf_counter()
            renamed, skipped = await self._build_constraints_and_indexes()
            await self._set_sequences(sequences)
            index_seconds = time.perf_counter() - index_started
        except BaseException as exc:
            if created:
                await self._drop_quietly()
            if isinstance(exc, asyncpg.PostgresError):
                raise RestoreError(
                    f"restoring {source.name} as {self.schema}.{self.name}: {exc}"
                ) from exc
            if isinstance(exc, ObjectStoreError | OSError | asyncpg.InterfaceError):
                raise RestoreError(f"restoring {source.name}: {exc}") from exc
            raise
        self.report("done")
        return RestoreResult(
            table=source.name,
            snapshot_id=self.manifest.id,
            schema=self.schema,
            name=self.name,
            rows=rows,
            seconds=time.perf_counter() - started,
            load_seconds=load_seconds,
            index_seconds=index_seconds,
            manifest=self.manifest,
            source=source,
            renamed=renamed,
            sequences=sequences,
            skipped=tuple(skipped),
            workers=count,
        )

    # ------------------------------------------------------------------ before loading

    async def _check_listing(self) -> None:
        only = replace(self.manifest, tables=(self.source,))
        result = await verify_snapshot(self.store, only)
        if not result.ok:
            raise RestoreError(
                f"snapshot {self.manifest.id} of {self.source.name} is incomplete in"
                f" {self.store.describe()}: " + "; ".join(result.problems)
            )

    async def _check_target(self, replace_existing: bool) -> None:
        exists = await self.conn.fetchval(
            "SELECT c.relkind::text FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relname = $2",
            self.schema,
            self.name,
        )
        if exists is None:
            return
        if not replace_existing or exists not in ("r", "p"):
            raise RestoreError(
                f"{self.schema}.{self.name} already exists (an earlier restore?): drop it"
                f" (DROP TABLE {self.target}) or restore again with replace"
            )
        await self.conn.execute(f"DROP TABLE {self.target}")

    def _count_work(self) -> int:
        """Row groups in the snapshot: the most loaders that could be kept busy."""
        # The manifest records parts, not row groups; a part holds one row group per block
        # of the snapshot's COPY output, so estimate from its size.
        return max(1, sum(max(1, p.size // (4 * 1024 * 1024)) for p in self.source.parts))

    async def _create(self, *, in_transaction: bool) -> dict[str, str]:
        async def create() -> dict[str, str]:
            await _ensure_types(self.conn, self.source.types)
            return await _create_table(self.conn, self.source, self.schema, self.name)

        if in_transaction:
            return await create()
        async with self.conn.transaction():
            await self.conn.execute(self.settings)
            return await create()

    # ------------------------------------------------------------------ loading

    async def _load_on(self, conn: asyncpg.Connection, *, freeze: bool) -> int:
        if not self.source.columns:
            # A table without columns still has rows; there is nothing to read but how many.
            await conn.execute(
                f"INSERT INTO {self.target} SELECT FROM generate_series(1, {self.source.rows})"
            )
            return self.source.rows
        if not self.source.parts or not self.columns:
            return 0
        queue: asyncio.Queue[_Block | None] = asyncio.Queue(_QUEUE_PER_WORKER)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce(queue, 1))
                loaded = group.create_task(self._copy(conn, queue, freeze=freeze))
        except BaseExceptionGroup as failed:
            raise _first_error(failed) from None
        return loaded.result()

    async def _load_parallel(self, dsn: str, count: int) -> int:
        if not self.source.columns:
            return await self._load_on(self.conn, freeze=False)
        if not self.source.parts or not self.columns:
            return 0
        connections: list[asyncpg.Connection] = []
        try:
            for _ in range(count):
                connections.append(await pgconnect.connect(dsn, purpose="recovery"))
            queue: asyncio.Queue[_Block | None] = asyncio.Queue(_QUEUE_PER_WORKER * count)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._produce(queue, count))
                    loads = [
                        group.create_task(self._copy_in_transaction(c, queue)) for c in connections
                    ]
            except BaseExceptionGroup as failed:
                raise _first_error(failed) from None
            return sum(task.result() for task in loads)
        finally:
            for extra in connections:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(extra.close(), 5)

    async def _copy_in_transaction(
        self, conn: asyncpg.Connection, queue: asyncio.Queue[_Block | None]
    ) -> int:
        async with conn.transaction():
            await conn.execute(self.settings)
            return await self._copy(conn, queue, freeze=False)

    async def _copy(
        self, conn: asyncpg.Connection, queue: asyncio.Queue[_Block | None], *, freeze: bool
    ) -> int:
        report = self.report

        async def chunks() -> AsyncIterator[Any]:
            while True:
                block = await queue.get()
                if block is None:
                    return
                for chunk in block.chunks:
                    yield chunk
                report(rows=block.rows, parts=block.closes_part)

        status = await conn.copy_to_table(
            self.name,
            schema_name=self.schema,
            columns=self.columns,
            source=chunks(),
            format="text",
            freeze=freeze or None,
        )
        return int(status.split()[-1])

    async def _produce(self, queue: asyncio.Queue[_Block | None], consumers: int) -> None:
        """Download, verify and convert every part, in order; then tell each loader to stop."""
        parts = list(self.source.parts)
        downloads: dict[int, asyncio.Task[Path]] = {}

        def start(index: int) -> None:
            if index < len(parts) and index not in downloads:
                downloads[index] = asyncio.ensure_future(self._fetch(parts[index]))

        try:
            for index in range(min(_DOWNLOADS, len(parts))):
                start(index)
            for index, part in enumerate(parts):
                path = await downloads[index]
                start(index + _DOWNLOADS)
                try:
                    await self._convert_part(part, path, queue)
                finally:
                    with contextlib.suppress(OSError):
                        path.unlink()
            for _ in range(consumers):
                await queue.put(None)
        finally:
            for task in downloads.values():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _convert_part(
        self, part: PartInfo, path: Path, queue: asyncio.Queue[_Block | None]
    ) -> None:
        try:
            reader = await asyncio.to_thread(_ParquetText, path, self.columns)
        except Exception as exc:  # pyarrow's errors: a verified part that is not Parquet
            raise RestoreError(
                f"{self.source.name}: {part.name} cannot be read as Parquet: {exc}"
            ) from exc
        try:
            for group in range(reader.row_groups):
                try:
                    rows, chunks = await asyncio.to_thread(reader.text, group)
                except Exception as exc:
                    raise RestoreError(
                        f"{self.source.name}: row group {group} of {part.name} cannot be"
                        f" converted: {exc}"
                    ) from exc
                last = group == reader.row_groups - 1
                if rows or last:
                    await queue.put(_Block(rows, chunks, 1 if last else 0))
            if reader.row_groups == 0:
                await queue.put(_Block(0, [], 1))
            if reader.rows != part.rows:
                raise RestoreError(
                    f"{self.source.name}: {part.name} holds {reader.rows} rows, the"
                    f" manifest says {part.rows}: the snapshot is damaged"
                )
        finally:
            reader.close()

    async def _fetch(self, part: PartInfo) -> Path:
        path = self.tmp / part.name
        key = self.source.part_key(part)
        try:
            await self.store.get_to_file(key, path)
        except ObjectNotFound:
            raise RestoreError(
                f"{self.source.name}: {part.name} is missing from {self.store.describe()}"
                f" ({key}): the snapshot is damaged; nothing was kept"
            ) from None
        size, digest = await asyncio.to_thread(_size_and_sha256, path)
        if size != part.size or digest != part.sha256:
            raise RestoreError(
                f"{self.source.name}: {part.name} does not match the manifest"
                f" ({size} bytes, sha256 {digest[:16]}…; expected {part.size} bytes, sha256"
                f" {part.sha256[:16]}…): the snapshot is damaged or was tampered with;"
                " nothing was kept"
            )
        return path

    # ------------------------------------------------------------------ after loading

    async def _build_constraints_and_indexes(self) -> tuple[dict[str, str], list[str]]:
        source = self.source
        renamed: dict[str, str] = {}
        skipped: list[str] = []
        statements: list[tuple[str, str, str]] = []  # (what, original name, sql)
        for constraint in source.constraints:
            if constraint.type == "foreign_key":
                continue  # points at other tables: copy-back adds it
            side = side_object_name(constraint.name, source.table, self.name)
            statements.append(
                (
                    constraint.type.replace("_", " "),
                    constraint.name,
                    f"ALTER TABLE {self.target} ADD CONSTRAINT {quote_ident(side)}"
                    f" {constraint.definition}",
                )
            )
            renamed[constraint.name] = side
        for index in source.indexes:
            if index.constraint is not None:
                continue
            if index.using is None:
                skipped.append(f"index {index.name}: its definition could not be rebuilt")
                continue
            side = side_object_name(index.name, source.table, self.name)
            unique = "UNIQUE " if index.unique else ""
            statements.append(
                (
                    "index",
                    index.name,
                    f"CREATE {unique}INDEX {quote_ident(side)} ON {self.target}"
                    f" USING {index.using}",
                )
            )
            renamed[index.name] = side
        for what, original, sql in statements:
            try:
                async with self.conn.transaction():
                    await self.conn.execute(
                        self.settings
                        + f"; SET LOCAL maintenance_work_mem = {quote_literal(_INDEX_MEMORY)}"
                    )
                    await self.conn.execute(sql)
            except asyncpg.PostgresError as exc:
                renamed.pop(original, None)
                skipped.append(f"{what} {original}: {exc}")
        return renamed, skipped

    async def _set_sequences(self, own: Mapping[str, str]) -> None:
        for column in self.source.columns:
            s = column.sequence
            if s is None or s.last_value is None:
                continue
            if column.identity is not None:
                sequence = await self.conn.fetchval(
                    "SELECT pg_get_serial_sequence($1, $2)", self.target, column.name
                )
            else:
                sequence = own.get(column.name)
            if sequence is not None:
                await self.conn.execute(
                    "SELECT setval($1::regclass, $2, $3)", sequence, s.last_value, s.is_called
                )

    async def _drop_quietly(self) -> None:
        with contextlib.suppress(Exception):
            if self.conn.is_in_transaction():
                return  # the transaction's rollback removes it
            await asyncio.wait_for(
                asyncio.shield(self.conn.execute(f"DROP TABLE IF EXISTS {self.target}")), 30
            )


def _first_error(failed: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that stopped a task group (the others were cancelled because of it)."""
    for error in failed.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return failed.exceptions[0]


def _worker_count(requested: int | None, groups: int, have_dsn: bool) -> int:
    if not have_dsn:
        return 1
    wanted = requested if requested is not None else min(os.cpu_count() or 1, _MAX_WORKERS)
    return max(1, min(wanted, groups))


# --------------------------------------------------------------------------- DDL


# --------------------------------------------------------------------------- Parquet -> COPY text


@dataclass(frozen=True, slots=True)
class _Block:
    rows: int
    chunks: list[Any]  # buffers of COPY text, whole lines each
    closes_part: int


class _ParquetText:
    """One verified part, row group by row group, as COPY text format.

    COPY text: columns separated by tabs, rows ended by newlines, NULL as `\\N`, and a
    backslash, tab, newline or carriage return inside a value escaped with a backslash.
    Text is what pg_restore sends too; PostgreSQL parses it faster than CSV."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        import pyarrow.parquet as pq

        self._file = pq.ParquetFile(path)
        self._columns = list(columns)
        self.row_groups: int = self._file.metadata.num_row_groups
        self.rows = 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()

    def text(self, group: int) -> tuple[int, list[Any]]:
        table = self._file.read_row_group(group, columns=self._columns)
        self.rows += table.num_rows
        if table.num_rows == 0:
            return 0, []
        return table.num_rows, _copy_text(table)


def _copy_text(table: Any) -> list[Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = []
    for column in table.columns:
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            if _needs_escaping(column):
                column = pc.replace_substring(column, "\\", "\\\\")
                column = pc.replace_substring(column, "\t", "\\t")
                column = pc.replace_substring(column, "\n", "\\n")
                column = pc.replace_substring(column, "\r", "\\r")
        else:
            # Integers in decimal, booleans as true/false: both read back exactly.
            column = pc.cast(column, pa.string())
        texts.append(column)
    lines = pc.binary_join_element_wise(
        *texts, "\t", null_handling="replace", null_replacement="\\N"
    )
    lines = pc.binary_join_element_wise(lines, "", "\n")
    chunks: list[Any] = []
    for array in lines.chunks:
        if len(array) == 0:
            continue
        data = _string_data(array)
        for start in range(0, len(data), _CHUNK_BYTES):
            chunks.append(data[start : start + _CHUNK_BYTES])
    return chunks


def _string_data(array: Any) -> Any:
    """The bytes of a string array's values, end to end (no copy)."""
    import pyarrow as pa

    _validity, offsets, data = array.buffers()[:3]
    if data is None:
        return pa.py_buffer(b"")
    width = 8 if pa.types.is_large_string(array.type) else 4
    fmt = "<q" if width == 8 else "<i"
    first = struct.unpack_from(fmt, offsets, width * array.offset)[0]
    last = struct.unpack_from(fmt, offsets, width * (array.offset + len(array)))[0]
    return data[first:last]


def _needs_escaping(column: Any) -> bool:
    for array in column.chunks:
        if len(array) == 0 or array.null_count == len(array):
            continue
        raw = _string_data(array).to_pybytes()
        if any(ch in raw for ch in _SPECIAL):
            return True
    return False
