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
   and the side table is dropped again. The first part downloads while the table is
   created and the loading connections open;
4. every Parquet row group is turned into COPY text format by pyarrow in a worker thread
   (columns cast to text, escaped only where a value needs it, joined into lines in C++:
   no Python per row) and streamed by `COPY ... FROM STDIN`. With a DSN, several
   connections load at once, fed from one queue of converted row groups; on a single
   connection the table is created and loaded in one transaction with `COPY ... FREEZE`;
5. primary key, unique, exclusion and check constraints, and the other indexes, are built
   after the load, each on its own: one that cannot be built (duplicate keys in a damaged
   snapshot, say) is reported in `RestoreResult.skipped` rather than failing the restore,
   so validation can say what is wrong; sequences are set to where the snapshot found them.
   Indexes come first, primary keys and unique constraints included (`CREATE UNIQUE
   INDEX`, then `ADD CONSTRAINT ... USING INDEX`, which ends in the same catalog state as
   `ADD PRIMARY KEY`): building an index only blocks writers, so the rows can be read
   meanwhile;
6. with `check_data` and two or more loading connections, once the rows are committed
   they are counted and checksummed by the manifest's method (`count_and_checksum`) on a
   connection of their own while step 5 runs. Side by side the two keep the cores busier
   than one after the other, since building an index leaves a core idle while it merges
   and writes (on 1,000,000 rows and 2 cores: 0.75 s for both instead of 0.8-0.85 s). The
   result is `RestoreResult.data_check`, which validation reports instead of reading the
   table a second time. It describes the rows as the load committed them, so it is for a
   caller that validates right after the restore (`backstop recover`, drills); a side
   table that may have been written to since is validated from a result without it.

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
from backstop_core.sidecar.pgtypes import (
    checksum_value,
    qualified,
    quote_ident,
    quote_literal,
    set_local_sql,
)
from backstop_core.sidecar.snapshot import (
    ConstraintDef,
    IndexDef,
    Manifest,
    PartInfo,
    SnapshotError,
    TableSnapshot,
    load_manifest,
    server_version_num,
    snapshot_checksum_sql,
    verify_snapshot,
)

__all__ = [
    "DataCheck",
    "RestoreError",
    "RestoreProgress",
    "RestoreResult",
    "count_and_checksum",
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
class DataCheck:
    """A side table's rows counted and checksummed inside PostgreSQL by the manifest's
    method: what validation's row count and checksum checks compare with the manifest.
    `relation` is the table's oid when it was read, so that validation uses it only for
    that very table."""

    table: str  # the side table, quoted for SQL
    relation: int
    rows: int
    checksum: str | None  # None when it cannot be computed: `problem` says why
    problem: str | None
    seconds: float


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
    # Count and checksum read while the indexes were built (`check_data`), else None.
    data_check: DataCheck | None = None

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
            "data_check_seconds": (
                round(self.data_check.seconds, 3) if self.data_check is not None else None
            ),
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
    check_data: bool = False,
) -> RestoreResult:
    """Restore `table` of the snapshot into a new side table and return what was built.

    `conn` is a connection or a DSN; with a DSN (or `dsn=`), up to `workers` connections
    load in parallel (default: one per CPU, at most 4). The side table goes into
    `target_schema` (default: the table's own schema) under `target_name` (default:
    `restored_name`). An existing side table is an error unless `replace_existing`.
    With `check_data` and more than one loading connection, the loaded rows are counted
    and checksummed while the indexes are built (`RestoreResult.data_check`; see the
    module's docstring), for a caller that validates right away.
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
            check_data=check_data,
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
        # Set once the side table may have been committed: a failure drops it again.
        self.created = False

    async def run(
        self,
        *,
        dsn: str | None,
        workers: int | None,
        replace_existing: bool,
        started: float,
        check_data: bool,
    ) -> RestoreResult:
        source = self.source
        self.report("checking")
        await self._check_listing()
        await self._check_target(replace_existing)
        groups = self._count_work()
        count = _worker_count(workers, groups, dsn is not None)
        checking: asyncio.Task[DataCheck | None] | None = None
        load_started = time.perf_counter()
        try:
            if not self._copies():
                rows, sequences = await self._load_without_copy()
            elif count > 1:
                assert dsn is not None
                rows, sequences = await self._load_parallel(dsn, count)
            else:
                async with self.conn.transaction():
                    await self.conn.execute(self.settings)
                    rows, sequences = await self._load_single()
            if rows != source.rows:
                raise RestoreError(
                    f"loaded {rows} rows into {self.schema}.{self.name}, but the snapshot"
                    f" recorded {source.rows} for {source.name}"
                )
            load_seconds = time.perf_counter() - load_started
            if check_data and dsn is not None and count > 1:
                # The rows are committed: read them on a connection of their own while
                # the indexes are built (which only blocks writers).
                checking = asyncio.create_task(self._check_data(dsn))
            self.report("indexing")
            index_started = time.perf_counter()
            renamed, skipped = await self._build_constraints_and_indexes()
            await self._set_sequences(sequences)
            index_seconds = time.perf_counter() - index_started
            data_check = await checking if checking is not None else None
        except BaseException as exc:
            if checking is not None:
                checking.cancel()
                with contextlib.suppress(BaseException):
                    await checking
            if self.created:
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
            data_check=data_check,
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
        # Before, not after: a cancellation can arrive while the commit is under way.
        self.created = True
        async with self.conn.transaction():
            await self.conn.execute(self.settings)
            return await create()

    # ------------------------------------------------------------------ loading

    def _copies(self) -> bool:
        """Whether there are values to COPY (else only how many rows, if any)."""
        return bool(self.source.columns and self.source.parts and self.columns)

    async def _load_without_copy(self) -> tuple[int, dict[str, str]]:
        async with self.conn.transaction():
            await self.conn.execute(self.settings)
            sequences = await self._create(in_transaction=True)
            self.report("loading")
            if self.source.columns:
                return 0, sequences  # no parts: no rows
            # A table without columns still has rows; there is nothing to read but how many.
            await self.conn.execute(
                f"INSERT INTO {self.target} SELECT FROM generate_series(1, {self.source.rows})"
            )
            return self.source.rows, sequences

    async def _load_single(self) -> tuple[int, dict[str, str]]:
        """Create and load on the control connection, inside its transaction (so COPY can
        FREEZE); the first part downloads and converts while the table is created."""
        queue: asyncio.Queue[_Block | None] = asyncio.Queue(_QUEUE_PER_WORKER)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce(queue, 1))
                sequences = await self._create(in_transaction=True)
                self.report("loading")
                loaded = group.create_task(self._copy(self.conn, queue, freeze=True))
        except BaseExceptionGroup as failed:
            raise _first_error(failed) from None
        return loaded.result(), sequences

    async def _load_parallel(self, dsn: str, count: int) -> tuple[int, dict[str, str]]:
        """Create the table, then load it over `count` connections of its own, each in one
        transaction. The connections open, and the first part downloads and converts,
        while the table is created."""
        connections: list[asyncpg.Connection] = []

        async def connect() -> None:
            connections.append(await pgconnect.connect(dsn, purpose="recovery"))

        queue: asyncio.Queue[_Block | None] = asyncio.Queue(_QUEUE_PER_WORKER * count)
        try:
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._produce(queue, count))
                    async with asyncio.TaskGroup() as setup:
                        for _ in range(count):
                            setup.create_task(connect())
                        created = setup.create_task(self._create(in_transaction=False))
                    self.report("loading")
                    loads = [
                        group.create_task(self._copy_in_transaction(c, queue)) for c in connections
                    ]
            except BaseExceptionGroup as failed:
                raise _first_error(failed) from None
            return sum(task.result() for task in loads), created.result()
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

    async def _check_data(self, dsn: str) -> DataCheck | None:
        """Count and checksum the committed rows on a connection of their own. None when
        that fails: validation then does it itself, and reports what goes wrong."""
        try:
            conn = await pgconnect.connect(dsn, purpose="recovery")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None
        try:
            return await count_and_checksum(
                conn, self.manifest, self.source, self.schema, self.name
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None
        finally:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except BaseException:
                conn.terminate()

    def _plan(self) -> list[_Build]:
        """What to build after the load, in the snapshot's order."""
        source = self.source
        plan: list[_Build] = []
        backing = {i.constraint: i for i in source.indexes if i.constraint is not None}
        for constraint in source.constraints:
            if constraint.type == "foreign_key":
                continue  # points at other tables: copy-back adds it
            side = side_object_name(constraint.name, source.table, self.name)
            what = constraint.type.replace("_", " ")
            attach = _attach_clause(constraint, backing.get(constraint.name), side)
            if attach is not None:
                index = backing[constraint.name]
                plan.append(
                    _Build(
                        what,
                        constraint.name,
                        side,
                        index_sql=f"CREATE UNIQUE INDEX {quote_ident(side)} ON {self.target}"
                        f" USING {index.using}",
                        constraint_sql=f"ALTER TABLE {self.target} ADD CONSTRAINT"
                        f" {quote_ident(side)} {attach}",
                    )
                )
            else:
                plan.append(
                    _Build(
                        what,
                        constraint.name,
                        side,
                        constraint_sql=f"ALTER TABLE {self.target} ADD CONSTRAINT"
                        f" {quote_ident(side)} {constraint.definition}",
                    )
                )
        for index in source.indexes:
            if index.constraint is not None:
                continue
            if index.using is None:
                plan.append(_Build("index", index.name, "", unbuildable=True))
                continue
            side = side_object_name(index.name, source.table, self.name)
            unique = "UNIQUE " if index.unique else ""
            plan.append(
                _Build(
                    "index",
                    index.name,
                    side,
                    index_sql=f"CREATE {unique}INDEX {quote_ident(side)} ON {self.target}"
                    f" USING {index.using}",
                )
            )
        return plan

    async def _build_constraints_and_indexes(self) -> tuple[dict[str, str], list[str]]:
        """Every index first (a share lock: readers go on), then the constraints (an
        exclusive lock each, brief for one whose index is already built)."""
        plan = self._plan()
        failed: dict[int, str] = {}
        for number, build in enumerate(plan):
            if build.unbuildable:
                failed[number] = f"index {build.original}: its definition could not be rebuilt"
            elif build.index_sql is not None:
                problem = await self._build(build.index_sql)
                if problem is not None:
                    failed[number] = f"{build.what} {build.original}: {problem}"
        for number, build in enumerate(plan):
            if number in failed or build.constraint_sql is None:
                continue
            problem = await self._build(build.constraint_sql)
            if problem is not None:
                failed[number] = f"{build.what} {build.original}: {problem}"
                if build.index_sql is not None:
                    # Not left behind as a plain unique index the snapshot did not have.
                    with contextlib.suppress(asyncpg.PostgresError):
                        await self.conn.execute(
                            f"DROP INDEX IF EXISTS {qualified(self.schema, build.side)}"
                        )
        renamed = {b.original: b.side for n, b in enumerate(plan) if n not in failed}
        return renamed, [failed[n] for n in sorted(failed)]

    async def _build(self, sql: str) -> str | None:
        """Run one DDL statement in a transaction of its own; the error, if it fails.
        No lock timeout: attaching a constraint waits for the count and checksum scan,
        which may take minutes, and nothing else has a claim on the side table."""
        try:
            async with self.conn.transaction():
                await self.conn.execute(
                    self.settings
                    + f"; SET LOCAL maintenance_work_mem = {quote_literal(_INDEX_MEMORY)}"
                    + "; SET LOCAL lock_timeout = 0"
                )
                await self.conn.execute(sql)
        except asyncpg.PostgresError as exc:
            return str(exc)
        return None

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


@dataclass(frozen=True, slots=True)
class _Build:
    """One constraint or index to build after the load."""

    what: str  # primary key, unique, check, exclusion, index
    original: str  # its name in the snapshot
    side: str  # its name on the side table
    index_sql: str | None = None  # CREATE [UNIQUE] INDEX: readers go on meanwhile
    constraint_sql: str | None = None  # ALTER TABLE ... ADD CONSTRAINT, after every index
    unbuildable: bool = False


_DEFERRABLE = (" DEFERRABLE INITIALLY DEFERRED", " DEFERRABLE")


def _attach_clause(constraint: ConstraintDef, index: IndexDef | None, side: str) -> str | None:
    """`PRIMARY KEY USING INDEX side` (or UNIQUE, with its deferrability) when the
    constraint can be attached to its index `side`, built beforehand from the snapshot's
    definition of it; None when it is to be added from its own definition (no usable
    index definition, or a shape not worth the risk)."""
    if constraint.type not in ("primary_key", "unique") or index is None or index.using is None:
        return None
    definition = constraint.definition
    kind = "PRIMARY KEY" if constraint.type == "primary_key" else "UNIQUE"
    if not definition.startswith(kind + " ") or not index.unique:
        return None
    if " TABLESPACE " in definition or not index.using.startswith("btree "):
        return None
    suffix = next((d for d in _DEFERRABLE if definition.endswith(d)), "")
    return f"{kind} USING INDEX {quote_ident(side)}{suffix}"


# --------------------------------------------------------------------------- count, checksum


async def count_and_checksum(
    conn: asyncpg.Connection, manifest: Manifest, source: TableSnapshot, schema: str, name: str
) -> DataCheck:
    """Count the rows of the side table `schema`.`name` and recompute, inside PostgreSQL,
    the checksum `manifest` records for `source`, by its method and under its output
    settings, in one scan. A checksum that cannot be computed (a method this Backstop or
    this server lacks) leaves `checksum` None and says why in `problem`; the rows are
    still counted."""
    started = time.perf_counter()
    target = qualified(schema, name)
    try:
        sql = snapshot_checksum_sql(manifest, source, schema, name, await server_version_num(conn))
        problem = None
    except SnapshotError as exc:
        sql = f"SELECT count(*) AS n, NULL::text AS s FROM ONLY {target}"
        problem = str(exc)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(set_local_sql(manifest.text_settings))
        relation = await conn.fetchval("SELECT $1::regclass::oid", target)
        # fetch, not fetchrow: asyncpg would ask for one row at a time, and PostgreSQL
        # plans a query it may have to suspend without the parallel workers a scan wants.
        row = (await conn.fetch(sql))[0]
    return DataCheck(
        table=target,
        relation=int(relation),
        rows=int(row["n"]),
        checksum=checksum_value(row["s"]) if problem is None else None,
        problem=problem,
        seconds=time.perf_counter() - started,
    )


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
    # The newline goes on the last column first, NULL spelled out: cheaper than a second
    # pass over the whole lines.
    texts[-1] = pc.binary_join_element_wise(
        texts[-1], "\n", "", null_handling="replace", null_replacement="\\N"
    )
    lines = pc.binary_join_element_wise(
        *texts, "\t", null_handling="replace", null_replacement="\\N"
    )
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
