"""Periodic snapshots, retention, freshness, and the readiness check before destructive SQL.

Schedule units. Every group of `policy.groups` is one unit: its tables (globs allowed) are
snapshotted together in one transaction at the group's interval. Every other table that a
`policy.protected` glob covers (ordinary and partitioned tables outside the system
schemas; partitions are covered through their parent) is a unit of its own, with the
interval of the first entry that covers it. A table that belongs to a group is snapshotted
with its group only.

The object store is the source of truth: what the scheduler knows about existing
snapshots comes from listing it (manifests are immutable, so each is read once and
cached), refreshed every `refresh_seconds` and after every change the scheduler makes.
The state store gets a record per snapshot taken (running, then ok or failed) and a note
when retention deletes one.

Health per table: `failing` when the last attempt of its unit failed (with the error),
`never` when no complete snapshot exists, `stale` when the newest complete one is older
than 1.5 x its interval, else `fresh`.

Retention per unit: the newest `retention_count` snapshots are kept; older ones, and ones
older than `retention_max_age_seconds` except the newest, are deleted (manifests first, so
a half-deleted snapshot never looks complete). A snapshot handed out by `ensure_fresh`
within the approval timeout is never deleted.

`ensure_fresh` is what the gateway calls before a statement that needs a snapshot; it
never blocks the event loop (all I/O is async or in threads), and concurrent calls for the
same table share one on-demand snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from backstop_core import pgconnect
from backstop_core.events import Event, EventBus
from backstop_core.policy import Policy, ProtectedTable
from backstop_core.sidecar.objectstore import ObjectInfo, ObjectStore, ObjectStoreError
from backstop_core.sidecar.snapshot import (
    MANIFEST_NAME,
    Manifest,
    SnapshotError,
    SnapshotProgress,
    TableRef,
    database_prefix,
    load_manifest,
    new_snapshot_id,
    resolve_tables,
    split_table_name,
    table_directory,
    take_snapshot,
    verify_snapshot,
)
from backstop_core.store import SNAPSHOT_STATUSES, SnapshotRecord, StateStore

__all__ = [
    "NotReady",
    "ReadySnapshot",
    "SnapshotFailed",
    "SnapshotFinished",
    "SnapshotProgress",
    "SnapshotScheduler",
    "SnapshotStarted",
    "TableHealth",
]

log = logging.getLogger("backstop.scheduler")

STALE_FACTOR = 1.5
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SnapshotStarted(Event):
    snapshot_id: str
    database: str
    tables: tuple[str, ...]
    group: str | None
    reason: str  # scheduled, on_demand, manual


@dataclass(frozen=True, slots=True)
class SnapshotFinished(Event):
    snapshot_id: str
    database: str
    tables: tuple[str, ...]
    group: str | None
    reason: str
    rows: int
    size_bytes: int
    duration_seconds: float
    manifest_sha256: str
    wal_lsn: str | None


@dataclass(frozen=True, slots=True)
class SnapshotFailed(Event):
    snapshot_id: str
    database: str
    tables: tuple[str, ...]
    group: str | None
    reason: str
    error: str


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class TableHealth:
    table: str
    health: str  # fresh, stale, failing, never
    interval_seconds: int
    group: str | None = None
    snapshot_id: str | None = None  # the newest complete snapshot
    snapshot_at: datetime | None = None
    age_seconds: float | None = None
    error: str | None = None  # the last attempt's error, when failing

    @property
    def max_age_seconds(self) -> float:
        """Older than this, the newest snapshot is stale."""
        return STALE_FACTOR * self.interval_seconds

    @property
    def last_snapshot_id(self) -> str | None:
        return self.snapshot_id

    @property
    def detail(self) -> str:
        parts: list[str] = []
        if self.age_seconds is not None:
            parts.append(f"newest {_duration(self.age_seconds)} old ({self.snapshot_id})")
        else:
            parts.append("no snapshot yet")
        parts.append(f"every {_duration(self.interval_seconds)}")
        if self.group:
            parts.append(f"group {self.group}")
        if self.error:
            parts.append(f"last attempt failed: {self.error}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "table": self.table,
            "health": self.health,
            "detail": self.detail,
            "interval_seconds": self.interval_seconds,
            "max_age_seconds": self.max_age_seconds,
            "group": self.group,
            "snapshot_id": self.snapshot_id,
            "age_seconds": self.age_seconds,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class ReadySnapshot:
    """Snapshots that cover a statement's tables. When the tables' newest snapshots differ,
    `snapshot_id` and `manifest_sha256` list them comma-separated (in `per_table` order);
    all are None when none of the tables exists (nothing to protect)."""

    snapshot_id: str | None
    manifest_sha256: str | None
    age_seconds: float | None  # of the oldest snapshot involved
    per_table: Mapping[str, str]  # table -> snapshot id
    manifests: Mapping[str, str] = field(default_factory=dict)  # manifest key -> sha256
    taken_now: bool = False


class NotReady(Exception):
    """No usable snapshot; `reason` is written for the agent whose statement waits (without
    a "backstop:" prefix: the gateway puts the refusal together)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Unit:
    key: str
    tables: tuple[str, ...]
    group: str | None
    interval: int
    retention_count: int
    retention_max_age: int | None


@dataclass(frozen=True, slots=True)
class _Known:
    """A snapshot's entry for one table, as found in the store."""

    manifest: Manifest
    table: str
    directory: str
    complete: bool
    problems: tuple[str, ...]

    @property
    def started(self) -> datetime:
        return self.manifest.started_at


@dataclass(slots=True)
class _Failure:
    error: str
    at: float
    count: int


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _covers(pattern: str, table: str) -> bool:
    return ProtectedTable(table=pattern).covers(table)


# --------------------------------------------------------------------------- scheduler


class SnapshotScheduler:
    def __init__(
        self,
        dsn: str,
        store: ObjectStore,
        state: StateStore | None,
        bus: EventBus | None,
        policy: Callable[[], Policy],
        *,
        tick_seconds: float = 5.0,
        refresh_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        snapshot_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._state = state
        self._bus = bus
        self._policy = policy
        self._tick_seconds = tick_seconds
        self._refresh_seconds = refresh_seconds
        self._database: str | None = None
        self._clock = clock
        self._snapshot_options = dict(snapshot_options or {})
        self._control: asyncpg.Connection | None = None
        self._control_lock = asyncio.Lock()
        self._units: list[_Unit] = []
        # manifest key -> entry; object-store truth as of the last refresh
        self._known: dict[str, _Known] = {}
        self._manifests: dict[str, Manifest] = {}  # cache: manifests never change
        self._refreshed_at: float | None = None
        self._failures: dict[str, _Failure] = {}
        # (database, table) -> the snapshot of it under way
        self._inflight: dict[tuple[str, str], asyncio.Task[Manifest]] = {}
        self._handed_out: dict[str, float] = {}  # snapshot id -> when ensure_fresh used it
        self._last_error: str | None = None

    # ------------------------------------------------------------------ plumbing

    def _publish(self, event: Event) -> None:
        if self._bus is not None:
            self._bus.publish(event)

    async def _conn(self) -> asyncpg.Connection:
        if self._control is None or self._control.is_closed():
            self._control = await pgconnect.connect(self._dsn, purpose="snapshot")
        return self._control

    async def _query(self, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        async with self._control_lock:
            try:
                return await fn(await self._conn())
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError):
                # One reconnect: the server may have restarted since the last call.
                if self._control is not None:
                    with contextlib.suppress(Exception):
                        await self._control.close()
                self._control = None
                return await fn(await self._conn())

    def _dsn_for(self, database: str) -> str:
        """The scheduler's DSN, pointed at another database of the same server."""
        if database == self._database:
            return self._dsn
        parts = urlsplit(self._dsn)
        query = "&".join(
            item for item in parts.query.split("&") if item and not item.startswith("dbname=")
        )
        return urlunsplit(parts._replace(path="/" + quote(database, safe=""), query=query))

    async def _resolve(self, database: str, tables: Sequence[str]) -> list[TableRef]:
        if database == await self.database():
            refs: list[TableRef] = await self._query(
                lambda c: resolve_tables(c, list(tables), missing_ok=True)
            )
            return refs
        conn = await pgconnect.connect(self._dsn_for(database), purpose="snapshot")
        try:
            return await resolve_tables(conn, list(tables), missing_ok=True)
        finally:
            await conn.close()

    async def database(self) -> str:
        """The database the scheduler's DSN connects to."""
        if self._database is None:
            self._database = await self._query(lambda c: c.fetchval("SELECT current_database()"))
        return self._database

    async def close(self) -> None:
        for task in set(self._inflight.values()):
            if not task.done():
                task.cancel()
        async with self._control_lock:
            if self._control is not None:
                with contextlib.suppress(Exception):
                    await self._control.close()
                self._control = None

    # ------------------------------------------------------------------ policy -> units

    async def _tables(self) -> list[str]:
        rows = await self._query(
            lambda c: c.fetch(
                "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c"
                " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
                " AND n.nspname <> ALL($1::text[]) AND n.nspname !~ '^pg_(toast|temp_)'"
                " ORDER BY 1, 2",
                list(_SYSTEM_SCHEMAS),
            )
        )
        return [f"{schema}.{table}" for schema, table in rows]

    async def resolve_units(self, policy: Policy | None = None) -> list[_Unit]:
        """The schedule units the policy asks for, against the tables that exist now."""
        policy = policy or self._policy()
        tables = await self._tables()
        units: list[_Unit] = []
        grouped: set[str] = set()
        for group in policy.groups:
            members = tuple(t for t in tables if any(_covers(p, t) for p in group.tables))
            if not members:
                continue
            grouped.update(members)
            units.append(
                _Unit(
                    f"group:{group.name}",
                    members,
                    group.name,
                    group.interval_seconds,
                    group.retention_count,
                    group.retention_max_age_seconds,
                )
            )
        for table in tables:
            if table in grouped:
                continue
            protection = policy.protection_for(table)
            if protection is None:
                continue
            units.append(
                _Unit(
                    f"table:{table}",
                    (table,),
                    None,
                    protection.interval_seconds,
                    protection.retention_count,
                    protection.retention_max_age_seconds,
                )
            )
        self._units = units
        return units

    # ------------------------------------------------------------------ what the store holds

    async def refresh(self) -> None:
        """Re-read which snapshots exist (one listing of the database's prefix)."""
        prefix = database_prefix(await self.database())
        await self._absorb(await self._store.list(prefix), prefix)
        self._refreshed_at = self._clock()

    async def _absorb(self, objects: Sequence[ObjectInfo], prefix: str) -> None:
        """Replace what is known under `prefix` by a listing of it."""
        by_dir: dict[str, list[ObjectInfo]] = {}
        for info in objects:
            by_dir.setdefault(info.key.rpartition("/")[0] + "/", []).append(info)
        present = {info.key for info in objects}
        keys = [d + MANIFEST_NAME for d in by_dir if d + MANIFEST_NAME in present]
        limit = asyncio.Semaphore(8)

        async def load(key: str) -> Manifest | None:
            if key in self._manifests:
                return self._manifests[key]
            async with limit:
                try:
                    manifest = await load_manifest(self._store, key)
                except SnapshotError as exc:
                    log.warning("skipping unreadable snapshot manifest: %s", exc)
                    return None
            self._manifests[key] = manifest
            return manifest

        loaded = await asyncio.gather(*(load(k) for k in keys))
        fresh = {k: v for k, v in self._known.items() if not k.startswith(prefix)}
        for key, manifest in zip(keys, loaded, strict=True):
            if manifest is None:
                continue
            directory = key[: -len(MANIFEST_NAME)]
            entry = next((t for t in manifest.tables if t.directory == directory), None)
            if entry is None:
                continue
            result = await verify_snapshot(
                self._store,
                replace(manifest, tables=(entry,)),
                listings={directory: by_dir[directory]},
            )
            fresh[key] = _Known(manifest, entry.name, directory, result.ok, result.problems)
        self._known = fresh
        for key in list(self._manifests):
            if key.startswith(prefix) and key not in fresh:
                del self._manifests[key]

    def _snapshots_of(
        self, table: str, *, database: str | None = None, complete: bool = True
    ) -> list[_Known]:
        """Snapshots of `table` in `database` (default: the scheduler's), newest first."""
        database = database or self._database
        found = [
            k
            for k in self._known.values()
            if k.table == table and k.manifest.database == database and (k.complete or not complete)
        ]
        found.sort(key=lambda k: k.manifest.id, reverse=True)
        return found

    def _unit_snapshots(self, unit: _Unit) -> list[Manifest]:
        """Snapshots made for this unit (a group's, or a lone table's), newest first."""
        seen: dict[str, Manifest] = {}
        for known in self._known.values():
            m = known.manifest
            if m.database != self._database:
                continue
            if unit.group is not None:
                if m.group == unit.group:
                    seen[m.id] = m
            elif m.group is None and known.table == unit.tables[0]:
                seen[m.id] = m
        return sorted(seen.values(), key=lambda m: m.id, reverse=True)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Take snapshots when due and apply retention, until cancelled."""
        while True:
            try:
                await self.tick()
                self._last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                message = str(exc) or type(exc).__name__
                if message != self._last_error:
                    log.warning("snapshot scheduler: %s", message)
                self._last_error = message
            await asyncio.sleep(self._tick_seconds)

    async def tick(self) -> None:
        """One round: resolve the policy, snapshot what is due, apply retention."""
        units = await self.resolve_units()
        now = self._clock()
        if self._refreshed_at is None or now - self._refreshed_at >= self._refresh_seconds:
            await self.refresh()
        for unit in units:
            if self._due(unit, self._clock()):
                with contextlib.suppress(SnapshotError):
                    await self._snapshot_unit(unit, reason="scheduled")
        for unit in units:
            try:
                await self.apply_retention(unit)
            except (ObjectStoreError, SnapshotError) as exc:
                log.warning("retention for %s: %s", unit.key, exc)

    def _due(self, unit: _Unit, now: float) -> bool:
        if any((self._database, t) in self._inflight for t in unit.tables):
            return False
        failures = [f for t in unit.tables if (f := self._failures.get(t)) is not None]
        if failures:
            last = max(failures, key=lambda f: f.at)
            backoff = min(unit.interval, 30 * 2 ** min(last.count - 1, 6))
            if now - last.at < backoff:
                return False
        if unit.group is not None:
            newest = [m for m in self._unit_snapshots(unit) if self._complete(m)]
        else:
            # Any complete snapshot of the table (an on-demand one too) restarts the clock.
            newest = [k.manifest for k in self._snapshots_of(unit.tables[0])]
        if not newest:
            return True
        return now - newest[0].started_at.timestamp() >= unit.interval

    def _complete(self, manifest: Manifest) -> bool:
        return all(
            (k := self._known.get(t.manifest_key)) is not None and k.complete
            for t in manifest.tables
        )

    async def _snapshot_unit(self, unit: _Unit, *, reason: str) -> Manifest:
        return await self._take(list(unit.tables), group=unit.group, reason=reason)

    async def _take(
        self,
        tables: Sequence[str],
        *,
        group: str | None,
        reason: str,
        database: str | None = None,
    ) -> Manifest:
        database = database or await self.database()
        task = asyncio.ensure_future(
            self._take_now(tables, group=group, reason=reason, database=database)
        )
        keys = [(database, t) for t in tables]
        for key in keys:
            self._inflight[key] = task
        task.add_done_callback(lambda t: self._forget(t, keys))
        # Shielded: a caller that gives up (a client that disconnects) does not cancel a
        # snapshot others may be waiting for.
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[Manifest], keys: Iterable[tuple[str, str]]) -> None:
        for key in keys:
            if self._inflight.get(key) is task:
                del self._inflight[key]

    async def _take_now(
        self, tables: Sequence[str], *, group: str | None, reason: str, database: str
    ) -> Manifest:
        snapshot_id = new_snapshot_id()
        names = tuple(tables)
        started = self._clock()
        self._publish(SnapshotStarted(snapshot_id, database, names, group, reason))
        await self._record(
            SnapshotRecord(snapshot_id, database, names, "running", datetime.now(UTC))
        )
        try:
            manifest = await take_snapshot(
                self._dsn_for(database),
                self._store,
                names,
                prefix_db=database,
                group=group,
                snapshot_id=snapshot_id,
                on_progress=self._publish if self._bus is not None else None,
                **self._snapshot_options,
            )
        except Exception as exc:
            error = str(exc) if isinstance(exc, SnapshotError) else f"{type(exc).__name__}: {exc}"
            now = self._clock()
            for table in names:
                previous = self._failures.get(table)
                self._failures[table] = _Failure(
                    error, now, (previous.count if previous else 0) + 1
                )
            self._publish(SnapshotFailed(snapshot_id, database, names, group, reason, error))
            await self._record(
                SnapshotRecord(
                    snapshot_id,
                    database,
                    names,
                    "failed",
                    datetime.fromtimestamp(started, UTC),
                    finished_at=datetime.now(UTC),
                    error=error,
                )
            )
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(error) from exc
        if database == self._database:
            for table in manifest.table_names:
                self._failures.pop(table, None)
        for entry in manifest.tables:
            self._manifests[entry.manifest_key] = manifest
            self._known[entry.manifest_key] = _Known(
                manifest, entry.name, entry.directory, True, ()
            )
        self._publish(
            SnapshotFinished(
                manifest.id,
                database,
                manifest.table_names,
                group,
                reason,
                manifest.rows,
                manifest.size_bytes,
                self._clock() - started,
                manifest.sha256,
                manifest.wal_lsn,
            )
        )
        await self._record(
            SnapshotRecord(
                manifest.id,
                database,
                manifest.table_names,
                "ok",
                manifest.started_at,
                finished_at=manifest.finished_at,
                manifest_sha256=manifest.sha256,
                # The first table's manifest key, relative to the configured store.
                location=manifest.tables[0].manifest_key,
                rows=manifest.rows,
                size_bytes=manifest.size_bytes,
                wal_lsn=manifest.wal_lsn,
            )
        )
        return manifest

    async def _record(self, record: SnapshotRecord) -> None:
        if self._state is None:
            return
        try:
            await self._state.snapshot_put(record)
        except Exception as exc:
            log.warning("cannot record snapshot %s in the state store: %s", record.id, exc)

    # ------------------------------------------------------------------ manual snapshots

    async def snapshot_now(
        self, tables: Sequence[str] | None = None, group: str | None = None
    ) -> Manifest:
        """Take a snapshot now: of a policy group by name, or of the named tables together."""
        if group is not None:
            if tables:
                raise ValueError("name tables or a group, not both")
            units = await self.resolve_units()
            unit = next((u for u in units if u.group == group), None)
            if unit is None:
                known = ", ".join(g.name for g in self._policy().groups) or "none"
                raise SnapshotError(
                    f"no recovery group {group!r} with existing tables (groups: {known})"
                )
            return await self._snapshot_unit(unit, reason="manual")
        if not tables:
            raise ValueError("name the tables or the group to snapshot")
        refs = await self._query(lambda c: resolve_tables(c, list(tables)))
        return await self._take([r.name for r in refs], group=None, reason="manual")

    async def snapshot_all(self) -> list[Manifest]:
        """Snapshot every unit of the policy now, one after another."""
        return [await self._snapshot_unit(u, reason="manual") for u in await self.resolve_units()]

    # ------------------------------------------------------------------ retention

    async def apply_retention(self, unit: _Unit) -> list[str]:
        """Delete the unit's snapshots beyond its retention; returns the deleted ids."""
        snapshots = [m for m in self._unit_snapshots(unit) if m.id not in self._protected_ids()]
        if not snapshots:
            return []
        now = self._clock()
        doomed: list[Manifest] = []
        for index, manifest in enumerate(snapshots):
            too_many = index >= unit.retention_count
            too_old = (
                index > 0
                and unit.retention_max_age is not None
                and now - manifest.started_at.timestamp() > unit.retention_max_age
            )
            if too_many or too_old:
                doomed.append(manifest)
        deleted: list[str] = []
        for manifest in doomed:
            await self.delete_snapshot(manifest, reason=f"retention of {unit.key}")
            deleted.append(manifest.id)
        return deleted

    def _protected_ids(self) -> set[str]:
        window = self._policy().approval.timeout_seconds + 60
        now = self._clock()
        for snapshot_id, at in list(self._handed_out.items()):
            if now - at > window:
                del self._handed_out[snapshot_id]
        return set(self._handed_out)

    async def delete_snapshot(self, manifest: Manifest, *, reason: str) -> None:
        # Manifests first: a snapshot without its manifest is never taken for complete.
        for entry in manifest.tables:
            await self._store.delete(entry.manifest_key)
            self._known.pop(entry.manifest_key, None)
            self._manifests.pop(entry.manifest_key, None)
        for entry in manifest.tables:
            await self._store.delete_prefix(entry.directory)
        log.info("deleted snapshot %s (%s)", manifest.id, reason)
        if self._state is None:
            return
        try:
            record = await self._state.snapshot_get(manifest.id)
        except Exception:
            record = None
        if record is None:
            record = SnapshotRecord(
                manifest.id,
                manifest.database,
                manifest.table_names,
                "ok",
                manifest.started_at,
                finished_at=manifest.finished_at,
                manifest_sha256=manifest.sha256,
                rows=manifest.rows,
                size_bytes=manifest.size_bytes,
                wal_lsn=manifest.wal_lsn,
            )
        status = "deleted" if "deleted" in SNAPSHOT_STATUSES else record.status
        await self._record(
            replace(record, status=status, location=None, error=f"deleted by {reason}")
        )

    # ------------------------------------------------------------------ health

    def health(self) -> list[TableHealth]:
        """Per table of the last resolved policy, from what the store held at last look."""
        now = self._clock()
        result: list[TableHealth] = []
        for unit in self._units:
            for table in unit.tables:
                failure = self._failures.get(table)
                newest = self._snapshots_of(table)
                base = TableHealth(table, "never", unit.interval, unit.group)
                if newest:
                    m = newest[0].manifest
                    age = now - m.started_at.timestamp()
                    stale = age > STALE_FACTOR * unit.interval
                    base = replace(
                        base,
                        health="stale" if stale else "fresh",
                        snapshot_id=m.id,
                        snapshot_at=m.started_at,
                        age_seconds=age,
                    )
                if failure is not None:
                    base = replace(base, health="failing", error=failure.error)
                result.append(base)
        result.sort(key=lambda h: h.table)
        return result

    # ------------------------------------------------------------------ readiness

    async def ensure_fresh(
        self,
        tables: Sequence[str],
        *,
        max_age_seconds: float,
        on_demand: bool,
        notify: Callable[[str], None],
        database: str | None = None,
        before: str = "the statement",
    ) -> ReadySnapshot:
        """A complete snapshot, younger than `max_age_seconds`, of every table in `tables`
        that exists (in `database`, by default the scheduler's); taken now, after `notify`,
        when allowed and needed. Raises NotReady, with a message for the agent, otherwise.
        `before` names what waits for it ("TRUNCATE on public.orders")."""
        database = database or await self.database()
        try:
            refs = await self._resolve(database, tables)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise NotReady(
                f"cannot look up {', '.join(tables)} in database {database}: {exc};"
                " the statement was not run. Retry once the database answers."
            ) from None
        names = [r.name for r in refs]
        if not names:
            return ReadySnapshot(None, None, None, {})
        try:
            found, problems = await self._find_fresh(database, names, max_age_seconds)
        except ObjectStoreError as exc:
            raise NotReady(
                f"cannot check the snapshots of {', '.join(names)} in the snapshot"
                f" store: {exc}. The statement was not run; retry once the store answers."
            ) from None
        missing = [n for n in names if n not in found]
        if not missing:
            return self._ready(names, found, taken_now=False)
        if not on_demand:
            raise NotReady(self._not_ready_message(missing, max_age_seconds, problems, before))
        waiting = {task for t in missing if (task := self._inflight.get((database, t))) is not None}
        uncovered = [t for t in missing if (database, t) not in self._inflight]
        if waiting:
            under_way = ", ".join(t for t in missing if t not in uncovered)
            notify(f"backstop: waiting for the snapshot of {under_way} under way before {before} …")
        if uncovered:
            notify(f"backstop: taking a snapshot of {', '.join(uncovered)} before {before} …")
        try:
            results = []
            if uncovered:
                results.append(
                    await self._take(uncovered, group=None, reason="on_demand", database=database)
                )
            results.extend([await asyncio.shield(task) for task in waiting])
        except SnapshotError as exc:
            raise NotReady(
                f"the snapshot of {', '.join(missing)} before {before} failed: {exc}."
                " The statement was not run; retry, or ask an operator."
            ) from None
        for manifest in results:
            for entry in manifest.tables:
                if entry.name in missing:
                    found[entry.name] = (manifest, entry.manifest_key)
        still = [n for n in names if n not in found]
        if still:
            raise NotReady(
                self._not_ready_message(still, max_age_seconds, problems, before, on_demand=True)
            )
        return self._ready(names, found, taken_now=True)

    def _ready(
        self, names: Sequence[str], found: Mapping[str, tuple[Manifest, str]], taken_now: bool
    ) -> ReadySnapshot:
        now = self._clock()
        ids = list(dict.fromkeys(found[n][0].id for n in names))
        manifests = {found[n][1]: found[n][0].sha256 for n in names}
        shas = list(dict.fromkeys(found[n][0].sha256 for n in names))
        oldest = min(found[n][0].started_at.timestamp() for n in names)
        for snapshot_id in ids:
            self._handed_out[snapshot_id] = now
        return ReadySnapshot(
            snapshot_id=",".join(ids),
            manifest_sha256=",".join(shas),
            age_seconds=max(0.0, now - oldest),
            per_table={n: found[n][0].id for n in names},
            manifests=manifests,
            taken_now=taken_now,
        )

    async def _find_fresh(
        self, database: str, names: Sequence[str], max_age: float
    ) -> tuple[dict[str, tuple[Manifest, str]], dict[str, str]]:
        """table -> (manifest, manifest key) of its newest complete snapshot within max_age;
        and table -> why its newest snapshot could not be used."""
        now = self._clock()
        found: dict[str, tuple[Manifest, str]] = {}
        problems: dict[str, str] = {}
        for name in names:
            directory = table_directory(database, *split_table_name(name))
            await self._absorb(await self._store.list(directory), directory)
            entries = self._snapshots_of(name, database=database, complete=False)
            if not entries:
                problems[name] = "there is none"
                continue
            for entry in entries:
                age = now - entry.started.timestamp()
                if age > max_age:
                    if name not in problems:
                        problems[name] = f"the newest is {_duration(age)} old"
                    break
                if not entry.complete:
                    problems.setdefault(
                        name,
                        f"the newest, {entry.manifest.id}, is incomplete in the store"
                        f" ({'; '.join(entry.problems)})",
                    )
                    continue
                others = [t for t in entry.manifest.tables if t.name != name]
                if others:
                    result = await verify_snapshot(
                        self._store, replace(entry.manifest, tables=tuple(others))
                    )
                    if not result.ok:
                        problems.setdefault(
                            name,
                            f"group snapshot {entry.manifest.id} is incomplete"
                            f" ({'; '.join(result.problems)})",
                        )
                        continue
                found[name] = (entry.manifest, entry.directory + MANIFEST_NAME)
                break
        return found, problems

    def _not_ready_message(
        self,
        tables: Sequence[str],
        max_age: float,
        problems: Mapping[str, str],
        before: str,
        *,
        on_demand: bool = False,
    ) -> str:
        why = "; ".join(f"{t}: {problems.get(t, 'none is usable')}" for t in tables)
        text = (
            f"{before} needs a snapshot of {', '.join(tables)} no older than"
            f" {_duration(max_age)}, and none is usable ({why})."
        )
        if on_demand:
            return text + " The statement was not run; retry, or ask an operator."
        return text + (
            " On-demand snapshots are off in the policy, so the statement was not run: ask an"
            f" operator to take one (backstop snapshot {' '.join(tables)}), then retry."
        )

    async def still_present(self, ready: ReadySnapshot, *, database: str | None = None) -> bool:
        """Just before forwarding: every manifest is unchanged and every part still there.
        (`database` is accepted for the gateway's interface; the manifest keys name it.)"""
        try:
            for key, sha256 in ready.manifests.items():
                manifest = await load_manifest(self._store, key)
                if manifest.sha256 != sha256:
                    return False
                if not (await verify_snapshot(self._store, manifest)).ok:
                    return False
        except (ObjectStoreError, SnapshotError) as exc:
            log.warning("snapshot re-check failed: %s", exc)
            return False
        return True
