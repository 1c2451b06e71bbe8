"""The recovery flow, step by step, and the guided prompts that walk an operator through it.

`Recovery` holds what one recovery needs (the upstream DSN, the snapshot store, the state
store for audit events, the policy for recovery groups) and offers each step: the tables
and groups that have snapshots, a table's snapshots and the destructive statements the
audit trail recorded on it, the choice of a snapshot ("latest", an id, or "the last one
before event N"), restore into side tables, validation, diff, and the copy-back SQL. The
CLI (`backstop recover`, scripted or guided) and the TUI's recovery screen both drive it;
it imports no UI.

`recover` runs the whole flow for a table or a group and returns a `RecoveryOutcome` that
the CLI prints as text or JSON. `guided` asks the questions first, with rich prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from backstop_core.policy import Policy, ProtectedTable
from backstop_core.recovery.copyback import (
    AppliedCopyBack,
    CopyBack,
    DiffSummary,
    apply_copy_back,
    build_copy_back,
    copy_back_path,
    diff_table,
    write_copy_back,
)
from backstop_core.recovery.restore import RestoreProgress, RestoreResult
from backstop_core.recovery.restore import restore_to_side_table as _restore
from backstop_core.recovery.validate import (
    ValidationCheck,
    ValidationReport,
    iter_checks,
    validate_restore,
)
from backstop_core.sidecar.objectstore import ObjectStore
from backstop_core.sidecar.snapshot import (
    Manifest,
    ManifestSummary,
    list_snapshots,
    load_manifest,
    manifest_key,
    split_table_name,
)
from backstop_core.store import AuditRecord, StateStore

__all__ = [
    "GroupSnapshot",
    "Recovery",
    "RecoveryOutcome",
    "SnapshotDamaged",
    "UsageError",
    "guided",
    "operator_name",
    "parse_snapshot_spec",
]


class UsageError(Exception):
    """The operator asked for something that does not exist or does not fit (exit code 2)."""


class SnapshotDamaged(Exception):
    """The snapshot asked for is incomplete in the store (exit code 1): the message names
    what is missing."""


def operator_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return f"uid:{os.getuid()}"


# --------------------------------------------------------------------------- snapshot choice


@dataclass(frozen=True, slots=True)
class SnapshotSpec:
    kind: str  # latest, id, before-event
    value: str = ""

    @property
    def event(self) -> int:
        return int(self.value)


def parse_snapshot_spec(text: str | Sequence[str]) -> SnapshotSpec:
    """`latest`, a snapshot id, or `before-event N` (also `before-event:N`, `before N`)."""
    raw = text if isinstance(text, str) else " ".join(text)
    words = raw.replace(":", " ").replace("=", " ").split()
    if not words or words == ["latest"]:
        return SnapshotSpec("latest")
    if words[0] in ("before-event", "before", "event") and len(words) == 2:
        number = words[1].lstrip("#")
        if not number.isdigit():
            raise UsageError(f"before-event needs an audit event number, not {words[1]!r}")
        return SnapshotSpec("before-event", number)
    if len(words) == 1:
        return SnapshotSpec("id", words[0])
    raise UsageError(f"{raw!r} is not a snapshot: give an id, latest, or before-event N")


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """One snapshot of a recovery group: every table of the group in one transaction."""

    id: str
    group: str
    started_at: datetime
    tables: tuple[str, ...]
    summaries: tuple[ManifestSummary, ...]

    @property
    def complete(self) -> bool:
        found = {s.table for s in self.summaries if s.complete}
        return all(t in found for t in self.tables)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.summaries)

    @property
    def size_bytes(self) -> int:
        return sum(s.size_bytes for s in self.summaries)

    @property
    def wal_lsn(self) -> str | None:
        return self.summaries[0].wal_lsn if self.summaries else None


# --------------------------------------------------------------------------- the outcome


@dataclass(slots=True)
class RecoveryOutcome:
    target: str  # the table or "group NAME"
    group: str | None
    manifest: Manifest | None = None
    results: list[RestoreResult] = field(default_factory=list)
    reports: list[ValidationReport] = field(default_factory=list)
    diffs: dict[str, DiffSummary] = field(default_factory=dict)
    copy_back: CopyBack | None = None
    sql_file: Path | None = None
    applied: AppliedCopyBack | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return bool(self.reports) and all(r.passed for r in self.reports)

    def as_dict(self) -> dict[str, Any]:
        manifest = self.manifest
        tables: list[dict[str, Any]] = []
        for result in self.results:
            report = next((r for r in self.reports if r.table == result.table), None)
            diff = self.diffs.get(result.table)
            tables.append(
                {
                    "table": result.table,
                    "side_table": result.restored_table,
                    "restore": result.as_dict(),
                    "passed": report.passed if report is not None else False,
                    "checks": [c.as_dict() for c in report.checks] if report else [],
                    "diff": diff.as_dict() if diff is not None else None,
                    "case": diff.case if diff is not None else None,
                }
            )
        first = tables[0] if len(tables) == 1 else None
        checks = [{"table": t["table"], **check} for t in tables for check in t["checks"]]
        return {
            "table": self.target if self.group is None else None,
            "group": self.group,
            "snapshot": _manifest_dict(manifest) if manifest is not None else None,
            "side_table": first["side_table"] if first else None,
            "side_tables": {t["table"]: t["side_table"] for t in tables},
            "passed": self.passed,
            "checks": checks,
            "diff": first["diff"] if first else {t["table"]: t["diff"] for t in tables},
            "case": first["case"] if first else {t["table"]: t["case"] for t in tables},
            "tables": tables,
            "sql": self.copy_back.sql if self.copy_back is not None else None,
            "sql_file": str(self.sql_file) if self.sql_file is not None else None,
            "applied": (
                {
                    "audit_key": self.applied.audit_key,
                    "seconds": round(self.applied.seconds, 3),
                    "wal_lsn_before": self.applied.wal_lsn,
                }
                if self.applied is not None
                else None
            ),
            "error": self.error,
        }


def _manifest_dict(manifest: Manifest) -> dict[str, Any]:
    return {
        "id": manifest.id,
        "group": manifest.group,
        "taken_at": manifest.started_at.isoformat(),
        "finished_at": manifest.finished_at.isoformat(),
        "age_seconds": round((datetime.now(UTC) - manifest.started_at).total_seconds(), 1),
        "rows": manifest.rows,
        "size_bytes": manifest.size_bytes,
        "wal_lsn": manifest.wal_lsn,
        "manifest_sha256": manifest.sha256,
        "tables": list(manifest.table_names),
    }


# --------------------------------------------------------------------------- the service


class Recovery:
    """Each step of a recovery against one database and one snapshot store."""

    def __init__(
        self,
        dsn: str,
        store: ObjectStore,
        state: StateStore | None = None,
        *,
        policy: Callable[[], Policy] | Policy | None = None,
        workers: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.dsn = dsn
        self.store = store
        self.state = state
        self._policy = policy
        self.workers = workers
        self.state_dir = state_dir
        self._conn: asyncpg.Connection | None = None
        self._database: str | None = None
        self._lock = asyncio.Lock()

    @property
    def policy(self) -> Policy | None:
        policy = self._policy
        return policy() if callable(policy) else policy

    async def connection(self) -> asyncpg.Connection:
        async with self._lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.dsn)
            return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def database(self) -> str:
        if self._database is None:
            conn = await self.connection()
            self._database = str(await conn.fetchval("SELECT current_database()"))
        return self._database

    # ------------------------------------------------------------------ what can be restored

    async def all_snapshots(self) -> list[ManifestSummary]:
        return await list_snapshots(self.store, await self.database())

    async def tables(self) -> dict[str, list[ManifestSummary]]:
        """Every table with snapshots in the store, with them newest first."""
        found: dict[str, list[ManifestSummary]] = {}
        for summary in await self.all_snapshots():
            found.setdefault(summary.table, []).append(summary)
        return dict(sorted(found.items()))

    async def resolve_table(self, name: str) -> str:
        """ "orders" or "public.orders" -> the schema.table the store has snapshots of."""
        tables = await self.tables()
        if name in tables:
            return name
        if "." not in name:
            bare = [t for t in tables if t.rpartition(".")[2] == name]
            if len(bare) == 1:
                return bare[0]
            if len(bare) > 1:
                raise UsageError(f"{name} is ambiguous: {', '.join(bare)}; name the schema")
        schema, table = split_table_name(name)
        qualified_name = f"{schema}.{table}"
        if qualified_name in tables:
            return qualified_name
        raise UsageError(
            f"no snapshot of {qualified_name} in {self.store.describe()} (database"
            f" {await self.database()})"
            + (f"; tables with snapshots: {', '.join(tables)}" if tables else "")
        )

    def group_names(self) -> list[str]:
        policy = self.policy
        return [g.name for g in policy.groups] if policy is not None else []

    def group_of(self, table: str) -> str | None:
        policy = self.policy
        if policy is None:
            return None
        for group in policy.groups:
            if any(ProtectedTable(table=p).covers(table) for p in group.tables):
                return group.name
        return None

    async def snapshots(self, table: str) -> list[ManifestSummary]:
        """Snapshots of `table`, newest first (incomplete ones included, marked)."""
        return await list_snapshots(self.store, await self.database(), table)

    async def group_snapshots(self, group: str) -> list[GroupSnapshot]:
        by_id: dict[str, list[ManifestSummary]] = {}
        for summary in await self.all_snapshots():
            if summary.group == group:
                by_id.setdefault(summary.id, []).append(summary)
        found = [
            GroupSnapshot(
                id=snapshot_id,
                group=group,
                started_at=items[0].started_at,
                tables=items[0].group_tables,
                summaries=tuple(sorted(items, key=lambda s: s.table)),
            )
            for snapshot_id, items in by_id.items()
        ]
        return sorted(found, key=lambda g: g.id, reverse=True)

    async def destructive_events(self, table: str, *, limit: int = 20) -> list[AuditRecord]:
        """Statements that dropped, emptied or rewrote `table`, newest first."""
        if self.state is None:
            return []
        return await self.state.audit_query(destructive_on=table, limit=limit)

    async def _event(self, number: int) -> AuditRecord:
        if self.state is None:
            raise UsageError("before-event needs the state directory with the audit trail")
        event = await self.state.audit_get(number)
        if event is None:
            raise UsageError(f"there is no audit event #{number} in this state directory")
        return event

    async def choose(self, table: str, spec: SnapshotSpec) -> ManifestSummary:
        """The snapshot of `table` that `spec` names (complete ones only)."""
        found = await self.snapshots(table)
        complete = [s for s in found if s.complete]
        if spec.kind == "id":
            match = next((s for s in found if s.id == spec.value), None)
            if match is None:
                raise UsageError(f"{table} has no snapshot {spec.value}")
            if not match.complete:
                raise SnapshotDamaged(
                    f"snapshot {spec.value} of {table} is damaged: {'; '.join(match.problems)}"
                )
            return match
        if spec.kind == "latest" and found and not found[0].complete:
            # Never fall back to older data silently: the operator picks one by id.
            raise SnapshotDamaged(
                f"the newest snapshot of {table}, {found[0].id}, is damaged:"
                f" {'; '.join(found[0].problems)}; name an older one with --snapshot ID"
            )
        if not complete:
            raise UsageError(f"{table} has no complete snapshot in {self.store.describe()}")
        if spec.kind == "latest":
            return complete[0]
        event = await self._event(spec.event)
        before = [s for s in complete if s.started_at < event.time]
        if not before:
            raise UsageError(
                f"no snapshot of {table} was taken before event #{spec.event}"
                f" ({event.time.astimezone(UTC):%Y-%m-%d %H:%M:%S UTC})"
            )
        return before[0]

    async def choose_group(self, group: str, spec: SnapshotSpec) -> GroupSnapshot:
        if group not in self.group_names():
            known = ", ".join(self.group_names()) or "none"
            raise UsageError(f"the policy has no recovery group {group!r} (groups: {known})")
        found = await self.group_snapshots(group)
        if spec.kind == "id":
            match = next((g for g in found if g.id == spec.value), None)
            if match is None or not match.complete:
                raise UsageError(f"group {group} has no complete snapshot {spec.value}")
            return match
        complete = [g for g in found if g.complete]
        if not complete:
            raise UsageError(f"group {group} has no complete snapshot in {self.store.describe()}")
        if spec.kind == "latest":
            return complete[0]
        event = await self._event(spec.event)
        before = [g for g in complete if g.started_at < event.time]
        if not before:
            raise UsageError(f"no snapshot of group {group} was taken before event #{spec.event}")
        return before[0]

    # ------------------------------------------------------------------ restore and after

    async def manifest_of(self, table: str, snapshot_id: str) -> Manifest:
        schema, name = split_table_name(table)
        key = manifest_key(await self.database(), schema, name, snapshot_id)
        return await load_manifest(self.store, key)

    async def restore(
        self,
        table: str,
        snapshot_id: str,
        *,
        progress: Callable[[RestoreProgress], None] | None = None,
        replace_existing: bool = False,
        manifest: Manifest | None = None,
        check_data: bool = False,
    ) -> RestoreResult:
        """Restore `table` from snapshot `snapshot_id` into its side table. `check_data`:
        count and checksum the rows while the indexes are built, for a validation that
        follows at once (see `restore_to_side_table`)."""
        manifest = manifest or await self.manifest_of(table, snapshot_id)
        conn = await self.connection()
        return await _restore(
            conn,
            self.store,
            manifest,
            table,
            on_progress=progress,
            dsn=self.dsn,
            workers=self.workers,
            replace_existing=replace_existing,
            check_data=check_data,
        )

    async def validate(
        self, restored: RestoreResult, siblings: Mapping[str, RestoreResult] | None = None
    ) -> AsyncIterator[ValidationCheck]:
        conn = await self.connection()
        async for check in iter_checks(conn, restored, siblings=siblings):
            yield check

    async def validation(
        self, restored: RestoreResult, siblings: Mapping[str, RestoreResult] | None = None
    ) -> ValidationReport:
        return await validate_restore(await self.connection(), restored, siblings=siblings)

    async def diff(self, restored: RestoreResult) -> DiffSummary:
        return await diff_table(await self.connection(), restored)

    async def copy_back(
        self, results: Sequence[RestoreResult], diffs: Mapping[str, DiffSummary]
    ) -> CopyBack:
        return await build_copy_back(await self.connection(), results, diffs)

    async def copy_back_sql(self, restored: RestoreResult) -> str:
        """The copy-back SQL for one validated side table (the TUI's last step)."""
        diff = await self.diff(restored)
        copy_back = await self.copy_back([restored], {restored.table: diff})
        if self.state_dir is not None:
            write_copy_back(
                copy_back, copy_back_path(self.state_dir, copy_back.tables, copy_back.snapshot_id)
            )
        return copy_back.sql

    async def apply(self, copy_back: CopyBack, *, operator: str | None = None) -> AppliedCopyBack:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await apply_copy_back(
                conn, copy_back, state=self.state, operator=operator or operator_name()
            )
        finally:
            await conn.close()

    # ------------------------------------------------------------------ the whole flow

    async def recover(
        self,
        *,
        table: str | None = None,
        group: str | None = None,
        snapshot_id: str,
        progress: Callable[[RestoreProgress], None] | None = None,
        on_restored: Callable[[RestoreResult], None] | None = None,
        on_validated: Callable[[ValidationReport], None] | None = None,
        replace_existing: bool = False,
        out: Path | None = None,
    ) -> RecoveryOutcome:
        """Restore, validate, diff and write the copy-back SQL for a table or a group from
        one snapshot. Stops after validation when a check fails (no SQL; side tables
        kept). A damaged snapshot raises RestoreError."""
        if (table is None) == (group is None):
            raise UsageError("recover a table or a group")
        if group is not None:
            chosen = await self.choose_group(group, SnapshotSpec("id", snapshot_id))
            first = chosen.summaries[0]
            manifest = await load_manifest(self.store, first.manifest_key)
            names = list(manifest.table_names)
        else:
            assert table is not None
            manifest = await self.manifest_of(table, snapshot_id)
            names = [manifest.table(table).name]
        outcome = RecoveryOutcome(
            table if table is not None else f"group {group}", group, manifest=manifest
        )
        for name in names:
            # Validated below, before anything else touches the side tables: the count
            # and checksum are read while the restore builds the indexes.
            restored = await self.restore(
                name,
                manifest.id,
                progress=progress,
                replace_existing=replace_existing,
                manifest=manifest,
                check_data=True,
            )
            outcome.results.append(restored)
            if on_restored is not None:
                on_restored(restored)
        siblings = {r.table: r for r in outcome.results}
        for restored in outcome.results:
            others = {k: v for k, v in siblings.items() if k != restored.table}
            report = await self.validation(restored, others)
            outcome.reports.append(report)
            if on_validated is not None:
                on_validated(report)
        if not outcome.passed:
            return outcome
        for restored in outcome.results:
            outcome.diffs[restored.table] = await self.diff(restored)
        copy_back = await self.copy_back(outcome.results, outcome.diffs)
        outcome.copy_back = copy_back
        if out is None and self.state_dir is not None:
            out = copy_back_path(self.state_dir, copy_back.tables, copy_back.snapshot_id)
        if out is not None:
            outcome.sql_file = write_copy_back(copy_back, out)
        return outcome


# --------------------------------------------------------------------------- rendering


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def _age(moment: datetime) -> str:
    seconds = max(0.0, (datetime.now(UTC) - moment).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _local(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def render_checks(console: Any, report: ValidationReport) -> None:
    from rich.table import Table

    grid = Table.grid(padding=(0, 1))
    for check in report.checks:
        mark = "[green]✓[/]" if check.passed else "[red]✗[/]"
        grid.add_row(mark, f"[bold]{check.name}[/]", _escape(check.detail))
    console.print(f"Validation of [bold]{report.side_table}[/] ({report.seconds:.1f} s)")
    console.print(grid)


def render_diff(console: Any, diff: DiffSummary) -> None:
    console.print(f"[bold]{_escape(diff.table)}[/]: {_escape(diff.describe())}")
    for line in diff.sample:
        console.print(f"  [dim]{_escape(line)}[/]")
    for note in diff.notes:
        console.print(f"  [yellow]note:[/] {_escape(note)}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def progress_bar(console: Any) -> tuple[Any, Callable[[RestoreProgress], None]]:
    """A rich progress bar, and the callback that moves it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(p: RestoreProgress) -> None:
        task = tasks.get(p.table)
        if task is None:
            task = tasks[p.table] = bar.add_task(p.table, total=max(p.rows_total, 1))
        bar.update(task, completed=p.rows_done, description=f"{p.table} {p.phase}")

    return bar, update


# --------------------------------------------------------------------------- guided


@dataclass(frozen=True, slots=True)
class GuidedChoice:
    table: str | None
    group: str | None
    snapshot_id: str


async def guided(recovery: Recovery, console: Any) -> GuidedChoice:
    """Ask which table or group, and which snapshot; shows the snapshots (time, age, rows,
    size, WAL position) and the destructive statements the audit trail holds, so the
    operator can pick "the last snapshot before event N"."""
    from rich.prompt import Prompt
    from rich.table import Table

    tables = await recovery.tables()
    groups = recovery.group_names()
    if not tables and not groups:
        raise UsageError(
            f"there are no snapshots in {recovery.store.describe()} for database"
            f" {await recovery.database()}"
        )
    choices: list[tuple[str, str]] = [("group", g) for g in groups]
    choices += [("table", t) for t in tables]
    listing = Table(title="What went wrong?", title_justify="left", box=None)
    listing.add_column("#", justify="right")
    listing.add_column("table or group")
    listing.add_column("snapshots", justify="right")
    listing.add_column("newest", justify="right")
    for number, (kind, name) in enumerate(choices, 1):
        if kind == "group":
            listing.add_row(str(number), f"[bold]group {name}[/]", "", "")
        else:
            newest = tables[name][0]
            listing.add_row(
                str(number), name, str(len(tables[name])), f"{_age(newest.started_at)} ago"
            )
    console.print(listing)
    answer = Prompt.ask("Table or group (number or name)", console=console).strip()
    kind, name = _pick(answer, choices)
    if kind == "group":
        found = await recovery.group_snapshots(name)
        if not found:
            raise UsageError(f"group {name} has no snapshots")
        shown = _snapshot_table(f"Snapshots of group {name}")
        for number, g in enumerate(found, 1):
            shown.add_row(
                str(number),
                g.id,
                _local(g.started_at),
                _age(g.started_at),
                f"{g.rows:,}",
                _size(g.size_bytes),
                g.wal_lsn or "-",
                "" if g.complete else "[red]incomplete[/]",
            )
        console.print(shown)
        events: list[AuditRecord] = []
        for member in found[0].tables:
            events += await recovery.destructive_events(member, limit=10)
        _show_events(console, sorted(events, key=lambda e: e.id, reverse=True))
        spec = _ask_snapshot(console, [g.id for g in found])
        chosen = await recovery.choose_group(name, spec)
        return GuidedChoice(None, name, chosen.id)
    snapshots = await recovery.snapshots(name)
    shown = _snapshot_table(f"Snapshots of {name}")
    for number, s in enumerate(snapshots, 1):
        shown.add_row(
            str(number),
            s.id,
            _local(s.started_at),
            _age(s.started_at),
            f"{s.rows:,}",
            _size(s.size_bytes),
            s.wal_lsn or "-",
            "" if s.complete else "[red]incomplete[/]",
        )
    console.print(shown)
    _show_events(console, await recovery.destructive_events(name))
    group = recovery.group_of(name)
    if group is not None:
        console.print(
            f"[yellow]{name} belongs to recovery group {group}[/]: restoring the group keeps"
            " its tables consistent with each other."
        )
    spec = _ask_snapshot(console, [s.id for s in snapshots])
    chosen_one = await recovery.choose(name, spec)
    return GuidedChoice(name, None, chosen_one.id)


def _snapshot_table(title: str) -> Any:
    from rich.table import Table

    shown = Table(title=title, title_justify="left", box=None)
    for column in ("#", "snapshot", "taken", "age", "rows", "size", "WAL LSN", ""):
        shown.add_column(column, no_wrap=column in ("snapshot", "taken", "WAL LSN"))
    return shown


def _pick(answer: str, choices: Sequence[tuple[str, str]]) -> tuple[str, str]:
    if answer.isdigit() and 1 <= int(answer) <= len(choices):
        return choices[int(answer) - 1]
    for kind, name in choices:
        if answer in (name, f"group {name}") or (
            kind == "table" and answer == name.rpartition(".")[2]
        ):
            return kind, name
    raise UsageError(f"{answer!r} is none of the tables or groups listed")


def _show_events(console: Any, events: Sequence[AuditRecord]) -> None:
    from rich.table import Table

    if not events:
        console.print("[dim]The audit trail holds no destructive statement on it.[/]")
        return
    shown = Table(title="Destructive statements (audit trail)", title_justify="left", box=None)
    for column in ("event", "time", "agent", "operation", "outcome", "WAL LSN", "SQL"):
        shown.add_column(column, no_wrap=column != "SQL")
    for e in events:
        sql = " ".join(e.sql.split())
        shown.add_row(
            f"#{e.id}",
            _local(e.time),
            _escape(e.agent),
            e.operation,
            e.outcome or "-",
            e.wal_lsn or "-",
            _escape(sql[:60] + ("..." if len(sql) > 60 else "")),
        )
    console.print(shown)


def _ask_snapshot(console: Any, ids: Sequence[str]) -> SnapshotSpec:
    from rich.prompt import Prompt

    answer = Prompt.ask(
        "Snapshot: a number from the list, an id, latest, or before N (the last snapshot"
        " before event N)",
        console=console,
        default="latest",
    ).strip()
    if answer.isdigit() and 1 <= int(answer) <= len(ids):
        return SnapshotSpec("id", ids[int(answer) - 1])
    return parse_snapshot_spec(answer)


def confirm(console: Any, question: str) -> bool:
    from rich.prompt import Confirm

    if not sys.stdin.isatty():
        # Piped answers still work; only a closed stdin counts as "no".
        line = sys.stdin.readline()
        console.print(f"{question} [y/n]: {line.strip()}")
        return line.strip().lower() in ("y", "yes")
    return bool(Confirm.ask(question, console=console, default=False))
