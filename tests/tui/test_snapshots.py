"""Visual snapshots of the dashboard, the approval detail and the recovery wizard.

Deterministic: a fixed clock, a fixed terminal size, local time pinned to UTC, and data from
`ScriptedRuntime`, a small in-memory stand-in of the runtime interface the app uses. It
exists only for these pictures; every behaviour test (test_app.py) uses the real runtime.

Regenerate after an intended change with `pytest tests/tui/test_snapshots.py
--snapshot-update` and look at the SVGs under __snapshots__.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from textual.pilot import Pilot

from backstop_core import events
from backstop_core.runtime import RuntimeStatus
from backstop_core.store import AlertRecord, ApprovalRecord, AuditRecord, SnapshotRecord
from backstop_tui.app import BackstopApp

pytestmark = pytest.mark.tui

NOW = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC
SIZE = (120, 40)


def at(seconds_ago: float) -> datetime:
    return datetime.fromtimestamp(NOW - seconds_ago, UTC)


CLASSIFICATION = (
    '[{"operation":"UPDATE","category":"WRITE","tables":["public.order_items"],'
    '"has_where":true,"unbounded":false,"table_destructive":false,"risk":"MEDIUM",'
    '"reasons":["UPDATE changes the rows of public.order_items that match its WHERE clause",'
    '"PostgreSQL estimates 11,994 rows"],"row_estimate":11994,"table_rows":15000}]'
)


def approval(ident: int, *, sql: str, seconds_ago: float, **overrides: Any) -> ApprovalRecord:
    values: dict[str, Any] = {
        "id": ident,
        "created_at": at(seconds_ago),
        "agent": "demo-agent",
        "client": "127.0.0.1:51234",
        "session_id": "s-7",
        "sql": sql,
        "sql_hash": "0" * 64,
        "params_hash": None,
        "operation": "UPDATE",
        "tables": ("public.order_items",),
        "risk": "MEDIUM",
        "classification_json": CLASSIFICATION,
        "row_estimate": 11994,
        "table_rows": 15000,
        "rule": "approve-large-writes",
        "reason": (
            "backstop: UPDATE on public.order_items needs an operator's approval under rule "
            "'approve-large-writes'. It changes more than 10000 rows."
        ),
        "snapshot_id": "20260101T114500Z-order_items",
        "snapshot_manifest_sha256": "9f2c4e1a7b3d" + "0" * 52,
        "snapshot_age_seconds": 840.0,
        "audit_key": f"k-approval-{ident}",
        "status": "pending",
        "decided_by": None,
        "decided_at": None,
        "decision_reason": None,
        "expires_at": at(seconds_ago - 300),
        "fingerprint": None,
    }
    values.update(overrides)
    return ApprovalRecord(**values)


APPROVALS = [
    approval(
        7,
        sql=(
            "UPDATE order_items\n   SET unit_price = round(unit_price * 1.02, 2)\n"
            " WHERE order_id > 1000"
        ),
        seconds_ago=42,
    ),
    approval(
        8,
        sql="DELETE FROM order_items WHERE order_id IN (SELECT id FROM orders WHERE "
        "status = 'cancelled')",
        seconds_ago=9,
        operation="DELETE",
        row_estimate=2143,
        risk="MEDIUM",
        rule="approve-deletes",
        snapshot_id=None,
        snapshot_age_seconds=None,
        agent="cursor",
    ),
]

ALERTS = [
    AlertRecord(
        id=3,
        time=at(600),
        kind="bypass",
        key="10.0.0.7:analyst",
        severity="warning",
        title="analyst connected to PostgreSQL directly, not through Backstop",
        details_json='{"client": "10.0.0.7", "user": "analyst", "application": "psql"}',
        status="open",
        acked_by=None,
        acked_at=None,
        closed_at=None,
        last_seen=at(30),
        count=4,
    ),
]

SNAPSHOTS = [
    SnapshotRecord(
        id=f"20260101T{hour:02d}0000Z-{table}",
        database="shop",
        tables=(f"public.{table}",),
        status="ok",
        started_at=at(3600 * (12 - hour)),
        finished_at=at(3600 * (12 - hour) - 4),
        manifest_sha256="ab" * 32,
        location=f"file:///var/backstop/shop/public.{table}",
        rows=rows,
        size_bytes=rows * 120,
        wal_lsn=f"0/{hour:X}A3F2C8",
    )
    for hour in (9, 10, 11)
    for table, rows in (("orders", 5000), ("order_items", 15000))
]

STATEMENTS: list[tuple[float, str, str, str, tuple[str, ...], int | None, str, str, str]] = [
    # seconds ago, agent, operation, sql, tables, estimate, risk, action, outcome
    (58, "demo-agent", "SELECT", "SELECT c.full_name, count(o.id) FROM customers c JOIN orders o "
     "ON o.customer_id = c.id GROUP BY c.full_name ORDER BY 2 DESC LIMIT 10",
     ("public.customers", "public.orders"), None, "LOW", "allow", "forwarded"),
    (55, "demo-agent", "UPDATE", "UPDATE orders SET status = 'shipped' WHERE id = 4711",
     ("public.orders",), 1, "MEDIUM", "allow", "forwarded"),
    (51, "cursor", "SELECT", "SELECT sum(quantity * unit_price) FROM order_items",
     ("public.order_items",), None, "LOW", "allow", "forwarded"),
    (47, "demo-agent", "INSERT", "INSERT INTO orders (customer_id, status, shipping_address) "
     "VALUES (17, 'pending', '{}')", ("public.orders",), None, "MEDIUM", "allow", "forwarded"),
    (42, "demo-agent", "UPDATE", APPROVALS[0].sql, ("public.order_items",), 11994, "MEDIUM",
     "approve", ""),
    (30, "cursor", "DROP_DATABASE", "DROP DATABASE shop", (), None, "CRITICAL", "block",
     "blocked"),
    (21, "demo-agent", "SELECT", "SELECT p.category, avg(p.price) FROM products p GROUP BY 1",
     ("public.products",), None, "LOW", "allow", "forwarded"),
    (14, "demo-agent", "UPDATE", "UPDATE products SET stock = stock - 1 WHERE id = 311",
     ("public.products",), 1, "MEDIUM", "allow", "error"),
    (9, "cursor", "DELETE", APPROVALS[1].sql, ("public.order_items",), 2143, "MEDIUM",
     "approve", ""),
    (3, "demo-agent", "SELECT", "SELECT count(*) FROM orders WHERE status = 'pending'",
     ("public.orders",), None, "LOW", "allow", "forwarded"),
]  # fmt: skip


@dataclass
class ScriptedStore:
    approvals: list[ApprovalRecord] = field(default_factory=lambda: list(APPROVALS))
    alerts: list[AlertRecord] = field(default_factory=lambda: list(ALERTS))
    snapshots: list[SnapshotRecord] = field(default_factory=list)

    async def approvals_list(
        self, *, status: str | None = "pending", limit: int = 100
    ) -> list[ApprovalRecord]:
        found = [a for a in self.approvals if status is None or a.status == status]
        return sorted(found, key=lambda a: a.id, reverse=True)[:limit]

    async def approval_get(self, approval_id: int) -> ApprovalRecord | None:
        return next((a for a in self.approvals if a.id == approval_id), None)

    async def alerts_list(self, *, status: str | None = None, limit: int = 100) -> list[Any]:
        return [a for a in self.alerts if status is None or a.status == status][:limit]

    async def alert_ack(self, alert_id: int, acked_by: str) -> AlertRecord:
        raise NotImplementedError

    async def audit_query(self, **_filters: Any) -> list[AuditRecord]:
        return []

    async def snapshots_list(
        self, *, table: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[SnapshotRecord]:
        found = [
            s
            for s in self.snapshots
            if (table is None or table in s.tables) and (status is None or s.status == status)
        ]
        return sorted(found, key=lambda s: s.started_at, reverse=True)[:limit]


@dataclass(frozen=True)
class Progress:
    phase: str
    rows_done: int
    rows_total: int | None


@dataclass(frozen=True)
class Restored:
    table: str
    snapshot_id: str
    restored_table: str
    rows: int
    seconds: float


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Diff:
    only_in_restored: int
    only_in_current: int
    changed: int
    unchanged: int
    sample: tuple[str, ...]


class ScriptedRecovery:
    """The recovery API the wizard is written against, with canned answers."""

    async def restore(
        self, table: str, snapshot_id: str, *, progress: Callable[[Any], None]
    ) -> Restored:
        for done in (0, 5000, 10000, 15000):
            progress(Progress("loading", done, 15000))
        name = table.split(".")[-1]
        return Restored(table, snapshot_id, f"public.{name}__restored_1100", 15000, 2.4)

    async def validate(self, restored: Restored) -> AsyncIterator[Check]:
        for check in (
            Check("row count", True, "15,000 rows, as the manifest records"),
            Check("checksum", True, "md5 9c1e…4b07 matches the manifest"),
            Check("columns and types", True, "5 columns, identical to the manifest"),
            Check("primary key unique", True, "(order_id, line_no): no duplicates"),
        ):
            yield check

    async def diff(self, restored: Restored) -> Diff:
        return Diff(
            10500,
            0,
            0,
            4500,
            ("order_id 1001..4500: 10,500 rows deleted at 11:58:02 by demo-agent",),
        )

    def copy_back_sql(self, restored: Restored) -> str:
        return (
            "BEGIN;\n"
            "INSERT INTO public.order_items\n"
            "SELECT r.* FROM public.order_items__restored_1100 AS r\n"
            " WHERE NOT EXISTS (SELECT 1 FROM public.order_items AS o\n"
            "                    WHERE (o.order_id, o.line_no) = (r.order_id, r.line_no));\n"
            "COMMIT;"
        )


class ScriptedRuntime:
    """Just enough of `Runtime` for the app: status, bus, store, decide, start/stop."""

    def __init__(self, *, with_recovery: bool = False) -> None:
        self.bus = events.EventBus()
        self.store: ScriptedStore | None = None
        self._store = ScriptedStore(snapshots=list(SNAPSHOTS) if with_recovery else [])
        if with_recovery:
            self.recovery = ScriptedRecovery()

    async def start(self) -> None:
        self.store = self._store
        self.bus.publish(events.GatewayStarted(listen="127.0.0.1:6432", upstream="db:5432"))
        for ago, agent, op, sql, tables, estimate, risk, action, outcome in STATEMENTS:
            key = f"k-{ago}"
            for record in APPROVALS:
                if record.sql == sql:
                    key = record.audit_key or key
            self.bus.publish(
                events.StatementDecided(
                    session_id="s-7",
                    agent=agent,
                    sql=sql,
                    operation=op,
                    tables=tables,
                    risk=risk,
                    action=action,
                    rule="",
                    reason="",
                    row_estimate=estimate,
                    audit_key=key,
                    at=NOW - ago,
                )
            )
            if outcome:
                self.bus.publish(
                    events.StatementFinished(
                        session_id="s-7", audit_key=key, outcome=outcome, duration_ms=1.5
                    )
                )

    async def stop(self) -> None:
        self.store = None

    def snapshot_health(self) -> list[dict[str, object]]:
        return [
            {"table": "public.customers", "health": "fresh", "age_seconds": 1260.0,
             "max_age_seconds": 7200.0, "snapshot_id": "20260101T113900Z-customers"},
            {"table": "public.order_items", "health": "fresh", "age_seconds": 840.0,
             "max_age_seconds": 7200.0, "snapshot_id": "20260101T114500Z-order_items"},
            {"table": "public.orders", "health": "stale", "age_seconds": 9000.0,
             "max_age_seconds": 7200.0, "snapshot_id": "20260101T093000Z-orders"},
            {"table": "public.products", "health": "failing", "age_seconds": None,
             "max_age_seconds": 7200.0, "detail": "permission denied for table products"},
        ]  # fmt: skip

    async def status(self) -> RuntimeStatus:
        return RuntimeStatus(
            listen="127.0.0.1:6432",
            upstream="127.0.0.1:5432",
            upstream_reachable=True,
            sessions=3,
            policy_version="4f1c2a9e0b7d",
            policy_path="policy.json",
            policy_error=None,
            pending_approvals=len(APPROVALS),
            open_alerts=len(ALERTS),
            pid=4242,
            started_at=NOW - 3600,
            updated_at=NOW,
        )

    async def decide(self, approval_id: int, **_kwargs: Any) -> ApprovalRecord:
        raise NotImplementedError


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def scripted_app(**runtime_options: Any) -> BackstopApp:
    runtime: Any = ScriptedRuntime(**runtime_options)
    return BackstopApp(runtime, clock=lambda: NOW)


async def settle(pilot: Pilot[None]) -> None:
    """Let the start worker, the first polls and a feed flush happen."""
    app = pilot.app
    assert isinstance(app, BackstopApp)
    for _ in range(50):
        await pilot.pause(0.05)
        loaded = app.pending and app.alerts and app.snapshot_health is not None
        if loaded and app.feed.decided_total == len(STATEMENTS):
            break
    await pilot.pause(0.2)
    app.clear_notifications()
    await pilot.pause()


def test_dashboard(snap_compare: Any) -> None:
    assert snap_compare(scripted_app(), terminal_size=SIZE, run_before=settle)


def test_approval_detail(snap_compare: Any) -> None:
    async def open_first(pilot: Pilot[None]) -> None:
        await settle(pilot)
        await pilot.press("enter")
        await pilot.pause(0.3)

    assert snap_compare(scripted_app(), terminal_size=SIZE, run_before=open_first)


def test_recovery_wizard_without_snapshots(snap_compare: Any) -> None:
    async def open_wizard(pilot: Pilot[None]) -> None:
        await settle(pilot)
        await pilot.press("5")
        await pilot.pause(0.2)

    assert snap_compare(scripted_app(), terminal_size=SIZE, run_before=open_wizard)


def test_recovery_wizard_copy_back(snap_compare: Any) -> None:
    async def walk(pilot: Pilot[None]) -> None:
        await settle(pilot)
        await pilot.press("5")
        await pilot.pause(0.3)
        await pilot.press("enter")  # public.order_items, the first table
        await pilot.pause(0.3)
        await pilot.press("enter")  # newest snapshot
        await pilot.pause(0.5)
        await pilot.press("enter")  # validated: diff
        await pilot.pause(0.3)
        await pilot.press("enter")  # copy-back SQL
        await pilot.pause(0.3)

    assert snap_compare(scripted_app(with_recovery=True), terminal_size=SIZE, run_before=walk)
