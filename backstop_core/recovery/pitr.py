"""Point-in-time recovery helpers: can this server do PITR, and where should replay stop.

Snapshots bring back one table as it was at the snapshot. PITR brings back the whole
cluster as it was at any moment, from a base backup plus archived WAL. Backstop cannot take
base backups, but it can say whether the server archives WAL at all, and, because the
gateway records the WAL position just before every statement that drops, empties or
rewrites a table, it can say exactly where replay should stop: just before that statement.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from backstop_core.store import AuditRecord, StateStore

__all__ = [
    "PitrCheck",
    "PitrError",
    "PitrReport",
    "PitrTarget",
    "check_pitr",
    "recovery_target",
]


class PitrError(Exception):
    """The question cannot be answered; the message says why and what to do instead."""


@dataclass(frozen=True, slots=True)
class PitrCheck:
    name: str
    ok: bool
    value: str
    detail: str  # what it means, in plain words
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "value": self.value,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class PitrReport:
    server_version: str
    in_recovery: bool
    checks: tuple[PitrCheck, ...]
    archiver: dict[str, Any]

    @property
    def possible(self) -> bool:
        return all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        head = (
            "Point-in-time recovery is possible on this server, given a base backup taken"
            " after archiving started."
            if self.possible
            else "Point-in-time recovery is NOT possible on this server yet:"
        )
        out = [head]
        for check in sorted(self.checks, key=lambda c: c.ok):
            out.append(f"  {'ok ' if check.ok else 'NO '} {check.name}: {check.detail}")
            if check.fix and not check.ok:
                out.append(f"       fix: {check.fix}")
        out.append(
            "Backstop cannot see base backups from SQL: check that one exists (pg_basebackup,"
            " pgBackRest, WAL-G, Barman) and is newer than the moment you need."
        )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "possible": self.possible,
            "server_version": self.server_version,
            "in_recovery": self.in_recovery,
            "checks": [c.as_dict() for c in self.checks],
            "archiver": self.archiver,
        }


async def _setting(conn: asyncpg.Connection, name: str) -> str | None:
    """A setting's value; None when it does not exist in this version or cannot be read."""
    try:
        value = await conn.fetchval("SELECT current_setting($1, true)", name)
    except asyncpg.InsufficientPrivilegeError:
        return None
    return None if value is None else str(value)


def _when(value: datetime | None) -> str:
    if value is None:
        return "never"
    age = (datetime.now(UTC) - value).total_seconds()
    stamp = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if age < 120:
        return f"{stamp} ({age:.0f} s ago)"
    if age < 7200:
        return f"{stamp} ({age / 60:.0f} min ago)"
    if age < 172800:
        return f"{stamp} ({age / 3600:.1f} h ago)"
    return f"{stamp} ({age / 86400:.1f} days ago)"


async def check_pitr(conn: asyncpg.Connection) -> PitrReport:
    """What this server's WAL settings and archiver say about point-in-time recovery."""
    version = str(await conn.fetchval("SHOW server_version"))
    in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    wal_level = await _setting(conn, "wal_level") or "unknown"
    archive_mode = await _setting(conn, "archive_mode") or "unknown"
    command = await _setting(conn, "archive_command")
    library = await _setting(conn, "archive_library")
    timeout = await _setting(conn, "archive_timeout")
    checks: list[PitrCheck] = []

    checks.append(
        PitrCheck(
            "wal_level",
            wal_level in ("replica", "logical"),
            wal_level,
            f"wal_level is {wal_level}: "
            + (
                "the WAL holds enough to replay every change"
                if wal_level in ("replica", "logical")
                else "the WAL leaves out what replay needs"
            ),
            "set wal_level = replica in postgresql.conf and restart PostgreSQL",
        )
    )

    archiving = archive_mode == "always" or (archive_mode == "on" and not in_recovery)
    if archive_mode == "on" and in_recovery:
        mode_detail = "archive_mode is on, but this server is a standby, which archives only"
        mode_detail += " with archive_mode = always"
    elif archiving:
        mode_detail = f"archive_mode is {archive_mode}: finished WAL segments are archived"
    else:
        mode_detail = f"archive_mode is {archive_mode}: WAL is not archived, so there is"
        mode_detail += " nothing to replay past the last base backup"
    checks.append(
        PitrCheck(
            "archive_mode",
            archiving,
            archive_mode,
            mode_detail,
            "set archive_mode = on (always on a standby) in postgresql.conf and restart"
            " PostgreSQL; it takes effect only with an archive_command or archive_library",
        )
    )

    if command is None and library is None:
        checks.append(
            PitrCheck(
                "archive_command",
                True,
                "unreadable",
                "archive_command cannot be read by this role (it needs superuser or"
                " pg_read_all_settings); the archiver's statistics below tell whether it works",
            )
        )
    else:
        configured = bool(library) or (bool(command) and command != "(disabled)")
        shown = f"archive_library = {library}" if library else f"archive_command = {command!r}"
        checks.append(
            PitrCheck(
                "archive_command",
                configured,
                library or command or "",
                f"{shown}: "
                + (
                    "WAL segments are handed to it"
                    if configured
                    else "nothing copies WAL anywhere (with archive_mode on, pg_wal keeps"
                    " growing until it is set)"
                ),
                "set archive_command (for example 'pgbackrest --stanza=main archive-push %p'"
                " or 'wal-g wal-push %p') or archive_library, then reload PostgreSQL",
            )
        )

    row = await conn.fetchrow(
        "SELECT archived_count, last_archived_wal, last_archived_time, failed_count,"
        " last_failed_wal, last_failed_time, stats_reset FROM pg_catalog.pg_stat_archiver"
    )
    archiver: dict[str, Any] = {}
    if row is not None:
        archiver = {k: row[k] for k in row.keys()}  # noqa: SIM118 - asyncpg Record
        for key, value in list(archiver.items()):
            if isinstance(value, datetime):
                archiver[key] = value.isoformat()
        archived = int(row["archived_count"] or 0)
        failed = int(row["failed_count"] or 0)
        last_ok: datetime | None = row["last_archived_time"]
        last_bad: datetime | None = row["last_failed_time"]
        failing = last_bad is not None and (last_ok is None or last_bad > last_ok)
        if failing:
            detail = (
                f"archiving is failing: {failed:,} failures, the last for"
                f" {row['last_failed_wal']} at {_when(last_bad)}; last success"
                f" {row['last_archived_wal'] or '-'} at {_when(last_ok)}"
            )
            fix = "read the PostgreSQL server log for the archive_command's error, and fix it"
        elif archived == 0:
            detail = "no WAL segment has been archived yet" + (
                " (archiving is off)" if not archiving else ""
            )
            fix = (
                "once archiving is set up, SELECT pg_switch_wal() forces a segment out, so you"
                " can see it arrive in the archive"
            )
        else:
            detail = (
                f"{archived:,} segments archived, the last {row['last_archived_wal']} at"
                f" {_when(last_ok)}; {failed:,} failures"
            )
            if timeout and timeout not in ("0", "0s"):
                detail += f"; archive_timeout {timeout} bounds how much recent WAL can be lost"
            fix = None
        checks.append(
            PitrCheck(
                "archiver",
                archived > 0 and not failing,
                f"{archived} archived, {failed} failed",
                detail,
                fix,
            )
        )
    return PitrReport(version, in_recovery, tuple(checks), archiver)


# --------------------------------------------------------------------------- recovery target


@dataclass(frozen=True, slots=True)
class PitrTarget:
    event: AuditRecord
    lsn: str

    def lines(self) -> list[str]:
        event = self.event
        when = event.time.astimezone(UTC)
        sql = " ".join(event.sql.split())
        if len(sql) > 120:
            sql = sql[:117] + "..."
        tables = ", ".join(event.tables) or "-"
        return [
            f"# Backstop: replay up to just before audit event #{event.id}",
            f"#   {when.strftime('%Y-%m-%d %H:%M:%S UTC')}  agent {event.agent}"
            f"  {event.operation} on {tables} ({event.outcome or 'outcome unknown'})",
            f"#   {sql}",
            f"recovery_target_lsn = '{self.lsn}'",
            "recovery_target_inclusive = false",
            "# recovery_target_action = 'pause'  # look around, then promote",
            f"# by time instead: recovery_target_time = '{when.isoformat(sep=' ')}'",
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": self.event.id,
            "lsn": self.lsn,
            "time": self.event.time.isoformat(),
            "operation": self.event.operation,
            "tables": list(self.event.tables),
            "sql": self.event.sql,
            "settings": {
                "recovery_target_lsn": self.lsn,
                "recovery_target_inclusive": False,
            },
            "lines": self.lines(),
        }


async def recovery_target(state: StateStore, event_id: int) -> PitrTarget:
    """The recovery target that stops replay just before audit event `event_id`."""
    event = await state.audit_get(event_id)
    if event is None:
        with contextlib.suppress(Exception):
            await state.ingest()
            event = await state.audit_get(event_id)
    if event is None:
        raise PitrError(f"there is no audit event #{event_id} in this state directory")
    if not event.wal_lsn:
        when = event.time.astimezone(UTC).isoformat(sep=" ")
        raise PitrError(
            f"audit event #{event_id} ({event.operation} on {', '.join(event.tables) or '-'})"
            " has no WAL position: the gateway records one just before statements that drop,"
            " empty or rewrite a whole table. Stop by time instead:"
            f" recovery_target_time = '{when}' (approximate: it is when the gateway saw the"
            " statement)"
        )
    return PitrTarget(event, event.wal_lsn)
