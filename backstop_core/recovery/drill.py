"""Restore drills: prove, regularly, that each protected table's newest snapshot restores.

A drill restores the newest complete snapshot of a table into the scratch schema
`backstop_drill` (never next to the live table), runs the validation checks that do not
depend on live data (row count, checksum, columns and types, primary key, constraints and
indexes), records the outcome and how long it took in the state store (`drill_start` /
`drill_finish`, details: rows, seconds, checks), and drops the scratch copy. The time a
drill took is what an operator can expect a real recovery of that table to take.

`run_drills` does one round (the CLI's `backstop drill`); `drill_loop` repeats it for the
sidecar, every `drills.interval_seconds` of the current policy (0: off), read again while it
waits so that a reloaded policy applies without a restart. `last_drills` gives the newest
drill per table, for `backstop snapshots` and the TUI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from backstop_core import pgconnect
from backstop_core.events import Event, EventBus
from backstop_core.policy import Policy, ProtectedTable
from backstop_core.recovery.restore import RestoreError, restore_to_side_table
from backstop_core.recovery.validate import ValidationCheck, validate_restore
from backstop_core.sidecar.objectstore import ObjectStore, ObjectStoreError
from backstop_core.sidecar.pgtypes import quote_ident
from backstop_core.sidecar.snapshot import (
    ManifestSummary,
    SnapshotError,
    list_snapshots,
    load_manifest,
)
from backstop_core.store import DrillRecord, StateStore

__all__ = [
    "DRILL_SCHEMA",
    "DrillFinished",
    "DrillResult",
    "DrillSummary",
    "drill_loop",
    "drill_table",
    "drillable_tables",
    "last_drills",
    "run_drills",
]

log = logging.getLogger("backstop.drill")

DRILL_SCHEMA = "backstop_drill"


@dataclass(frozen=True, slots=True)
class DrillFinished(Event):
    table: str
    snapshot_id: str | None
    passed: bool
    rows: int
    seconds: float
    error: str | None


@dataclass(frozen=True, slots=True)
class DrillResult:
    table: str
    snapshot_id: str | None
    passed: bool
    rows: int
    seconds: float  # the whole drill: restore, checks, clean-up
    restore_seconds: float
    validate_seconds: float
    checks: tuple[ValidationCheck, ...]
    error: str | None = None
    drill_id: int | None = None
    snapshot_age_seconds: float | None = None

    def details(self) -> dict[str, Any]:
        """What the state store keeps in the drill's details_json."""
        age = self.snapshot_age_seconds
        return {
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "restore_seconds": round(self.restore_seconds, 3),
            "validate_seconds": round(self.validate_seconds, 3),
            "snapshot_id": self.snapshot_id,
            "snapshot_age_seconds": round(age, 1) if age is not None else None,
            "checks": [c.as_dict() for c in self.checks],
            "error": self.error,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "passed": self.passed, "drill_id": self.drill_id} | (
            self.details()
        )


@dataclass(frozen=True, slots=True)
class DrillSummary:
    """The newest drill of one table, as `backstop snapshots` and the TUI show it."""

    table: str
    status: str  # running, passed, failed
    started_at: datetime
    finished_at: datetime | None
    snapshot_id: str | None
    rows: int | None
    seconds: float | None
    error: str | None
    failed_checks: tuple[str, ...]

    @classmethod
    def from_record(cls, record: DrillRecord) -> DrillSummary:
        try:
            details = json.loads(record.details_json or "{}")
        except ValueError:
            details = {}
        if not isinstance(details, dict):
            details = {}
        failed = tuple(
            str(c.get("name"))
            for c in details.get("checks") or ()
            if isinstance(c, dict) and not c.get("passed")
        )
        rows = details.get("rows")
        seconds = details.get("seconds")
        return cls(
            table=record.table,
            status=record.status,
            started_at=record.started_at,
            finished_at=record.finished_at,
            snapshot_id=record.snapshot_id,
            rows=int(rows) if isinstance(rows, int) else None,
            seconds=float(seconds) if isinstance(seconds, int | float) else None,
            error=details.get("error") if isinstance(details.get("error"), str) else None,
            failed_checks=failed,
        )

    def describe(self, now: datetime | None = None) -> str:
        """`passed 3 h ago: 1,000,000 rows restored and checked in 4.2 s`."""
        now = now or datetime.now(UTC)
        ago = _ago((now - self.started_at).total_seconds())
        if self.status == "running":
            return f"running since {ago} ago"
        text = f"{self.status} {ago} ago"
        if self.rows is not None and self.seconds is not None:
            text += f": {self.rows:,} rows restored and checked in {self.seconds:.1f} s"
        if self.failed_checks:
            text += f"; failed: {', '.join(self.failed_checks)}"
        if self.error:
            text += f"; {self.error}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "snapshot_id": self.snapshot_id,
            "rows": self.rows,
            "seconds": self.seconds,
            "error": self.error,
            "failed_checks": list(self.failed_checks),
            "detail": self.describe(),
        }


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


async def last_drills(state: StateStore, *, limit: int = 1000) -> dict[str, DrillSummary]:
    """The newest drill of each table (by schema.table)."""
    newest: dict[str, DrillSummary] = {}
    for record in await state.drills_list(limit=limit):  # newest first
        if record.table not in newest:
            newest[record.table] = DrillSummary.from_record(record)
    return newest


# --------------------------------------------------------------------------- which tables


def _covered(policy: Policy, table: str) -> bool:
    if policy.protection_for(table) is not None:
        return True
    return any(ProtectedTable(table=p).covers(table) for g in policy.groups for p in g.tables)


async def drillable_tables(
    store: ObjectStore, database: str, policy: Policy | None
) -> dict[str, ManifestSummary]:
    """Table -> its newest complete snapshot, for every table with one in the store that
    the policy protects (every table with a snapshot when no policy is given)."""
    newest: dict[str, ManifestSummary] = {}
    for summary in await list_snapshots(store, database):  # newest first
        if not summary.complete or summary.table in newest:
            continue
        if policy is not None and not _covered(policy, summary.table):
            continue
        newest[summary.table] = summary
    return dict(sorted(newest.items()))


# --------------------------------------------------------------------------- one drill


async def drill_table(
    dsn: str,
    store: ObjectStore,
    state: StateStore | None,
    table: str,
    summary: ManifestSummary | None,
    *,
    schema: str = DRILL_SCHEMA,
    workers: int | None = None,
    bus: EventBus | None = None,
) -> DrillResult:
    """Drill one table from `summary` (its newest complete snapshot; None: there is none,
    which is recorded as a failed drill)."""
    snapshot_id = summary.id if summary is not None else None
    record = await state.drill_start(table, snapshot_id) if state is not None else None
    started = time.perf_counter()
    restore_seconds = validate_seconds = 0.0
    rows = 0
    checks: tuple[ValidationCheck, ...] = ()
    error: str | None = None
    age = (datetime.now(UTC) - summary.started_at).total_seconds() if summary else None
    try:
        if summary is None:
            raise RestoreError(f"no complete snapshot of {table} in {store.describe()}")
        manifest = await load_manifest(store, summary.manifest_key)
        conn = await pgconnect.connect(dsn, purpose="drill")
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            restored = await restore_to_side_table(
                conn,
                store,
                manifest,
                summary.table,
                dsn=dsn,
                workers=workers,
                target_schema=schema,
                replace_existing=True,
                check_data=True,  # validated right below
            )
            restore_seconds = restored.seconds
            rows = restored.rows
            try:
                report = await validate_restore(conn, restored, foreign_keys=False)
                checks = report.checks
                validate_seconds = report.seconds
            finally:
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute(f"DROP TABLE IF EXISTS {restored.qualified}")
            with contextlib.suppress(asyncpg.PostgresError):
                # Only when nothing else is in it: another drill may be running.
                await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} RESTRICT")
        finally:
            await conn.close()
    except (
        RestoreError,
        SnapshotError,
        ObjectStoreError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
    ) as exc:
        error = str(exc) or type(exc).__name__
    seconds = time.perf_counter() - started
    passed = error is None and bool(checks) and all(c.passed for c in checks)
    result = DrillResult(
        table=table,
        snapshot_id=snapshot_id,
        passed=passed,
        rows=rows,
        seconds=seconds,
        restore_seconds=restore_seconds,
        validate_seconds=validate_seconds,
        checks=checks,
        error=error,
        drill_id=record.id if record is not None else None,
        snapshot_age_seconds=age,
    )
    if state is not None and record is not None:
        await state.drill_finish(
            record.id, passed=passed, details_json=json.dumps(result.details(), default=str)
        )
    if bus is not None:
        bus.publish(DrillFinished(table, snapshot_id, passed, rows, seconds, error))
    return result


async def _database(dsn: str) -> str:
    conn = await pgconnect.connect(dsn, purpose="drill")
    try:
        return str(await conn.fetchval("SELECT current_database()"))
    finally:
        await conn.close()


async def run_drills(
    dsn: str,
    store: ObjectStore,
    state: StateStore | None,
    *,
    tables: Sequence[str] | None = None,
    policy: Policy | None = None,
    database: str | None = None,
    schema: str = DRILL_SCHEMA,
    workers: int | None = None,
    bus: EventBus | None = None,
    on_result: Callable[[DrillResult], None] | None = None,
) -> list[DrillResult]:
    """One round of drills, one table after another: the named `tables`, or every table
    the policy protects that has a snapshot in the store. A table named but without a
    snapshot is recorded as a failed drill."""
    database = database or await _database(dsn)
    available = await drillable_tables(store, database, None if tables else policy)
    wanted: Iterable[str] = available if tables is None else [_qualify(t) for t in tables]
    results: list[DrillResult] = []
    for table in wanted:
        result = await drill_table(
            dsn,
            store,
            state,
            table,
            available.get(table),
            schema=schema,
            workers=workers,
            bus=bus,
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _qualify(table: str) -> str:
    return table if "." in table else f"public.{table}"


async def drill_loop(
    dsn: str,
    store: ObjectStore,
    state: StateStore | None,
    policy: Callable[[], Policy],
    *,
    interval_seconds: float | Callable[[], float] | None = None,
    bus: EventBus | None = None,
    workers: int | None = 1,
    first_delay_seconds: float = 60.0,
    recheck_seconds: float = 5.0,
) -> None:
    """Run a round of drills every interval until cancelled; a round's failures are
    recorded, never raised.

    The interval is the policy's `drills.interval_seconds`, or `interval_seconds` when given
    (a number, or a callable), which overrides it. It is read again at least every
    `recheck_seconds` while the loop waits, so a reloaded policy applies without a restart:
    0 (or less) turns drills off, the loop keeps waiting, and once the interval is positive
    again a round starts as soon as one is due. The first round is due `first_delay_seconds`
    after the loop starts, or one interval after if that is shorter; every later one an
    interval after the previous one started, and at least a second after it ended."""

    def interval() -> float:
        if interval_seconds is None:
            return float(policy().drills.interval_seconds)
        return float(interval_seconds() if callable(interval_seconds) else interval_seconds)

    started = time.monotonic()
    last_start: float | None = None
    last_end = started
    while True:
        every = interval()
        if every <= 0:
            await asyncio.sleep(recheck_seconds)
            continue
        if last_start is None:
            due = started + min(first_delay_seconds, every)
        else:
            due = max(last_start + every, last_end + 1.0)
        now = time.monotonic()
        if now < due:
            await asyncio.sleep(min(recheck_seconds, due - now))
            continue
        last_start = now
        try:
            results = await run_drills(dsn, store, state, policy=policy(), bus=bus, workers=workers)
            failed = [r.table for r in results if not r.passed]
            if failed:
                log.warning("restore drill failed for %s", ", ".join(failed))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("restore drills could not run: %s", exc)
        last_end = time.monotonic()
