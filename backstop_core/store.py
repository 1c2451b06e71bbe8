"""Backstop's state: audit events, approvals, alerts, snapshots and drills.

Everything the core persists goes through `Store` (the `StateStore` protocol); no other module
holds SQL for the state store, so a PostgreSQL-backed store can replace SQLite behind the same
interface.

The audit hot path never waits for SQLite. `audit_begin` appends one line to
`<state_dir>/audit.journal` with a single `os.write` on a file opened with O_APPEND: once the
call returns the record is in the kernel's page cache, so killing the gateway with SIGKILL
cannot lose it. An ingest task moves journal lines into SQLite in batches and records, in the
same transaction, how far into the journal it got; records carry a unique key and inserts are
upserts, so reading a line twice never duplicates a row. Power loss is not covered: neither the
journal nor SQLite (synchronous=NORMAL) is fsynced per statement.

The gateway, which audits thousands of statements a second, copies its records into a spool
instead (`use_spool`): `<state_dir>/audit.spool-<token>`, a file of NUL bytes mapped into
memory, where a record costs a memory copy and no system call. A copied record is in the
page cache like a written one, so SIGKILL loses none of these either. The spool moves to the
journal in one write at every ingest interval (and whenever it is full), so the audit shows a
record within that interval; its process holds an exclusive flock on it, and any store that
ingests moves the spools of dead processes (their records up to the first NUL, without an
unfinished last line) and removes them.

Journal lines (UTF-8, one record per line, fields positional):
    ["h",journal_id,1]                                          first line of every journal file
    ["b",key,unix_time,session_id,agent,client,sql,operation,risk,[tables],decision,rule,reason,
     row_estimate,approval_id,snapshot_id,snapshot_manifest_sha256,wal_lsn]<TAB>classification JSON
    ["t",ref,0,session_id,agent,client,null,operation,...,wal_lsn]<TAB>classification JSON
    ["c",key,unix_time,ref,sql]
    ["f",key,outcome,duration_ms,error]
    ["a",key,approval_id,snapshot_id,snapshot_manifest_sha256,wal_lsn]
unix_time and duration_ms are JSON numbers; the gateway writes them as integer nanoseconds with
an exponent (1765046400123456789e-9, 1234567e-6). A "t" record is an audit template: a "b"
record but its key, time and SQL, journaled by the writer before the first "c" record that
names it by its ref (unique: the writer's key prefix, "t", a number); a "c" record is the
"b" record that template and its own key, time and SQL make, a fifth of the bytes. The
ingest keeps every template it reads in the `audit_templates` table, so a "c" record read
later, by any process, finds its template. A writer journals each of its templates again
a day after it last did (`TEMPLATE_RENEW_SECONDS`), and the ingest drops the templates no
writer journaled in a week: those of sessions long gone.

Every process that writes the journal holds a shared flock on it. A fully ingested journal
larger than `ROTATE_BYTES` is replaced by a fresh file (new journal id, with any not yet
ingested tail carried over) by whichever store gets the exclusive flock, so rotation only
happens while at most one process writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import json.encoder
import logging
import mmap
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiosqlite
import orjson

from backstop_core.journal import TEMPLATE_RENEW_SECONDS, AuditTemplate, JournalWriter

log = logging.getLogger("backstop.store")

DB_NAME = "backstop.db"
JOURNAL_NAME = "audit.journal"
JOURNAL_FORMAT = 2  # 2 added the "t" and "c" records
# The gateway's spool (`Store.use_spool`): a memory-mapped file its records are copied into,
# moved to the journal every ingest interval (or when full).
SPOOL_PREFIX = "audit.spool-"
SPOOL_BYTES = 4 * 1024 * 1024
# A journal this large and fully ingested is replaced by an empty one.
ROTATE_BYTES = 4 * 1024 * 1024
# Most not-yet-ingested bytes a rotation copies into the new journal (it blocks the event loop).
ROTATE_MAX_TAIL = 1024 * 1024
# How often the writer asks whether another process has ingested its journal.
ROTATE_CHECK_INTERVAL = 1.0
# Most bytes of journal one ingest transaction reads (a longer single line is still read whole).
INGEST_BATCH_BYTES = 4 * 1024 * 1024
BUSY_TIMEOUT_SECONDS = 5.0
# The state database keeps an audit template while a writer journaled it in this long
# (writers journal theirs again every `TEMPLATE_RENEW_SECONDS`); the ingest drops older
# ones at most every `TEMPLATE_PRUNE_INTERVAL`, after a pass that read the whole journal.
TEMPLATE_KEEP_SECONDS = 7 * TEMPLATE_RENEW_SECONDS
TEMPLATE_PRUNE_INTERVAL = 3600.0
# Rows one transaction of `audit_prune` deletes, so the ingest is never held up for long.
PRUNE_CHUNK_ROWS = 5000

OUTCOMES = frozenset({"forwarded", "blocked", "denied", "timed_out", "cancelled", "error"})
APPROVAL_STATUSES = frozenset({"pending", "approved", "denied", "expired", "cancelled", "used"})
# status -> the statuses it may be reached from
_APPROVAL_TRANSITIONS: dict[str, frozenset[str]] = {
    "approved": frozenset({"pending"}),
    "denied": frozenset({"pending"}),
    "expired": frozenset({"pending", "approved"}),
    "cancelled": frozenset({"pending", "approved"}),
    "used": frozenset({"approved"}),
}
ALERT_SEVERITIES = frozenset({"info", "warning", "critical"})
ALERT_STATUSES = frozenset({"open", "acked", "closed"})
SNAPSHOT_STATUSES = frozenset({"running", "ok", "failed"})


class StoreError(Exception):
    """The state store cannot do what was asked; the message says why, for an operator."""


class ApprovalStateError(StoreError):
    """An approval is not in a state that allows the change; `approval` is how it stands."""

    def __init__(self, message: str, approval: ApprovalRecord) -> None:
        super().__init__(message)
        self.approval = approval


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class AuditStart:
    """What the gateway knows about a statement before forwarding it."""

    session_id: str
    agent: str
    client: str
    sql: str
    operation: str
    risk: str
    tables: tuple[str, ...]
    # JSON array of the statement's classifications, serialized once per SQL text by the
    # caller; it is embedded in the journal as is.
    classification_json: str
    decision: str
    rule: str
    reason: str
    row_estimate: int | None = None
    approval_id: int | None = None
    snapshot_id: str | None = None
    snapshot_manifest_sha256: str | None = None
    wal_lsn: str | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audited statement as stored; `outcome` is None until the gateway reports it."""

    id: int
    key: str
    time: datetime
    session_id: str
    agent: str
    client: str
    sql: str
    operation: str
    risk: str
    tables: tuple[str, ...]
    classifications: tuple[Any, ...]
    decision: str
    rule: str
    reason: str
    row_estimate: int | None
    approval_id: int | None
    snapshot_id: str | None
    snapshot_manifest_sha256: str | None
    wal_lsn: str | None
    outcome: str | None
    error: str | None
    duration_ms: float | None


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    id: int
    created_at: datetime
    agent: str
    client: str
    session_id: str
    sql: str
    sql_hash: str
    params_hash: str | None
    operation: str
    tables: tuple[str, ...]
    risk: str
    classification_json: str
    row_estimate: int | None
    table_rows: int | None
    rule: str
    reason: str
    snapshot_id: str | None
    snapshot_manifest_sha256: str | None
    snapshot_age_seconds: float | None
    audit_key: str | None
    status: str
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str | None
    expires_at: datetime
    fingerprint: str | None

    def describe_status(self) -> str:
        """`denied by alice at 2025-01-02 10:00:00 UTC`: how the approval came to its state."""
        text = self.status
        if self.decided_by:
            text += f" by {self.decided_by}"
        if self.decided_at is not None:
            text += f" at {_format_time(self.decided_at)}"
        return text


@dataclass(frozen=True, slots=True)
class AlertRecord:
    id: int
    time: datetime
    kind: str
    key: str
    severity: str
    title: str
    details_json: str
    status: str
    acked_by: str | None
    acked_at: datetime | None
    closed_at: datetime | None
    last_seen: datetime
    count: int


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    id: str
    database: str
    tables: tuple[str, ...]
    status: str
    started_at: datetime
    finished_at: datetime | None = None
    manifest_sha256: str | None = None
    location: str | None = None
    rows: int | None = None
    size_bytes: int | None = None
    wal_lsn: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DrillRecord:
    id: int
    started_at: datetime
    finished_at: datetime | None
    table: str
    snapshot_id: str | None
    status: str
    details_json: str


@dataclass(frozen=True, slots=True)
class JournalStats:
    """How far ingestion has got; `corrupt_lines` counts journal lines skipped as unreadable."""

    journal_id: str | None
    ingested_bytes: int
    journal_bytes: int
    corrupt_lines: int


# --------------------------------------------------------------------------- protocol


class StateStore(Protocol):
    """What the core needs from its state store (SQLite today, PostgreSQL later)."""

    def start_ingest(self, *, elsewhere: bool = False) -> None: ...
    async def close(self) -> None: ...

    def audit_begin(self, start: AuditStart) -> str: ...
    def audit_template(self, start: AuditStart) -> AuditTemplate: ...
    def audit_finish(
        self, key: str, outcome: str, duration_ms: float, error: str | None = None
    ) -> None: ...
    def audit_forwarded(self, key: str, duration_ms: float) -> None: ...
    def audit_attach(
        self,
        key: str,
        *,
        approval_id: int | None = None,
        snapshot_id: str | None = None,
        snapshot_manifest_sha256: str | None = None,
        wal_lsn: str | None = None,
    ) -> None: ...
    async def ingest(self) -> int: ...
    async def audit_query(
        self,
        *,
        limit: int = 100,
        agent: str | None = None,
        risk: str | None = None,
        decision: str | None = None,
        table: str | None = None,
        text: str | None = None,
        since_id: int | None = None,
        destructive_on: str | None = None,
    ) -> list[AuditRecord]: ...
    async def audit_prune(self, before: float, *, dry_run: bool = False) -> int: ...
    async def audit_get(self, event_id: int) -> AuditRecord | None: ...
    async def audit_get_by_key(self, key: str) -> AuditRecord | None: ...
    async def journal_stats(self) -> JournalStats: ...

    async def approval_create(
        self,
        *,
        agent: str,
        client: str,
        session_id: str,
        sql: str,
        sql_hash: str,
        operation: str,
        tables: Sequence[str],
        risk: str,
        classification_json: str,
        rule: str,
        reason: str,
        expires_at: datetime,
        params_hash: str | None = None,
        row_estimate: int | None = None,
        table_rows: int | None = None,
        snapshot_id: str | None = None,
        snapshot_manifest_sha256: str | None = None,
        snapshot_age_seconds: float | None = None,
        audit_key: str | None = None,
        fingerprint: str | None = None,
    ) -> ApprovalRecord: ...
    async def approval_get(self, approval_id: int) -> ApprovalRecord | None: ...
    async def approvals_list(
        self, *, status: str | None = "pending", limit: int = 100
    ) -> list[ApprovalRecord]: ...
    async def approval_decide(
        self, approval_id: int, *, approve: bool, decided_by: str, reason: str | None
    ) -> ApprovalRecord: ...
    async def approval_set_status(
        self, approval_id: int, status: str, reason: str | None = None
    ) -> ApprovalRecord: ...
    async def approval_mark_used(self, approval_id: int) -> bool: ...
    async def approvals_expire_all_pending(self, reason: str) -> int: ...
    async def approval_changes_since(self, version: int) -> tuple[int, list[ApprovalRecord]]: ...
    async def approval_find_recent(
        self, *, fingerprint: str, agent: str, since: datetime
    ) -> ApprovalRecord | None: ...

    async def alert_open(
        self, kind: str, key: str, *, severity: str, title: str, details_json: str = "{}"
    ) -> tuple[AlertRecord, bool]: ...
    async def alert_ack(self, alert_id: int, acked_by: str) -> AlertRecord: ...
    async def alert_close(self, kind: str, key: str) -> AlertRecord | None: ...
    async def alert_close_id(self, alert_id: int) -> AlertRecord: ...
    async def alerts_list(
        self, *, status: str | None = None, limit: int = 100
    ) -> list[AlertRecord]: ...

    async def snapshot_put(self, snapshot: SnapshotRecord) -> None: ...
    async def snapshot_get(self, snapshot_id: str) -> SnapshotRecord | None: ...
    async def snapshots_list(
        self, *, table: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[SnapshotRecord]: ...
    async def snapshot_latest(self, table: str, *, status: str = "ok") -> SnapshotRecord | None: ...

    async def drill_start(self, table: str, snapshot_id: str | None) -> DrillRecord: ...
    async def drill_finish(
        self, drill_id: int, *, passed: bool, details_json: str = "{}"
    ) -> DrillRecord: ...
    async def drills_list(self, *, limit: int = 100) -> list[DrillRecord]: ...


# --------------------------------------------------------------------------- schema

_MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE audit_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL UNIQUE,
            ts REAL NOT NULL,
            session_id TEXT, agent TEXT, client TEXT, sql TEXT, operation TEXT, risk TEXT,
            tables TEXT NOT NULL DEFAULT '[]',
            classifications TEXT NOT NULL DEFAULT '[]',
            decision TEXT, rule TEXT, reason TEXT,
            row_estimate INTEGER, approval_id INTEGER, snapshot_id TEXT,
            snapshot_manifest_sha256 TEXT, wal_lsn TEXT,
            outcome TEXT, error TEXT, duration_ms REAL)""",
        """CREATE TABLE journal_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            journal_id TEXT,
            position INTEGER NOT NULL,
            corrupt_lines INTEGER NOT NULL)""",
        "INSERT INTO journal_state (id, journal_id, position, corrupt_lines) "
        "VALUES (1, NULL, 0, 0)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO counters (name, value) VALUES ('approvals', 0)",
        """CREATE TABLE approvals (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at REAL NOT NULL,
            agent TEXT NOT NULL, client TEXT NOT NULL, session_id TEXT NOT NULL,
            sql TEXT NOT NULL, sql_hash TEXT NOT NULL, params_hash TEXT,
            operation TEXT NOT NULL, tables TEXT NOT NULL, risk TEXT NOT NULL,
            classifications TEXT NOT NULL, row_estimate INTEGER, table_rows INTEGER,
            rule TEXT NOT NULL, reason TEXT NOT NULL,
            snapshot_id TEXT, snapshot_manifest_sha256 TEXT, snapshot_age_seconds REAL,
            audit_key TEXT,
            status TEXT NOT NULL,
            decided_by TEXT, decided_at REAL, decision_reason TEXT,
            expires_at REAL NOT NULL,
            fingerprint TEXT,
            version INTEGER NOT NULL)""",
        "CREATE INDEX approvals_status ON approvals (status, id)",
        "CREATE INDEX approvals_version ON approvals (version)",
        "CREATE INDEX approvals_fingerprint ON approvals (fingerprint, agent, decided_at)",
        """CREATE TABLE alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            opened_at REAL NOT NULL, last_seen REAL NOT NULL, count INTEGER NOT NULL,
            kind TEXT NOT NULL, key TEXT NOT NULL, severity TEXT NOT NULL, title TEXT NOT NULL,
            details_json TEXT NOT NULL, status TEXT NOT NULL,
            acked_by TEXT, acked_at REAL, closed_at REAL)""",
        # At most one live alert per condition, even with several processes raising it.
        "CREATE UNIQUE INDEX alerts_live ON alerts (kind, key) WHERE status != 'closed'",
        "CREATE INDEX alerts_status ON alerts (status, id)",
        """CREATE TABLE snapshots (
            id TEXT PRIMARY KEY,
            database TEXT NOT NULL, tables TEXT NOT NULL, status TEXT NOT NULL,
            started_at REAL NOT NULL, finished_at REAL,
            manifest_sha256 TEXT, location TEXT, rows INTEGER, size_bytes INTEGER,
            wal_lsn TEXT, error TEXT)""",
        "CREATE INDEX snapshots_started ON snapshots (started_at)",
        """CREATE TABLE drills (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            started_at REAL NOT NULL, finished_at REAL,
            table_name TEXT NOT NULL, snapshot_id TEXT, status TEXT NOT NULL,
            details_json TEXT NOT NULL)""",
    ),
    # Audit templates ("t" journal records), for "c" records read after them.
    ("CREATE TABLE audit_templates (ref TEXT PRIMARY KEY, line TEXT NOT NULL)",),
    # When each template was last journaled (read by the ingest), so old ones can go; the
    # ones already kept count from the upgrade.
    (
        "ALTER TABLE audit_templates ADD COLUMN seen_at REAL NOT NULL DEFAULT 0",
        "UPDATE audit_templates SET seen_at = CAST(strftime('%s', 'now') AS REAL)",
    ),
]
SCHEMA_VERSION = len(_MIGRATIONS)

_AUDIT_COLUMNS = (
    "id, key, ts, session_id, agent, client, sql, operation, risk, tables, classifications, "
    "decision, rule, reason, row_estimate, approval_id, snapshot_id, snapshot_manifest_sha256, "
    "wal_lsn, outcome, error, duration_ms"
)
_AUDIT_UPSERT = """
INSERT INTO audit_events (key, ts, session_id, agent, client, sql, operation, risk, tables,
    classifications, decision, rule, reason, row_estimate, approval_id, snapshot_id,
    snapshot_manifest_sha256, wal_lsn, outcome, error, duration_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    approval_id = coalesce(excluded.approval_id, approval_id),
    snapshot_id = coalesce(excluded.snapshot_id, snapshot_id),
    snapshot_manifest_sha256 = coalesce(excluded.snapshot_manifest_sha256,
                                        snapshot_manifest_sha256),
    wal_lsn = coalesce(excluded.wal_lsn, wal_lsn),
    outcome = coalesce(excluded.outcome, outcome),
    error = coalesce(excluded.error, error),
    duration_ms = coalesce(excluded.duration_ms, duration_ms)
"""
_AUDIT_FINISH = "UPDATE audit_events SET outcome = ?, error = ?, duration_ms = ? WHERE key = ?"
_AUDIT_ATTACH = """
UPDATE audit_events SET
    approval_id = coalesce(?, approval_id),
    snapshot_id = coalesce(?, snapshot_id),
    snapshot_manifest_sha256 = coalesce(?, snapshot_manifest_sha256),
    wal_lsn = coalesce(?, wal_lsn)
WHERE key = ?
"""
_APPROVAL_COLUMNS = (
    "id, created_at, agent, client, session_id, sql, sql_hash, params_hash, operation, tables, "
    "risk, classifications, row_estimate, table_rows, rule, reason, snapshot_id, "
    "snapshot_manifest_sha256, snapshot_age_seconds, audit_key, status, decided_by, decided_at, "
    "decision_reason, expires_at, fingerprint"
)
_ALERT_COLUMNS = (
    "id, opened_at, kind, key, severity, title, details_json, status, acked_by, acked_at, "
    "closed_at, last_seen, count"
)
_SNAPSHOT_COLUMNS = (
    "id, database, tables, status, started_at, finished_at, manifest_sha256, location, rows, "
    "size_bytes, wal_lsn, error"
)
_DRILL_COLUMNS = "id, started_at, finished_at, table_name, snapshot_id, status, details_json"


# --------------------------------------------------------------------------- journal codec


def _make_line_encoder() -> Callable[[tuple[Any, ...]], str]:
    """Compact JSON for one journal record, as cheap as the standard library allows."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:
        return json.JSONEncoder(separators=(",", ":"), default=str).encode
    # json.dumps builds this C encoder again on every call; building it once halves the cost.
    c_encoder = c_make_encoder(
        None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )

    def encode(record: tuple[Any, ...]) -> str:
        return "".join(c_encoder(record, 0))

    return encode


_encode_record = _make_line_encoder()
_decode_json = json.JSONDecoder().decode


def _decode_record(text: str) -> Any:
    """A journal line's JSON: orjson, about three times faster, and the standard library
    for what orjson refuses (escaped lone surrogates, which SQL decoded with
    surrogateescape can contain)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _decode_json(text)


def _journal_header(journal_id: str) -> bytes:
    return _encode_record(("h", journal_id, JOURNAL_FORMAT)).encode() + b"\n"


def _read_header(fd: int) -> str | None:
    """The journal id from a journal's first line, or None when it has no valid header."""
    head = os.pread(fd, 256, 0)
    end = head.find(b"\n")
    if end < 0:
        return None
    try:
        record = _decode_json(head[:end].decode("utf-8"))
    except ValueError:
        return None
    if type(record) is list and len(record) == 3 and record[0] == "h" and type(record[1]) is str:
        return record[1]
    return None


def _spool_records(fd: int) -> bytes:
    """The whole records in a spool file: up to its first NUL, without a last line that a
    process killed while copying it left unfinished (its statement was never forwarded)."""
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    end = data.find(b"\x00")
    if end >= 0:
        data = data[:end]
    return data[: data.rfind(b"\n") + 1]


def _read_complete_lines(fd: int, position: int) -> tuple[bytes, bool]:
    """Whole lines from `position` (an unfinished last line is left for later) and whether
    more may follow past what was read."""
    want = INGEST_BATCH_BYTES
    while True:
        data = os.pread(fd, want, position)
        end = data.rfind(b"\n")
        if end >= 0:
            return data[: end + 1], len(data) == want
        if len(data) < want:
            return b"", False
        want *= 2


# An audit row as the ingest builds it: _AUDIT_UPSERT's parameters.
_ROW_LENGTH = 21
# What of a row an audit template holds: all but key, time, SQL and outcome.
_TEMPLATE_COLUMNS = (2, 3, 4, *range(6, 18))
# Audit templates the ingest keeps in memory; past this it forgets them and reads from SQLite.
TEMPLATES_IN_MEMORY = 4096


@dataclass(slots=True)
class _ParsedBatch:
    rows: list[list[Any]]
    finishes: list[tuple[Any, ...]]
    attaches: list[tuple[Any, ...]]
    records: int
    corrupt: int
    defined: list[tuple[str, str]]  # (ref, line) of each "t" record, to keep in SQLite
    # Rows of "c" records whose template was not in memory, with its ref.
    unresolved: list[tuple[list[Any], str]]


def _split_lines(data: bytes) -> list[str | None]:
    try:
        return list(data.decode("utf-8").split("\n"))
    except UnicodeDecodeError:
        lines: list[str | None] = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(None)
        return lines


def _parse_journal(
    data: bytes, known_classifications: set[str], templates: dict[str, list[Any]]
) -> _ParsedBatch:
    """Journal lines -> rows to upsert and outcome/attachment updates for earlier rows.

    An outcome or attachment whose begin is in the same batch is folded into the row, so the
    common case is one insert per statement. Unreadable lines are counted and skipped.
    `templates` holds the audit templates read so far, by ref ("t" records add to it); a
    "c" record whose template it lacks gets a row of its own fields only, in
    `batch.unresolved`, for the caller to complete from the templates in SQLite.
    """
    pending: dict[str, list[Any]] = {}
    finishes: list[tuple[Any, ...]] = []
    attaches: list[tuple[Any, ...]] = []
    defined: list[tuple[str, str]] = []
    unresolved: list[tuple[list[Any], str]] = []
    records = corrupt = 0
    table_lists: dict[tuple[str, ...], str] = {}
    for line in _split_lines(data):
        if not line:
            if line is None:
                corrupt += 1
                log.warning("audit journal: skipped a line that is not valid UTF-8")
            continue
        head, _, classifications = line.partition("\t")
        record: Any
        try:
            record = _decode_record(head)
        except ValueError:
            record = None
        kind = record[0] if type(record) is list and record else None
        if (
            kind == "c"
            and len(record) == 5
            and type(record[1]) is str
            and type(record[3]) is str
            and type(record[4]) is str
        ):
            try:
                ts = float(record[2])
            except (TypeError, ValueError):
                pass
            else:
                template = templates.get(record[3])
                if template is None:
                    named: list[Any] = [None] * _ROW_LENGTH
                    named[8] = named[9] = "[]"  # tables and classifications: NOT NULL
                    unresolved.append((named, record[3]))
                else:
                    named = template.copy()
                named[0], named[1], named[5] = record[1], ts, record[4]
                pending[record[1]] = named
                records += 1
                continue
        elif (kind == "b" or kind == "t") and len(record) == 18 and type(record[1]) is str:
            begun = _begin_row(record, classifications, known_classifications, table_lists)
            if begun is not None:
                if kind == "b":
                    pending[record[1]] = begun
                else:  # a "c" record's row takes its key, time and SQL from the record
                    _remember_template(templates, record[1], begun)
                    defined.append((record[1], line))
                records += 1
                continue
        elif kind == "f" and len(record) == 5 and type(record[1]) is str:
            row = pending.get(record[1])
            if row is not None:
                row[18], row[19], row[20] = record[2], record[4], record[3]
            else:
                finishes.append((record[2], record[4], record[3], record[1]))
            records += 1
            continue
        elif kind == "a" and len(record) == 6 and type(record[1]) is str:
            row = pending.get(record[1])
            if row is not None:
                for column, value in zip((14, 15, 16, 17), record[2:], strict=True):
                    if value is not None:
                        row[column] = value
            else:
                attaches.append((*record[2:], record[1]))
            records += 1
            continue
        elif kind == "h":
            continue
        corrupt += 1
        if corrupt <= 3:
            log.warning("audit journal: skipped an unreadable line: %.120r", line)
    if corrupt > 3:
        log.warning("audit journal: skipped %d unreadable lines in one batch", corrupt)
    return _ParsedBatch(
        list(pending.values()), finishes, attaches, records, corrupt, defined, unresolved
    )


def _begin_row(
    record: list[Any],
    classifications: str,
    known_classifications: set[str],
    table_lists: dict[tuple[str, ...], str],
) -> list[Any] | None:
    """The audit row of a "b" record (or the template a "t" record holds), None if invalid."""
    if classifications not in known_classifications:
        if not _valid_classification_json(classifications):
            return None
        if len(known_classifications) < 4096:
            known_classifications.add(classifications)
    if type(record[9]) is not list:
        return None
    try:
        key = tuple(record[9])
        tables = table_lists.get(key)
        if tables is None:
            tables = table_lists[key] = json.dumps(record[9], separators=(",", ":"))
        return [
            record[1],
            float(record[2]),
            record[3],
            record[4],
            record[5],
            record[6],
            record[7],
            record[8],
            tables,
            classifications,
            record[10],
            record[11],
            record[12],
            record[13],
            record[14],
            record[15],
            record[16],
            record[17],
            None,
            None,
            None,
        ]
    except (TypeError, ValueError):
        return None


def _remember_template(templates: dict[str, list[Any]], ref: str, row: list[Any]) -> None:
    if len(templates) >= TEMPLATES_IN_MEMORY:
        templates.clear()  # the rest are in SQLite
    templates[ref] = row


def _valid_classification_json(text: str) -> bool:
    # A raw tab or newline means two lines ran together (a torn write); JSON has neither.
    if not text or "\t" in text or "\n" in text:
        return False
    try:
        return type(_decode_json(text)) is list
    except ValueError:
        return False


def _bindable(row: Sequence[Any]) -> list[Any]:
    """A row SQLite will accept: lone surrogates escaped, odd values as JSON text."""
    fixed: list[Any] = []
    for value in row:
        if isinstance(value, str):
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        elif value is not None and not isinstance(value, int | float):
            value = json.dumps(value, default=str)
        fixed.append(value)
    return fixed


# --------------------------------------------------------------------------- helpers


def _now() -> float:
    return time.time()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _dt_or_none(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _ts(value: datetime, name: str) -> float:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (got {value!r})")
    return value.timestamp()


def _format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _json_tuple(text: str | None) -> tuple[Any, ...]:
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        return ()
    return tuple(value) if isinstance(value, list) else ()


def _table_match(column: str, table: str) -> tuple[str, list[Any]]:
    """SQL matching `table` against a JSON array column: `orders` also matches `public.orders`."""
    name = table if '"' in table else table.lower()
    if "." in name:
        return f"EXISTS (SELECT 1 FROM json_each({column}) t WHERE t.value = ?)", [name]
    return (
        f"EXISTS (SELECT 1 FROM json_each({column}) t "
        "WHERE t.value = ? OR substr(t.value, -?) = ?)",
        [name, len(name) + 1, "." + name],
    )


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return a.st_ino == b.st_ino and a.st_dev == b.st_dev


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("short write")
        view = view[written:]


def _audit_record(row: Sequence[Any]) -> AuditRecord:
    return AuditRecord(
        id=row[0],
        key=row[1],
        time=_dt(row[2]),
        session_id=row[3] or "",
        agent=row[4] or "",
        client=row[5] or "",
        sql=row[6] or "",
        operation=row[7] or "",
        risk=row[8] or "",
        tables=tuple(str(t) for t in _json_tuple(row[9])),
        classifications=_json_tuple(row[10]),
        decision=row[11] or "",
        rule=row[12] or "",
        reason=row[13] or "",
        row_estimate=row[14],
        approval_id=row[15],
        snapshot_id=row[16],
        snapshot_manifest_sha256=row[17],
        wal_lsn=row[18],
        outcome=row[19],
        error=row[20],
        duration_ms=row[21],
    )


def _approval_record(row: Sequence[Any]) -> ApprovalRecord:
    return ApprovalRecord(
        id=row[0],
        created_at=_dt(row[1]),
        agent=row[2],
        client=row[3],
        session_id=row[4],
        sql=row[5],
        sql_hash=row[6],
        params_hash=row[7],
        operation=row[8],
        tables=tuple(str(t) for t in _json_tuple(row[9])),
        risk=row[10],
        classification_json=row[11],
        row_estimate=row[12],
        table_rows=row[13],
        rule=row[14],
        reason=row[15],
        snapshot_id=row[16],
        snapshot_manifest_sha256=row[17],
        snapshot_age_seconds=row[18],
        audit_key=row[19],
        status=row[20],
        decided_by=row[21],
        decided_at=_dt_or_none(row[22]),
        decision_reason=row[23],
        expires_at=_dt(row[24]),
        fingerprint=row[25],
    )


def _alert_record(row: Sequence[Any]) -> AlertRecord:
    return AlertRecord(
        id=row[0],
        time=_dt(row[1]),
        kind=row[2],
        key=row[3],
        severity=row[4],
        title=row[5],
        details_json=row[6],
        status=row[7],
        acked_by=row[8],
        acked_at=_dt_or_none(row[9]),
        closed_at=_dt_or_none(row[10]),
        last_seen=_dt(row[11]),
        count=row[12],
    )


def _snapshot_record(row: Sequence[Any]) -> SnapshotRecord:
    return SnapshotRecord(
        id=row[0],
        database=row[1],
        tables=tuple(str(t) for t in _json_tuple(row[2])),
        status=row[3],
        started_at=_dt(row[4]),
        finished_at=_dt_or_none(row[5]),
        manifest_sha256=row[6],
        location=row[7],
        rows=row[8],
        size_bytes=row[9],
        wal_lsn=row[10],
        error=row[11],
    )


def _drill_record(row: Sequence[Any]) -> DrillRecord:
    return DrillRecord(
        id=row[0],
        started_at=_dt(row[1]),
        finished_at=_dt_or_none(row[2]),
        table=row[3],
        snapshot_id=row[4],
        status=row[5],
        details_json=row[6],
    )


# --------------------------------------------------------------------------- store


class Store:
    """The SQLite state store. Open with `await Store.open(state_dir)`.

    The audit methods `audit_begin`, `audit_finish` and `audit_attach` are synchronous and must
    be called from the event loop's thread; everything else is a coroutine. Several processes
    (the gateway and the `backstop` CLI) may open the same state directory at once.
    """

    def __init__(self, state_dir: Path, db: aiosqlite.Connection, ingest_interval: float) -> None:
        self.state_dir = state_dir
        self.journal_path = state_dir / JOURNAL_NAME
        self._db = db
        self._ingest_interval = ingest_interval
        self._lock = asyncio.Lock()
        self._classification_ok: dict[str, str] = {}
        self._known_classifications: set[str] = set()
        self._templates: dict[str, list[Any]] = {}  # read by the ingest, by ref
        self._templates_made = 0
        self._templates_pruned_at = 0.0  # monotonic
        self._wake = asyncio.Event()
        # Appends to the journal; opened by `_open_writer`, replaced by `_try_rotate`.
        self.journal = JournalWriter(
            str(self.journal_path),
            secrets.token_hex(5) + "-",
            self._open_writer,
            self._wake.set,
            StoreError,
        )
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._spool_path: Path | None = None
        self._spool_fd = -1

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(cls, state_dir: Path, *, ingest_interval: float = 0.1) -> Store:
        """Open (creating if needed) the state in `state_dir` and ingest any journal left over
        by a process that died. The ingest task starts only with `start_ingest()`."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_path = state_dir / DB_NAME
        # Created owner-only: the audit log holds every statement's SQL.
        os.close(os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        try:
            db = await aiosqlite.connect(
                db_path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state database {db_path}: {exc}") from exc
        store = cls(state_dir, db, ingest_interval)
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            await store._migrate()
            await store._pick_unused_tag()
            await store.ingest()
        except BaseException:
            await db.close()
            raise
        return store

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start_ingest(self, *, elsewhere: bool = False) -> None:
        """Move journal records into SQLite every `ingest_interval` seconds from now on.

        With `elsewhere`, another process (`backstop_core.ingest`) does the moving, and this
        one, the journal's writer, only replaces the journal once that process has ingested
        it (`rotate_if_ingested`): a reader cannot rotate a journal that is being written.
        """
        if self._task is None and not self._closed:
            loop = self._rotate_loop() if elsewhere else self._ingest_loop()
            self._task = asyncio.get_running_loop().create_task(loop, name="backstop-audit-ingest")

    def use_spool(self) -> None:
        """Copy this process's audit records into a memory-mapped spool file instead of
        appending each to the journal: for the gateway, where the journal's small appends
        were the largest cost of a statement. The records reach the journal (and the audit)
        within an ingest interval; a killed process's spool is moved by the next store that
        ingests. Held with an exclusive lock: an unlocked spool belongs to a dead process."""
        if self.journal.spool is not None or self._closed:
            return
        token = secrets.token_hex(8)
        tmp = self.state_dir / f".{SPOOL_PREFIX}{token}.tmp"
        path = self.state_dir / f"{SPOOL_PREFIX}{token}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create the audit spool {path}: {exc}") from exc
        try:
            # Locked and sized before it gets the name other stores look for.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, SPOOL_BYTES)
            spool = mmap.mmap(fd, SPOOL_BYTES)
            os.rename(tmp, path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot create the audit spool {path}: {exc}") from exc
        self.journal.flush()  # what is buffered comes before the spool's records
        self._spool_path, self._spool_fd = path, fd
        self.journal.attach_spool(spool)

    def _release_spool(self) -> None:
        """Unmap and remove this process's spool, once its records are in the journal."""
        path = self._spool_path
        spool = self.journal.detach_spool()
        if spool is None or path is None:
            return
        spool.close()
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(self._spool_fd)
        self._spool_path, self._spool_fd = None, -1

    def _adopt_spools(self) -> None:
        """Move the records of spools whose process died into the journal."""
        for path in sorted(self.state_dir.glob(f"{SPOOL_PREFIX}*")):
            if path == self._spool_path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # another store moved it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive and moves it itself
                records = _spool_records(fd)
                if records:
                    # Moved twice if this process dies before the unlink: a record read
                    # twice never duplicates a row.
                    self.journal.write_journal(records)
                log.info("audit spool of a stopped process moved: %d bytes", len(records))
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)

    async def rotate_if_ingested(self) -> bool:
        """Replace this process's journal if it is large and (all but its last
        `ROTATE_MAX_TAIL` bytes) ingested; the rest is carried into the new one."""
        if self.journal.fd < 0 or os.fstat(self.journal.fd).st_size < ROTATE_BYTES:
            return False
        rows = await self._fetchall("SELECT journal_id, position FROM journal_state WHERE id = 1")
        known_id, position = rows[0][0], int(rows[0][1])
        try:
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            if _read_header(fd) != known_id or position < ROTATE_BYTES:
                return False
            before = os.fstat(self.journal.fd)
            self._try_rotate(fd, position)
            return self.journal.fd >= 0 and not _same_file(before, os.fstat(self.journal.fd))
        finally:
            os.close(fd)

    async def _rotate_loop(self) -> None:
        """`start_ingest(elsewhere=True)`: write the buffered outcomes out for the other
        process to find, and rotate the journal once it has been ingested."""
        rotate_due = 0.0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ingest_interval):
                    await self._wake.wait()
            self._wake.clear()
            self.journal.begins = 0
            if self._stopping:
                return
            try:
                self.journal.flush()
                self.journal.spill()
                self.journal.renew_templates(time.time())
                # Whether the other process has caught up is a query through the database
                # thread: under load (when it waits) asking every tick costs the statements.
                now = time.monotonic()
                if now >= rotate_due:
                    rotated = await self.rotate_if_ingested()
                    rotate_due = now if rotated else now + ROTATE_CHECK_INTERVAL
            except Exception:
                log.exception("audit journal rotation failed; retrying")

    async def stop_ingest(self) -> None:
        """Stop the task `start_ingest` started; a later `start_ingest` starts a new one."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Stop the ingest task, ingest what is left and release the files."""
        if self._closed:
            return
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        try:
            await self.ingest()
            self._release_spool()
        finally:
            self._closed = self.journal.closed = True
            if self.journal.fd >= 0:
                os.close(self.journal.fd)
                self.journal.fd = -1
            await self._db.close()

    async def _ingest_loop(self) -> None:
        delay = self._ingest_interval
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.ingest()
                delay = self._ingest_interval
            except Exception:
                log.exception("audit ingest failed; retrying")
                delay = max(1.0, self._ingest_interval)

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = list(await db.execute_fetchall("SELECT version FROM schema_version"))
            version = int(rows[0][0]) if rows else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.state_dir / DB_NAME} has schema version {version}; this Backstop "
                    f"knows up to {SCHEMA_VERSION}: upgrade Backstop"
                )
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    await db.execute(statement)
            if not rows:
                await db.execute(
                    "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
                )
            elif version != SCHEMA_VERSION:
                await db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    async def _pick_unused_tag(self) -> None:
        """Keys must never repeat: re-draw the random prefix if history already holds it."""
        while True:
            prefix = self.journal.tag
            rows = await self._db.execute_fetchall(
                "SELECT 1 FROM audit_events WHERE key >= ? AND key < ? LIMIT 1",
                (prefix, prefix[:-1] + "."),
            )
            if not list(rows):
                return
            self.journal.tag = secrets.token_hex(5) + "-"

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time across processes."""
        async with self._lock:
            db = self._db
            # BEGIN and COMMIT run on aiosqlite's thread and finish even if this task is
            # cancelled meanwhile: shield them, and roll back what a cancellation interrupts,
            # or the connection would stay inside a transaction for every later caller.
            begin = asyncio.ensure_future(db.execute("BEGIN IMMEDIATE"))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await begin
                    await db.execute("ROLLBACK")
                raise
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.state_dir / DB_NAME}: {exc}") from exc
            try:
                yield db
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    await asyncio.shield(db.execute("ROLLBACK"))
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"state database {self.state_dir / DB_NAME}: {exc}") from exc
                raise
            else:
                await asyncio.shield(db.execute("COMMIT"))

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._lock:
            try:
                return list(await self._db.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.state_dir / DB_NAME}: {exc}") from exc

    # ---------------------------------------------------------------- audit hot path

    def audit_begin(self, start: AuditStart) -> str:
        """Journal a statement about to be forwarded; durable against SIGKILL on return.

        Returns the event key for `audit_finish` and `audit_attach`. Raises StoreError when
        the journal cannot be written, in which case the statement must not be forwarded.
        """
        return self.journal.begin(self._template(start).with_sql(start.sql))

    def audit_template(self, start: AuditStart) -> AuditTemplate:
        """`start` but its SQL, encoded once: a gateway session that runs statements judged
        alike (a prepared statement again, a query with other literals) journals each with
        `journal.begin_sql` or `begin_tail` as a short record naming the template, which is
        journaled once."""
        self._templates_made += 1
        return self._template(start, f"{self.journal.tag}t{self._templates_made}")

    def _template(self, start: AuditStart, ref: str = "") -> AuditTemplate:
        classifications = self._classification_ok.get(start.classification_json)
        if classifications is None:
            classifications = self._admit_classification(start.classification_json)
        head = _encode_record((start.session_id, start.agent, start.client))
        rest = _encode_record(
            (
                start.operation,
                start.risk,
                start.tables,
                start.decision,
                start.rule,
                start.reason,
                start.row_estimate,
                start.approval_id,
                start.snapshot_id,
                start.snapshot_manifest_sha256,
                start.wal_lsn,
            )
        )
        return AuditTemplate(
            "," + head[1:-1] + ",", "," + rest[1:] + "\t" + classifications + "\n", ref
        )

    def audit_finish(
        self, key: str, outcome: str, duration_ms: float, error: str | None = None
    ) -> None:
        """Record how a statement ended. Buffered: written with the next begin or by the
        ingest timer, so a SIGKILL may lose the last few outcomes (the rows stay, outcome
        unknown)."""
        if outcome not in OUTCOMES:
            raise ValueError(
                f"unknown audit outcome {outcome!r}; expected one of {sorted(OUTCOMES)}"
            )
        self.journal.append(_encode_record(("f", key, outcome, duration_ms, error)) + "\n")

    def audit_forwarded(self, key: str, duration_ms: float) -> None:
        """`audit_finish(key, "forwarded", duration_ms)`, the outcome of nearly every
        statement (the gateway calls `journal.forwarded` with nanoseconds directly)."""
        self.journal.forwarded(key, max(0, round(duration_ms * 1_000_000)))

    def audit_attach(
        self,
        key: str,
        *,
        approval_id: int | None = None,
        snapshot_id: str | None = None,
        snapshot_manifest_sha256: str | None = None,
        wal_lsn: str | None = None,
    ) -> None:
        """Add what was learnt after `audit_begin` (written at once: recovery relies on it)."""
        record = ("a", key, approval_id, snapshot_id, snapshot_manifest_sha256, wal_lsn)
        self.journal.append(_encode_record(record) + "\n")
        self.journal.flush()

    def _admit_classification(self, raw: str) -> str:
        """Check a classification JSON text once; the caller reuses the same text per SQL."""
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"classification_json is not valid JSON: {exc}") from exc
        if not isinstance(parsed, list):
            raise ValueError("classification_json must be a JSON array")
        safe = raw
        try:
            raw.encode("utf-8")
            unencodable = False
        except UnicodeEncodeError:
            unencodable = True
        if unencodable or "\n" in raw or "\t" in raw:
            safe = json.dumps(parsed, separators=(",", ":"))
        if len(self._classification_ok) >= 4096:
            self._classification_ok.clear()
        self._classification_ok[raw] = safe
        return safe

    def _open_writer(self) -> int:
        """Open the journal for appending and hold a shared lock on it while writing."""
        if self._closed:
            raise StoreError("the state store is closed")
        try:
            while True:
                try:
                    fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                except FileNotFoundError:
                    created = self._create_journal(b"", replace=False)
                    if created >= 0:
                        os.close(created)  # reopened above, then locked and checked like any
                    continue
                fcntl.flock(fd, fcntl.LOCK_SH)
                # A rotation may have replaced the file between open and lock.
                try:
                    current = os.stat(self.journal_path)
                except FileNotFoundError:
                    current = None
                if current is not None and _same_file(current, os.fstat(fd)):
                    break
                os.close(fd)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                self.journal.needs_newline = True
        except OSError as exc:
            raise StoreError(f"cannot open the audit journal {self.journal_path}: {exc}") from exc
        self.journal.fd = fd
        return fd

    def _create_journal(self, tail: bytes, *, replace: bool) -> int:
        """Write a new journal (header, then `tail`) beside the old one and put it in place
        atomically; a reader never sees a journal without its header. Returns an fd to it,
        or -1 when another process created it first."""
        journal_id = secrets.token_hex(8)
        tmp = self.state_dir / f".{JOURNAL_NAME}.{journal_id}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, _journal_header(journal_id) + tail)
            if replace:
                os.rename(tmp, self.journal_path)
                return fd
            try:
                os.link(tmp, self.journal_path)
            except FileExistsError:
                os.close(fd)
                return -1
            return fd
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # ---------------------------------------------------------------- ingest

    async def ingest(self) -> int:
        """Move every complete journal record into SQLite now; returns how many moved."""
        self.journal.flush()
        self.journal.spill()
        self.journal.renew_templates(time.time())
        self._adopt_spools()
        self.journal.begins = 0
        total = 0
        while True:
            moved, more = await self._ingest_batch()
            total += moved
            if not more:
                break
        if time.monotonic() - self._templates_pruned_at >= TEMPLATE_PRUNE_INTERVAL:
            await self._prune_templates()
        return total

    async def _prune_templates(self) -> None:
        """Drop the audit templates no writer journaled in `TEMPLATE_KEEP_SECONDS`.

        Only after a pass that moved the dead processes' spools and read the journal to its
        end: a record still unread then was written since, and its writer had journaled
        its template within `TEMPLATE_RENEW_SECONDS` before it, so that template stays."""
        self._templates_pruned_at = time.monotonic()
        try:
            async with self._transaction() as db:
                cursor = await db.execute(
                    "DELETE FROM audit_templates WHERE seen_at < ?",
                    (time.time() - TEMPLATE_KEEP_SECONDS,),
                )
                dropped = cursor.rowcount
        except StoreError as exc:  # housekeeping: the ingest that asked has done its work
            log.warning("audit: could not drop old audit templates (next try in an hour): %s", exc)
            return
        if dropped > 0:
            log.info("audit: dropped %d audit templates unused for a week", dropped)

    async def _ingest_batch(self) -> tuple[int, bool]:
        try:
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0, False
        try:
            async with self._transaction() as db:
                rows = list(
                    await db.execute_fetchall(
                        "SELECT journal_id, position FROM journal_state WHERE id = 1"
                    )
                )
                known_id, position = rows[0][0], int(rows[0][1])
                # Opened before the transaction: the path may have been rotated since.
                reopened = self._reopen_if_rotated(fd)
                if reopened is not None:
                    os.close(fd)
                    fd = reopened
                journal_id = _read_header(fd)
                size = os.fstat(fd).st_size
                if journal_id != known_id or position > size:
                    if journal_id == known_id:
                        log.warning("audit journal shrank below what was ingested; rereading it")
                    position = 0
                data, more = await asyncio.to_thread(_read_complete_lines, fd, position)
                if not data:
                    moved = 0
                    end = position
                else:
                    batch = await asyncio.to_thread(
                        _parse_journal, data, self._known_classifications, self._templates
                    )
                    corrupt = batch.corrupt + await self._resolve_templates(db, batch)
                    corrupt += await self._store_batch(db, batch)
                    moved = batch.records
                    end = position + len(data)
                    await db.execute(
                        "UPDATE journal_state SET journal_id = ?, position = ?, "
                        "corrupt_lines = corrupt_lines + ? WHERE id = 1",
                        (journal_id, end, corrupt),
                    )
            if not more and end >= ROTATE_BYTES:
                self._try_rotate(fd, end)
            return moved, more
        finally:
            os.close(fd)

    def _reopen_if_rotated(self, fd: int) -> int | None:
        try:
            current = os.stat(self.journal_path)
        except FileNotFoundError:
            return None
        if _same_file(current, os.fstat(fd)):
            return None
        try:
            return os.open(self.journal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    async def _resolve_templates(self, db: aiosqlite.Connection, batch: _ParsedBatch) -> int:
        """Keep the batch's audit templates and complete the rows of "c" records whose
        template an earlier ingest (maybe another process's) read; returns how many of
        those have none (their rows keep key, time and SQL)."""
        if batch.defined:
            now = time.time()
            await db.executemany(
                "INSERT OR REPLACE INTO audit_templates (ref, line, seen_at) VALUES (?, ?, ?)",
                [(ref, line, now) for ref, line in batch.defined],
            )
        if not batch.unresolved:
            return 0
        wanted = list({ref for _, ref in batch.unresolved})
        found: dict[str, list[Any]] = {}
        for first in range(0, len(wanted), 500):
            refs = wanted[first : first + 500]
            marks = ", ".join("?" * len(refs))
            for ref, line in await db.execute_fetchall(
                f"SELECT ref, line FROM audit_templates WHERE ref IN ({marks})", refs
            ):
                head, _, classifications = line.partition("\t")
                with contextlib.suppress(ValueError):
                    record = _decode_record(head)
                    row = _begin_row(record, classifications, self._known_classifications, {})
                    if row is not None:
                        found[ref] = row
                        _remember_template(self._templates, ref, row)
        missing = 0
        for row, ref in batch.unresolved:
            template = found.get(ref)
            if template is None:
                missing += 1
                log.warning("audit journal: record %r names a template never journaled", row[0])
                continue
            for column in _TEMPLATE_COLUMNS:
                row[column] = template[column]
        return missing

    async def _store_batch(self, db: aiosqlite.Connection, batch: _ParsedBatch) -> int:
        """Write a parsed batch; returns rows SQLite refused even after repair."""
        refused = 0
        try:
            await db.executemany(_AUDIT_UPSERT, batch.rows)
        except (sqlite3.Error, ValueError, TypeError):
            # One bad row fails the whole call: retry row by row so the others still land.
            for row in batch.rows:
                try:
                    await db.execute(_AUDIT_UPSERT, row)
                except (sqlite3.Error, ValueError, TypeError):
                    try:
                        await db.execute(_AUDIT_UPSERT, _bindable(row))
                    except (sqlite3.Error, ValueError, TypeError) as exc:
                        refused += 1
                        log.warning("audit journal: skipped record %r: %s", row[0], exc)
        for sql, params in ((_AUDIT_FINISH, batch.finishes), (_AUDIT_ATTACH, batch.attaches)):
            if not params:
                continue
            try:
                await db.executemany(sql, params)
            except (sqlite3.Error, ValueError, TypeError):
                for item in params:
                    try:
                        await db.execute(sql, _bindable(item))
                    except (sqlite3.Error, ValueError, TypeError) as exc:
                        refused += 1
                        log.warning("audit journal: skipped update for %r: %s", item[-1], exc)
        return refused

    def _try_rotate(self, read_fd: int, ingested: int) -> None:
        """Replace a large, ingested journal with a fresh one, if no other process writes it.

        Synchronous on purpose: this process's own appends run on the same thread, so none can
        land between measuring the file and replacing it.
        """
        try:
            current = os.stat(self.journal_path)
        except FileNotFoundError:
            return
        if not _same_file(current, os.fstat(read_fd)):
            return  # someone else rotated it already
        writer = self.journal.fd >= 0
        if writer and not _same_file(current, os.fstat(self.journal.fd)):
            return
        lock_fd = self.journal.fd if writer else read_fd
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if writer:
                self._relock_writer()
            return
        new_fd = -1
        try:
            size = os.fstat(read_fd).st_size
            if size - ingested > ROTATE_MAX_TAIL:
                if writer:
                    self._relock_writer()
                return
            # Appended since the ingest committed: carried into the new journal.
            tail = os.pread(read_fd, size - ingested, ingested) if size > ingested else b""
            if tail and not tail.endswith(b"\n"):
                tail += b"\n"  # a dead writer's fragment; it becomes one skipped line
            self._remove_stale_temporaries()
            new_fd = self._create_journal(tail, replace=True)
            if writer:
                fcntl.flock(new_fd, fcntl.LOCK_SH)
                os.close(self.journal.fd)  # releases the exclusive lock on the old file
                self.journal.fd, new_fd = new_fd, -1
                self.journal.needs_newline = False
            log.info("audit journal rotated after %d bytes", size)
        except OSError as exc:
            log.warning("audit journal rotation failed: %s", exc)
            if writer and self.journal.fd == lock_fd:
                self._relock_writer()
        finally:
            if new_fd >= 0:
                os.close(new_fd)
            if not writer:
                fcntl.flock(read_fd, fcntl.LOCK_UN)

    def _relock_writer(self) -> None:
        """Take the shared lock back after a failed upgrade (Linux may drop it meanwhile, so
        another process may have rotated: reopen if so)."""
        fcntl.flock(self.journal.fd, fcntl.LOCK_SH)
        try:
            current: os.stat_result | None = os.stat(self.journal_path)
        except FileNotFoundError:
            current = None
        if current is None or not _same_file(current, os.fstat(self.journal.fd)):
            os.close(self.journal.fd)
            self.journal.fd = -1

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - 60
        for pattern in (f".{JOURNAL_NAME}.*.tmp", f".{SPOOL_PREFIX}*.tmp"):
            for path in self.state_dir.glob(pattern):
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()

    async def journal_stats(self) -> JournalStats:
        rows = await self._fetchall(
            "SELECT journal_id, position, corrupt_lines FROM journal_state WHERE id = 1"
        )
        try:
            size = self.journal_path.stat().st_size
        except FileNotFoundError:
            size = 0
        return JournalStats(rows[0][0], int(rows[0][1]), size, int(rows[0][2]))

    # ---------------------------------------------------------------- audit queries

    async def audit_query(
        self,
        *,
        limit: int = 100,
        agent: str | None = None,
        risk: str | None = None,
        decision: str | None = None,
        table: str | None = None,
        text: str | None = None,
        since_id: int | None = None,
        destructive_on: str | None = None,
    ) -> list[AuditRecord]:
        """Audit events, newest first. `table` matches any table the statement touched
        (`orders` also matches `public.orders`); `text` is a case-insensitive substring of
        the SQL; `destructive_on` keeps statements that dropped, emptied or rewrote that
        table; `since_id` keeps events after that id."""
        await self.ingest()
        where: list[str] = []
        params: list[Any] = []
        if agent is not None:
            where.append("agent = ?")
            params.append(agent)
        if risk is not None:
            where.append("risk = ?")
            params.append(risk.upper())
        if decision is not None:
            where.append("decision = ?")
            params.append(decision)
        if since_id is not None:
            where.append("id > ?")
            params.append(since_id)
        if table is not None:
            clause, values = _table_match("audit_events.tables", table)
            where.append(clause)
            params.extend(values)
        if text:
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("sql LIKE ? ESCAPE '\\'")
            params.append(f"%{escaped}%")
        if destructive_on is not None:
            # CASE keeps json_each away from entries that are not {"tables": [...]} objects.
            tables_of = (
                "CASE WHEN c.type = 'object' AND json_type(c.value, '$.tables') = 'array' "
                "THEN json_extract(c.value, '$.tables') END"
            )
            clause, values = _table_match(tables_of, destructive_on)
            where.append(
                "EXISTS (SELECT 1 FROM json_each(audit_events.classifications) c "
                "WHERE c.type = 'object' AND json_extract(c.value, '$.table_destructive') "
                f"AND {clause})"
            )
            params.extend(values)
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(max(0, limit))
        return [_audit_record(row) for row in await self._fetchall(sql, params)]

    async def audit_prune(self, before: float, *, dry_run: bool = False) -> int:
        """Delete the audit events recorded before `before` (unix time) and return how many;
        with `dry_run`, only count them. The journal is ingested first, so no older record
        comes back after. An event a pending approval names stays: the approval's decision
        completes it."""
        await self.ingest()
        older = (
            "ts < ? AND key NOT IN (SELECT audit_key FROM approvals "
            "WHERE status = 'pending' AND audit_key IS NOT NULL)"
        )
        if dry_run:
            sql = f"SELECT count(*) FROM audit_events WHERE {older}"
            rows = await self._fetchall(sql, (before,))
            return int(rows[0][0])
        deleted = 0
        while True:
            async with self._transaction() as db:
                cursor = await db.execute(
                    "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events "
                    f"WHERE {older} ORDER BY id LIMIT ?)",
                    (before, PRUNE_CHUNK_ROWS),
                )
                count = max(0, cursor.rowcount)
            deleted += count
            if count < PRUNE_CHUNK_ROWS:
                if deleted:
                    cutoff = _dt(before).isoformat()
                    log.info("audit: pruned %d events recorded before %s", deleted, cutoff)
                return deleted

    async def audit_get(self, event_id: int) -> AuditRecord | None:
        rows = await self._fetchall(
            f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE id = ?", (event_id,)
        )
        return _audit_record(rows[0]) if rows else None

    async def audit_get_by_key(self, key: str) -> AuditRecord | None:
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE key = ?"
        rows = await self._fetchall(sql, (key,))
        if not rows:
            await self.ingest()
            rows = await self._fetchall(sql, (key,))
        return _audit_record(rows[0]) if rows else None

    # ---------------------------------------------------------------- approvals

    async def approval_create(
        self,
        *,
        agent: str,
        client: str,
        session_id: str,
        sql: str,
        sql_hash: str,
        operation: str,
        tables: Sequence[str],
        risk: str,
        classification_json: str,
        rule: str,
        reason: str,
        expires_at: datetime,
        params_hash: str | None = None,
        row_estimate: int | None = None,
        table_rows: int | None = None,
        snapshot_id: str | None = None,
        snapshot_manifest_sha256: str | None = None,
        snapshot_age_seconds: float | None = None,
        audit_key: str | None = None,
        fingerprint: str | None = None,
    ) -> ApprovalRecord:
        """A new pending approval, visible at once to every process sharing the state."""
        expires = _ts(expires_at, "expires_at")
        async with self._transaction() as db:
            version = await self._bump_version(db)
            cursor = await db.execute(
                """INSERT INTO approvals (created_at, agent, client, session_id, sql, sql_hash,
                    params_hash, operation, tables, risk, classifications, row_estimate,
                    table_rows, rule, reason, snapshot_id, snapshot_manifest_sha256,
                    snapshot_age_seconds, audit_key, status, expires_at, fingerprint, version)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)
                """,
                (
                    _now(),
                    agent,
                    client,
                    session_id,
                    sql,
                    sql_hash,
                    params_hash,
                    operation,
                    json.dumps(list(tables)),
                    risk,
                    classification_json,
                    row_estimate,
                    table_rows,
                    rule,
                    reason,
                    snapshot_id,
                    snapshot_manifest_sha256,
                    snapshot_age_seconds,
                    audit_key,
                    expires,
                    fingerprint,
                    version,
                ),
            )
            approval_id = cursor.lastrowid
            assert approval_id is not None
            record = await self._approval_in(db, approval_id)
        assert record is not None
        return record

    async def approval_get(self, approval_id: int) -> ApprovalRecord | None:
        rows = await self._fetchall(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
        )
        return _approval_record(rows[0]) if rows else None

    async def approvals_list(
        self, *, status: str | None = "pending", limit: int = 100
    ) -> list[ApprovalRecord]:
        """Approvals newest first; `status=None` lists every status."""
        if status is None:
            rows = await self._fetchall(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            rows = await self._fetchall(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE status = ? "
                "ORDER BY id DESC LIMIT ?",
                (status, limit),
            )
        return [_approval_record(row) for row in rows]

    async def approval_decide(
        self, approval_id: int, *, approve: bool, decided_by: str, reason: str | None
    ) -> ApprovalRecord:
        """Approve or deny a pending approval. Raises ApprovalStateError when it is no longer
        pending (decided elsewhere, expired, cancelled), naming who changed it and when."""
        if not decided_by:
            raise ValueError("decided_by must name who decided")
        status = "approved" if approve else "denied"
        async with self._transaction() as db:
            record = await self._approval_in(db, approval_id)
            if record is None:
                raise StoreError(f"approval {approval_id} does not exist")
            if record.status != "pending":
                raise ApprovalStateError(
                    f"approval {approval_id} is already {record.describe_status()}", record
                )
            now = _now()
            if record.expires_at.timestamp() <= now:
                # Too late: record the expiry (committed below) and refuse the decision.
                await self._set_status(
                    db, approval_id, "expired", "expired before a decision", None, now
                )
                expired = await self._approval_in(db, approval_id)
                assert expired is not None
            else:
                await self._set_status(db, approval_id, status, reason, decided_by, now)
                decided = await self._approval_in(db, approval_id)
                assert decided is not None
                return decided
        raise ApprovalStateError(
            f"approval {approval_id} expired at {_format_time(record.expires_at)} "
            "before it was decided",
            expired,
        )

    async def approval_set_status(
        self, approval_id: int, status: str, reason: str | None = None
    ) -> ApprovalRecord:
        """Move an approval to expired, cancelled or used, from a state that allows it."""
        if status in ("approved", "denied"):
            raise ValueError("use approval_decide to approve or deny")
        allowed_from = _APPROVAL_TRANSITIONS.get(status)
        if allowed_from is None:
            raise ValueError(f"unknown approval status {status!r}")
        async with self._transaction() as db:
            record = await self._approval_in(db, approval_id)
            if record is None:
                raise StoreError(f"approval {approval_id} does not exist")
            if record.status not in allowed_from:
                raise ApprovalStateError(
                    f"approval {approval_id} cannot become {status}: it is already "
                    f"{record.describe_status()}",
                    record,
                )
            await self._set_status(db, approval_id, status, reason, None, _now())
            updated = await self._approval_in(db, approval_id)
        assert updated is not None
        return updated

    async def approval_mark_used(self, approval_id: int) -> bool:
        """approved -> used, atomically across processes; False if it was not approved."""
        async with self._transaction() as db:
            version = await self._bump_version(db)
            cursor = await db.execute(
                "UPDATE approvals SET status = 'used', version = ? "
                "WHERE id = ? AND status = 'approved'",
                (version, approval_id),
            )
            return cursor.rowcount == 1

    async def approvals_expire_all_pending(self, reason: str) -> int:
        """Expire every pending approval (nothing waits on them after a restart)."""
        async with self._transaction() as db:
            version = await self._bump_version(db)
            cursor = await db.execute(
                "UPDATE approvals SET status = 'expired', decided_at = ?, decision_reason = ?, "
                "version = ? WHERE status = 'pending'",
                (_now(), reason, version),
            )
            return cursor.rowcount

    async def approval_changes_since(self, version: int) -> tuple[int, list[ApprovalRecord]]:
        """(current version, approvals changed after `version`), from any process. Cheap
        enough to poll every 50 ms: one single-row read when nothing changed."""
        rows = await self._fetchall("SELECT value FROM counters WHERE name = 'approvals'")
        current = int(rows[0][0])
        if current == version:
            return current, []
        if version > current:  # the state was recreated: start over
            version = 0
        changed = await self._fetchall(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE version > ? AND version <= ? "
            "ORDER BY version, id",
            (version, current),
        )
        return current, [_approval_record(row) for row in changed]

    async def approval_find_recent(
        self, *, fingerprint: str, agent: str, since: datetime
    ) -> ApprovalRecord | None:
        """The latest approval granted to `agent` for this statement fingerprint since `since`."""
        rows = await self._fetchall(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE fingerprint = ? AND agent = ? "
            "AND status IN ('approved', 'used') AND decided_at >= ? "
            "ORDER BY decided_at DESC LIMIT 1",
            (fingerprint, agent, _ts(since, "since")),
        )
        return _approval_record(rows[0]) if rows else None

    async def _approval_in(
        self, db: aiosqlite.Connection, approval_id: int
    ) -> ApprovalRecord | None:
        rows = list(
            await db.execute_fetchall(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
            )
        )
        return _approval_record(rows[0]) if rows else None

    async def _bump_version(self, db: aiosqlite.Connection) -> int:
        rows = list(
            await db.execute_fetchall(
                "UPDATE counters SET value = value + 1 WHERE name = 'approvals' RETURNING value"
            )
        )
        return int(rows[0][0])

    async def _set_status(
        self,
        db: aiosqlite.Connection,
        approval_id: int,
        status: str,
        reason: str | None,
        decided_by: str | None,
        now: float,
    ) -> None:
        version = await self._bump_version(db)
        if status == "used":
            await db.execute(
                "UPDATE approvals SET status = ?, version = ? WHERE id = ?",
                (status, version, approval_id),
            )
            return
        await db.execute(
            "UPDATE approvals SET status = ?, decided_by = coalesce(?, decided_by), "
            "decided_at = ?, decision_reason = coalesce(?, decision_reason), version = ? "
            "WHERE id = ?",
            (status, decided_by, now, reason, version, approval_id),
        )

    # ---------------------------------------------------------------- alerts

    async def alert_open(
        self, kind: str, key: str, *, severity: str, title: str, details_json: str = "{}"
    ) -> tuple[AlertRecord, bool]:
        """Raise the alert for condition (kind, key); while it is open or acked, raising it
        again refreshes it instead of adding another. Returns (alert, newly opened)."""
        if severity not in ALERT_SEVERITIES:
            raise ValueError(f"unknown alert severity {severity!r}")
        now = _now()
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE alerts SET severity = ?, title = ?, details_json = ?, last_seen = ?, "
                "count = count + 1 WHERE kind = ? AND key = ? AND status != 'closed'",
                (severity, title, details_json, now, kind, key),
            )
            created = cursor.rowcount == 0
            if created:
                await db.execute(
                    "INSERT INTO alerts (opened_at, last_seen, count, kind, key, severity, title, "
                    "details_json, status) VALUES (?, ?, 1, ?, ?, ?, ?, ?, 'open')",
                    (now, now, kind, key, severity, title, details_json),
                )
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {_ALERT_COLUMNS} FROM alerts "
                    "WHERE kind = ? AND key = ? AND status != 'closed'",
                    (kind, key),
                )
            )
        return _alert_record(rows[0]), created

    async def alert_ack(self, alert_id: int, acked_by: str) -> AlertRecord:
        """Acknowledge an open alert (acknowledging twice keeps the first)."""
        async with self._transaction() as db:
            record = await self._alert_in(db, alert_id)
            if record.status == "closed":
                raise StoreError(f"alert {alert_id} is already closed")
            if record.status == "open":
                await db.execute(
                    "UPDATE alerts SET status = 'acked', acked_by = ?, acked_at = ? WHERE id = ?",
                    (acked_by, _now(), alert_id),
                )
                record = await self._alert_in(db, alert_id)
        return record

    async def alert_close(self, kind: str, key: str) -> AlertRecord | None:
        """The condition cleared: close its live alert. None if none was live."""
        async with self._transaction() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT id FROM alerts WHERE kind = ? AND key = ? AND status != 'closed'",
                    (kind, key),
                )
            )
            if not rows:
                return None
            return await self._close_alert(db, int(rows[0][0]))

    async def alert_close_id(self, alert_id: int) -> AlertRecord:
        """Close one alert by id (closing a closed alert changes nothing)."""
        async with self._transaction() as db:
            record = await self._alert_in(db, alert_id)
            if record.status == "closed":
                return record
            return await self._close_alert(db, alert_id)

    async def alerts_list(
        self, *, status: str | None = None, limit: int = 100
    ) -> list[AlertRecord]:
        """Alerts newest first; `status` is open, acked or closed, None for all."""
        if status is None:
            rows = await self._fetchall(
                f"SELECT {_ALERT_COLUMNS} FROM alerts ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            if status not in ALERT_STATUSES:
                raise ValueError(f"unknown alert status {status!r}")
            rows = await self._fetchall(
                f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE status = ? ORDER BY id DESC LIMIT ?",
                (status, limit),
            )
        return [_alert_record(row) for row in rows]

    async def _alert_in(self, db: aiosqlite.Connection, alert_id: int) -> AlertRecord:
        rows = list(
            await db.execute_fetchall(
                f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = ?", (alert_id,)
            )
        )
        if not rows:
            raise StoreError(f"alert {alert_id} does not exist")
        return _alert_record(rows[0])

    async def _close_alert(self, db: aiosqlite.Connection, alert_id: int) -> AlertRecord:
        await db.execute(
            "UPDATE alerts SET status = 'closed', closed_at = ? WHERE id = ?", (_now(), alert_id)
        )
        return await self._alert_in(db, alert_id)

    # ---------------------------------------------------------------- snapshots

    async def snapshot_put(self, snapshot: SnapshotRecord) -> None:
        """Insert or replace what is known about a snapshot."""
        if snapshot.status not in SNAPSHOT_STATUSES:
            raise ValueError(f"unknown snapshot status {snapshot.status!r}")
        finished = snapshot.finished_at
        async with self._transaction() as db:
            await db.execute(
                f"INSERT OR REPLACE INTO snapshots ({_SNAPSHOT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    snapshot.id,
                    snapshot.database,
                    json.dumps(list(snapshot.tables)),
                    snapshot.status,
                    _ts(snapshot.started_at, "started_at"),
                    None if finished is None else _ts(finished, "finished_at"),
                    snapshot.manifest_sha256,
                    snapshot.location,
                    snapshot.rows,
                    snapshot.size_bytes,
                    snapshot.wal_lsn,
                    snapshot.error,
                ),
            )

    async def snapshot_get(self, snapshot_id: str) -> SnapshotRecord | None:
        rows = await self._fetchall(
            f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)
        )
        return _snapshot_record(rows[0]) if rows else None

    async def snapshots_list(
        self, *, table: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[SnapshotRecord]:
        """Snapshots newest first, optionally of one table and in one status."""
        where: list[str] = []
        params: list[Any] = []
        if table is not None:
            clause, values = _table_match("snapshots.tables", table)
            where.append(clause)
            params.extend(values)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC LIMIT ?"
        params.append(limit)
        return [_snapshot_record(row) for row in await self._fetchall(sql, params)]

    async def snapshot_latest(self, table: str, *, status: str = "ok") -> SnapshotRecord | None:
        """The newest snapshot of `table` in `status`: what freshness checks look at."""
        found = await self.snapshots_list(table=table, status=status, limit=1)
        return found[0] if found else None

    # ---------------------------------------------------------------- drills

    async def drill_start(self, table: str, snapshot_id: str | None) -> DrillRecord:
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO drills (started_at, table_name, snapshot_id, status, details_json) "
                "VALUES (?, ?, ?, 'running', '{}')",
                (_now(), table, snapshot_id),
            )
            drill_id = cursor.lastrowid
            assert drill_id is not None
            return await self._drill_in(db, drill_id)

    async def drill_finish(
        self, drill_id: int, *, passed: bool, details_json: str = "{}"
    ) -> DrillRecord:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE drills SET finished_at = ?, status = ?, details_json = ? "
                "WHERE id = ? AND status = 'running'",
                (_now(), "passed" if passed else "failed", details_json, drill_id),
            )
            record = await self._drill_in(db, drill_id)
            if cursor.rowcount == 0:
                raise StoreError(f"drill {drill_id} already finished ({record.status})")
            return record

    async def drills_list(self, *, limit: int = 100) -> list[DrillRecord]:
        rows = await self._fetchall(
            f"SELECT {_DRILL_COLUMNS} FROM drills ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [_drill_record(row) for row in rows]

    async def _drill_in(self, db: aiosqlite.Connection, drill_id: int) -> DrillRecord:
        rows = list(
            await db.execute_fetchall(
                f"SELECT {_DRILL_COLUMNS} FROM drills WHERE id = ?", (drill_id,)
            )
        )
        if not rows:
            raise StoreError(f"drill {drill_id} does not exist")
        return _drill_record(rows[0])


def _conforms(store: Store) -> StateStore:
    return store  # mypy checks that Store implements StateStore


__all__ = [
    "ALERT_SEVERITIES",
    "APPROVAL_STATUSES",
    "OUTCOMES",
    "AlertRecord",
    "ApprovalRecord",
    "ApprovalStateError",
    "AuditRecord",
    "AuditStart",
    "AuditTemplate",
    "DrillRecord",
    "JournalStats",
    "SnapshotRecord",
    "StateStore",
    "Store",
    "StoreError",
]
