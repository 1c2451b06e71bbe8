"""The dashboard driven with Pilot against a real runtime in front of the test PostgreSQL.

The app starts the runtime itself; clients connect through the gateway with asyncpg in the
same event loop, so a held statement really waits until a key press decides it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from rich.console import Console
from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, OptionList, Select, Static

from backstop_core import events
from backstop_core.config import Settings
from backstop_core.demo import demo_schema_sql
from backstop_core.recovery.wizard import Recovery
from backstop_core.runtime import Runtime
from backstop_core.sidecar.objectstore import open_object_store
from backstop_tui import messages as msg
from backstop_tui.app import BackstopApp
from backstop_tui.demo_agent import DemoAgent
from backstop_tui.screens.alerts import AlertsScreen
from backstop_tui.screens.approval_detail import ApprovalDetailScreen, DenyReasonScreen
from backstop_tui.screens.audit import AuditDetailScreen, AuditScreen
from backstop_tui.screens.dashboard import DashboardScreen
from backstop_tui.screens.help import HelpScreen
from backstop_tui.screens.recovery import RecoveryScreen, SaveSqlScreen
from backstop_tui.screens.snapshots import SnapshotsScreen
from backstop_tui.widgets.approval_list import ApprovalList
from backstop_tui.widgets.query_feed import FeedLines, FeedModel, FeedRow
from backstop_tui.widgets.sql_view import SqlView
from backstop_tui.widgets.status_bar import StatusBar
from tests.conftest import AGENT_ROLE, PgServer

pytestmark = [pytest.mark.tui, pytest.mark.integration]

SIZE = (120, 40)
ROOT = Path(__file__).resolve().parents[2]
APPROVE_DELETES = {
    "name": "approve-deletes",
    "match": {"operation": "DELETE"},
    "action": "approve",
    "reason": "Deletes need a person.",
}


def write_policy(path: Path, doc: dict[str, Any] | str) -> Path:
    """Save like an editor: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    temporary.replace(path)
    return path


def policy_doc(*, bypass: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "defaults": {"LOW": "allow", "MEDIUM": "allow", "HIGH": "approve", "CRITICAL": "block"},
        "rules": [APPROVE_DELETES],
        "approval": {"timeout_seconds": 60},
        "bypass": bypass or {"enabled": False},
    }


@pytest.fixture
def items_db(fresh_db: str) -> str:
    """A database with `items` (20 rows); its superuser DSN."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL)")
        conn.execute("INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 20) i")
    return fresh_db


def make_runtime(upstream: str, tmp_path: Path, policy: dict[str, Any] | None = None) -> Runtime:
    path = write_policy(tmp_path / "policy.json", policy or policy_doc())
    settings = Settings(
        upstream=upstream,
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        policy=path,
        upstream_sslmode="disable",
    )
    return Runtime(settings)


@pytest.fixture
def runtime(items_db: str, tmp_path: Path) -> Runtime:
    return make_runtime(items_db, tmp_path)


async def until(
    pilot: Pilot[None], predicate: Callable[[], object], within: float = 15.0, what: str = ""
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await pilot.pause(0.05)


@pytest.fixture
async def running(runtime: Runtime) -> AsyncIterator[tuple[BackstopApp, Pilot[None]]]:
    app = BackstopApp(runtime)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.header.gateway == "running", what="the gateway")
        await until(pilot, lambda: app.header.status is not None)
        yield app, pilot
    assert runtime.store is None, "leaving the app stops the runtime"


async def client(runtime: Runtime, pg: PgServer, dsn: str, name: str = "test-agent") -> Any:
    assert runtime.gateway is not None
    database = dsn.rsplit("/", 1)[1].split("?")[0]
    return await asyncpg.connect(
        host="127.0.0.1",
        port=runtime.gateway.port,
        user=pg.user,
        database=database,
        ssl=False,
        server_settings={"application_name": name},
    )


def text_of(widget: Static) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=200, color_system=None)
    with console.capture() as capture:
        console.print(widget.content)
    return capture.get()


def feed_lines(app: BackstopApp) -> list[str]:
    lines = app.screen.query_one(FeedLines)
    return [
        "".join(segment.text for segment in lines.render_line(y)) for y in range(lines.size.height)
    ]


def table_text(table: DataTable[Any]) -> list[str]:
    return [" ".join(str(cell) for cell in table.get_row_at(row)) for row in range(table.row_count)]


async def hold_delete(
    app: BackstopApp, pilot: Pilot[None], conn: Any, sql: str
) -> asyncio.Task[str]:
    pending = asyncio.ensure_future(conn.execute(sql))
    await until(pilot, lambda: app.pending, what="the pending approval")
    approvals = app.screen.query_one(ApprovalList)
    await until(pilot, lambda: approvals.records, what="the approval in the list")
    assert not pending.done(), "the DELETE must wait for a decision"
    return pending


# --------------------------------------------------------------------------- approvals


async def test_approve_from_the_detail_screen(
    running: tuple[BackstopApp, Pilot[None]], runtime: Runtime, pg: PgServer, items_db: str
) -> None:
    app, pilot = running
    conn = await client(runtime, pg, items_db)
    try:
        await conn.fetchval("SELECT count(*) FROM items")
        pending = await hold_delete(app, pilot, conn, "DELETE FROM items WHERE id <= 5")
        record = app.pending[0]
        assert record.operation == "DELETE" and record.rule == "approve-deletes"

        approvals = app.screen.query_one(ApprovalList)
        assert approvals.selected_id() == record.id
        assert f"{record.id}" in table_text(approvals.table)[0]
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ApprovalDetailScreen))
        detail = app.screen
        assert isinstance(detail, ApprovalDetailScreen)
        await until(pilot, lambda: detail.record is not None, what="the approval record")
        assert detail.query_one(SqlView).sql == "DELETE FROM items WHERE id <= 5"
        facts = text_of(detail.query_one("#detail-facts", Static))
        assert "approve-deletes" in facts and "Deletes need a person." in facts
        assert "WHERE clause: yes" in facts
        assert "none bound" in facts  # the rule asks for no snapshot

        await pilot.press("a")
        assert await asyncio.wait_for(pending, 10) == "DELETE 5"
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen), what="the dashboard")
        await until(pilot, lambda: not app.pending, what="the list to empty")
        assert await conn.fetchval("SELECT count(*) FROM items") == 15
        await until(
            pilot,
            lambda: any("approved → forwarded" in line for line in feed_lines(app)),
            what="the feed to show the approved DELETE",
        )
        row = app.feed.row_for_approval(record.id)
        assert row is not None and row.operation == "DELETE"
        stored = await runtime.store.approval_get(record.id)  # type: ignore[union-attr]
        assert stored is not None and stored.decided_by == app.operator
    finally:
        await conn.close()


async def test_deny_with_a_reason_reaches_the_client(
    running: tuple[BackstopApp, Pilot[None]], runtime: Runtime, pg: PgServer, items_db: str
) -> None:
    app, pilot = running
    conn = await client(runtime, pg, items_db)
    try:
        pending = await hold_delete(app, pilot, conn, "DELETE FROM items WHERE id > 10")
        approval_id = app.pending[0].id
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ApprovalDetailScreen))
        await until(pilot, lambda: app.screen.record is not None)  # type: ignore[attr-defined]
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, DenyReasonScreen))
        await pilot.press("enter")  # an empty reason is not accepted
        assert isinstance(app.screen, DenyReasonScreen)
        assert "required" in text_of(app.screen.query_one("#deny-error", Static))
        await pilot.press(*"use the nightly archive job")
        assert app.screen.query_one(Input).value == "use the nightly archive job"
        await pilot.press("enter")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await asyncio.wait_for(pending, 10)
        assert "use the nightly archive job" in str(refused.value)
        assert f"approval {approval_id}" in str(refused.value)
        assert await conn.fetchval("SELECT count(*) FROM items") == 20
        await until(
            pilot,
            lambda: any(f"denied #{approval_id}" in line for line in feed_lines(app)),
            what="the feed to show the denial",
        )
    finally:
        await conn.close()


async def test_escape_in_the_deny_dialog_decides_nothing(
    running: tuple[BackstopApp, Pilot[None]], runtime: Runtime, pg: PgServer, items_db: str
) -> None:
    app, pilot = running
    conn = await client(runtime, pg, items_db)
    try:
        pending = await hold_delete(app, pilot, conn, "DELETE FROM items WHERE id = 1")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ApprovalDetailScreen))
        await until(pilot, lambda: app.screen.record is not None)  # type: ignore[attr-defined]
        await pilot.press("d")
        await until(pilot, lambda: isinstance(app.screen, DenyReasonScreen))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ApprovalDetailScreen))
        await pilot.pause(0.3)
        assert not pending.done() and app.pending
        await pilot.press("escape")  # back to the dashboard; approve from the palette
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
        await pilot.press("ctrl+p")
        await until(pilot, lambda: isinstance(app.screen, CommandPalette))
        await pilot.press(*"Review approval")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ApprovalDetailScreen))
        await until(pilot, lambda: app.screen.record is not None)  # type: ignore[attr-defined]
        await pilot.press("a")
        assert await asyncio.wait_for(pending, 10) == "DELETE 1"
    finally:
        await conn.close()


# --------------------------------------------------------------------------- dashboard


async def test_header_and_feed_render_what_the_gateway_does(
    running: tuple[BackstopApp, Pilot[None]], runtime: Runtime, pg: PgServer, items_db: str
) -> None:
    app, pilot = running
    assert runtime.gateway is not None
    header = text_of(app.screen.query_one(StatusBar))
    assert f"127.0.0.1:{runtime.gateway.port}" in header
    assert "policy" in header and runtime.policy.version in header
    conn = await client(runtime, pg, items_db, name="feed-agent")
    try:
        await conn.fetch("SELECT id, note FROM items ORDER BY id LIMIT 3")
        await conn.execute("UPDATE items SET note = 'x' WHERE id = 2")
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("DROP TABLE no_such_table")  # CRITICAL: blocked by default
        await until(pilot, lambda: app.feed.decided_total >= 3, what="three statements")
        await until(
            pilot,
            lambda: any("blocked" in line for line in feed_lines(app)),
            what="the blocked DROP in the feed",
        )
        lines = feed_lines(app)
        assert "Time" not in lines[0]  # the heading is a separate widget
        newest_first = [line for line in lines if "feed-agent" in line or "postgres/" in line]
        assert "DROP_TABLE" in newest_first[0] and "CRITICAL" in newest_first[0]
        assert any("UPDATE" in line and "allowed → forwarded" in line for line in lines)
        assert any("SELECT" in line and "items" in line for line in lines)
        await until(
            pilot,
            lambda: "1 session" in text_of(app.screen.query_one(StatusBar)),
            what="the session count in the header",
        )
    finally:
        await conn.close()


async def test_the_feed_is_bounded_and_statement_floods_collapse() -> None:
    model = FeedModel(limit=100)
    batch: list[events.Event] = []
    for n in range(1000):
        batch.append(
            events.StatementDecided(
                session_id="s",
                agent="a",
                sql=f"SELECT {n}",
                operation="SELECT",
                tables=(),
                risk="LOW",
                action="allow",
                rule="default:LOW",
                reason="",
                audit_key=f"k{n}",
            )
        )
        batch.append(events.StatementFinished("s", f"k{n}", "forwarded", 0.1))
    assert model.apply(batch) == 1000
    assert len(model) == 100 and model.decided_total == 1000
    newest: FeedRow = model.newest(0)
    assert newest.sql == "SELECT 999" and newest.outcome == "forwarded"
    assert model.newest(99).sql == "SELECT 900"
    assert len(model._by_key) == 100
    # A queued run of "statements arrived" is folded into one message.
    assert msg.StatementsArrived().can_replace(msg.StatementsArrived())
    assert not msg.StatementsArrived().can_replace(msg.SessionsChanged())


# --------------------------------------------------------------------------- other screens


async def test_audit_screen_lists_and_filters(
    running: tuple[BackstopApp, Pilot[None]], runtime: Runtime, pg: PgServer, items_db: str
) -> None:
    app, pilot = running
    conn = await client(runtime, pg, items_db, name="audit-agent")
    try:
        await conn.execute("INSERT INTO items VALUES (100, 'hundred')")
        await conn.fetch("SELECT * FROM items WHERE id = 100")
    finally:
        await conn.close()
    await pilot.press("2")
    await until(pilot, lambda: isinstance(app.screen, AuditScreen))
    screen = app.screen
    assert isinstance(screen, AuditScreen)
    table = screen.query_one("#audit-table", DataTable)
    await until(pilot, lambda: table.row_count >= 2, what="audit rows")
    rows = table_text(table)
    assert any("INSERT" in row and "items" in row for row in rows)

    screen.query_one("#f-text", Input).focus()
    await pilot.press(*"hundred")
    await until(
        pilot,
        lambda: table.row_count >= 1 and all("hundred" in r for r in table_text(table)),
        what="the text filter",
    )
    assert any("INSERT" in row for row in table_text(table))

    screen.query_one("#f-text", Input).value = ""
    screen.query_one("#f-risk", Select).value = "LOW"
    await until(
        pilot,
        lambda: table.row_count >= 1 and all("SELECT" in r for r in table_text(table)),
        what="the risk filter",
    )
    screen.query_one("#f-agent", Input).value = "nobody"
    await until(pilot, lambda: table.row_count == 0, what="the agent filter")
    screen.query_one("#f-agent", Input).value = ""
    await until(pilot, lambda: table.row_count >= 1)

    table.focus()
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, AuditDetailScreen))
    assert "FROM items WHERE id = 100" in app.screen.query_one(SqlView).sql
    await pilot.press("escape")
    await until(pilot, lambda: isinstance(app.screen, AuditScreen))

    # New statements show up without a key press.
    screen.query_one("#f-risk", Select).clear()
    conn = await client(runtime, pg, items_db, name="audit-agent")
    try:
        await conn.fetch("SELECT 'fresh row' AS marker")
    finally:
        await conn.close()
    await until(
        pilot,
        lambda: any("fresh row" in r for r in table_text(table)),
        what="the audit screen to refresh on new statements",
    )


async def test_invalid_policy_edit_becomes_an_alert(
    running: tuple[BackstopApp, Pilot[None]], runtime: Runtime, tmp_path: Path
) -> None:
    app, pilot = running
    policy = tmp_path / "policy.json"
    write_policy(policy, '{"defaults": {"LOW": "allow"}, "rules": [')
    await until(
        pilot,
        lambda: any(a.kind == "policy" and a.status == "open" for a in app.alerts),
        what="the policy alert",
    )
    await until(pilot, lambda: "edit rejected" in text_of(app.screen.query_one(StatusBar)))
    dashboard_alerts = table_text(app.screen.query_one("#alerts", DataTable))
    assert any("olicy file is invalid" in row for row in dashboard_alerts)

    await pilot.press("3")
    await until(pilot, lambda: isinstance(app.screen, AlertsScreen))
    table = app.screen.query_one("#alerts-full", DataTable)
    await until(pilot, lambda: table.row_count >= 1)
    assert "olicy file is invalid" in table_text(table)[0]
    detail = text_of(app.screen.query_one("#alert-detail", Static))
    assert "not valid JSON" in detail
    await pilot.press("k")
    await until(
        pilot,
        lambda: any(a.kind == "policy" and a.status == "acked" for a in app.alerts),
        what="the acknowledgement",
    )
    assert "acked by" in table_text(table)[0]

    write_policy(policy, policy_doc())  # fixed: the alert closes
    await until(
        pilot,
        lambda: all(a.status == "closed" for a in app.alerts if a.kind == "policy"),
        what="the alert to close after a good reload",
    )


@pytest.fixture
def bypass_runtime(items_db: str, tmp_path: Path) -> Runtime:
    bypass = {"enabled": True, "interval_seconds": 1, "agent_roles": [AGENT_ROLE.name]}
    return make_runtime(items_db, tmp_path, policy_doc(bypass=bypass))


async def test_bypass_alert_is_shown_and_acknowledged(
    bypass_runtime: Runtime, pg: PgServer, items_db: str
) -> None:
    app = BackstopApp(bypass_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.header.gateway == "running")
        database = items_db.rsplit("/", 1)[1]
        direct = await asyncpg.connect(
            host=pg.host, port=pg.port, user=AGENT_ROLE.name, database=database, ssl=False
        )
        try:
            await until(
                pilot,
                lambda: any(a.kind == "bypass" and a.status == "open" for a in app.alerts),
                what="the bypass alert",
            )
        finally:
            await direct.close()
        rows = table_text(app.screen.query_one("#alerts", DataTable))
        assert any("bypassing Backstop" in row for row in rows)
        await pilot.press("3")
        await until(pilot, lambda: isinstance(app.screen, AlertsScreen))
        table = app.screen.query_one("#alerts-full", DataTable)
        await until(pilot, lambda: table.row_count >= 1)
        for index, view in enumerate(app.screen.query_one("#alerts-full").views):  # type: ignore[attr-defined]
            if view.kind == "bypass":
                table.move_cursor(row=index)
        await pilot.press("k")
        await until(
            pilot,
            lambda: any(a.kind == "bypass" and a.status in ("acked", "closed") for a in app.alerts),
            what="the acknowledgement in the store",
        )
        stored = await bypass_runtime.store.alerts_list()  # type: ignore[union-attr]
        bypass = [a for a in stored if a.kind == "bypass"]
        assert bypass and (bypass[0].acked_by == app.operator or bypass[0].status == "closed")


async def test_every_screen_and_key_is_reachable(
    running: tuple[BackstopApp, Pilot[None]], runtime: Runtime
) -> None:
    app, pilot = running
    await pilot.press("4")
    await until(pilot, lambda: isinstance(app.screen, SnapshotsScreen))
    if getattr(runtime, "snapshot_health", None) is None:
        message = app.screen.query_one("#snapshots-missing", Static)
        assert message.display and "Snapshot store not configured" in text_of(message)
    await pilot.press("s")  # snapshot now: explains itself instead of failing
    await pilot.press("5")
    await until(pilot, lambda: isinstance(app.screen, RecoveryScreen))
    if getattr(runtime, "recovery", None) is None:
        assert "Recovery comes with snapshots" in text_of(
            app.screen.query_one("#recovery-missing", Static)
        )
    await pilot.press("question_mark")
    await until(pilot, lambda: isinstance(app.screen, HelpScreen))
    await pilot.press("escape")
    await until(pilot, lambda: isinstance(app.screen, RecoveryScreen))
    await pilot.press("3")
    await until(pilot, lambda: isinstance(app.screen, AlertsScreen))
    await pilot.press("2")
    await until(pilot, lambda: isinstance(app.screen, AuditScreen))

    await pilot.press("ctrl+p")
    await until(pilot, lambda: isinstance(app.screen, CommandPalette))
    await pilot.press(*"Snapshots")
    await pilot.pause(0.3)
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, SnapshotsScreen), what="palette command")

    await pilot.press("1")
    await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
    snapshots = text_of(app.screen.query_one("#snapshot-health", Static))
    if getattr(runtime, "snapshot_health", None) is None:
        assert "snapshots not configured" in snapshots
    await pilot.press("enter")  # nothing pending: a note, no screen
    assert isinstance(app.screen, DashboardScreen)


@pytest.fixture
def snapshot_runtime(items_db: str, tmp_path: Path) -> Runtime:
    doc = policy_doc()
    doc["protected"] = [{"table": "public.items", "interval_seconds": 3600}]
    path = write_policy(tmp_path / "policy.json", doc)
    settings = Settings(
        upstream=items_db,
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        policy=path,
        store=(tmp_path / "snapshots").as_uri(),
        upstream_sslmode="disable",
    )
    return Runtime(settings)


async def test_snapshot_health_and_snapshot_now(snapshot_runtime: Runtime) -> None:
    app = BackstopApp(snapshot_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.header.gateway == "running")
        await until(
            pilot,
            lambda: any(h.table == "public.items" and h.health == "fresh"
                        for h in app.snapshot_health or ()),
            within=30,
            what="a fresh scheduled snapshot of public.items",
        )  # fmt: skip
        panel = text_of(app.screen.query_one("#snapshot-health", Static))
        assert "items" in panel and "fresh" in panel
        await pilot.press("4")
        await until(pilot, lambda: isinstance(app.screen, SnapshotsScreen))
        screen = app.screen
        assert not screen.query_one("#snapshots-missing").display
        health = screen.query_one("#health-table", DataTable)
        await until(pilot, lambda: health.row_count == 1)
        assert "items" in table_text(health)[0] and "fresh" in table_text(health)[0]
        recorded = screen.query_one("#recorded-table", DataTable)
        await until(pilot, lambda: any("items" in r for r in table_text(recorded)))
        before = sum("ok" in r for r in table_text(recorded))
        health.focus()
        await pilot.press("s")
        await until(
            pilot,
            lambda: sum("ok" in r for r in table_text(recorded)) > before,
            within=30,
            what="the snapshot taken with s",
        )


async def test_recovery_wizard_restores_validates_and_writes_copy_back(
    snapshot_runtime: Runtime, items_db: str, tmp_path: Path
) -> None:
    """The wizard against the core's recovery service (attached here the way the runtime is
    asked to expose it as `runtime.recovery`)."""
    app = BackstopApp(snapshot_runtime)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.header.gateway == "running")
        await until(
            pilot,
            lambda: any(h.health == "fresh" for h in app.snapshot_health or ()),
            within=30,
            what="the first snapshot",
        )
        with psycopg.connect(items_db, autocommit=True) as conn:
            conn.execute("DELETE FROM items WHERE id > 15")  # the accident
        if getattr(snapshot_runtime, "recovery", None) is None:
            assert snapshot_runtime.settings.store is not None
            service = Recovery(
                items_db,
                open_object_store(snapshot_runtime.settings.store),
                snapshot_runtime.store,
                policy=snapshot_runtime.current_policy,
                state_dir=tmp_path / "state",
            )
            snapshot_runtime.recovery = service  # type: ignore[attr-defined]
        await pilot.press("5")
        await until(pilot, lambda: isinstance(app.screen, RecoveryScreen))
        screen = app.screen
        assert isinstance(screen, RecoveryScreen)
        assert not screen.query_one("#recovery-missing").display
        options = screen.query_one("#tables", OptionList)
        await until(pilot, lambda: options.option_count >= 1, what="tables with snapshots")
        assert options.get_option_at_index(0).id == "public.items"
        await pilot.press("enter")
        await until(pilot, lambda: screen.step == 1, what="the snapshot step")
        await pilot.press("enter")
        await until(pilot, lambda: screen.validated, within=30, what="validation")
        checks = text_of(screen.query_one("#checks", Static))
        assert "row count" in checks and "checksum" in checks and "✗" not in checks
        assert "__restored_" in checks and "20 rows" in checks
        await pilot.press("enter")
        await until(pilot, lambda: screen.step == 4, what="the diff")
        diff = text_of(screen.query_one("#diff", Static))
        assert re.search(r"Rows lost from public.items\s+5\b", diff), diff
        await pilot.press("enter")
        await until(pilot, lambda: screen.sql is not None, within=30, what="the copy-back SQL")
        assert "INSERT INTO" in (screen.sql or "") and "items" in (screen.sql or "")
        target = tmp_path / "copy-back.sql"
        await pilot.press("w")
        await until(pilot, lambda: isinstance(app.screen, SaveSqlScreen))
        app.screen.query_one(Input).value = str(target)
        await pilot.press("enter")
        await until(pilot, lambda: target.exists(), what="the saved SQL")
        assert target.read_text().strip() == (screen.sql or "").strip()
        with psycopg.connect(items_db, autocommit=True) as conn:  # the original is untouched
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (15,)


@pytest.fixture
def shop_db(fresh_db: str) -> str:
    """The demo's shop schema and data in a fresh database."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(demo_schema_sql())  # type: ignore[arg-type]
    return fresh_db


async def test_demo_agent_is_held_under_the_shipped_policy(
    shop_db: str, tmp_path: Path, pg: PgServer
) -> None:
    shipped = json.loads((ROOT / "policy.json").read_text())
    shipped["bypass"]["enabled"] = False  # this test's own setup connects directly
    runtime = make_runtime(shop_db, tmp_path, shipped)
    reports: list[str] = []
    app = BackstopApp(runtime)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.header.gateway == "running")
        assert runtime.gateway is not None
        database = shop_db.rsplit("/", 1)[1]
        agent = DemoAgent(
            f"postgresql://{pg.user}@127.0.0.1:{runtime.gateway.port}/{database}?sslmode=disable",
            report=lambda text, _severity: reports.append(text),
            pace=(0.05, 0.2),
            risky_every=(0.3, 0.6),
        )
        agent.start()
        try:
            await _approve_then_deny(app, pilot, agent, reports)
        finally:
            await agent.stop()


async def _approve_then_deny(
    app: BackstopApp, pilot: Pilot[None], agent: DemoAgent, reports: list[str]
) -> None:
    await until(pilot, lambda: app.pending, within=30, what="the agent's risky UPDATE")
    record = app.pending[0]
    assert record.rule == "approve-large-writes" and record.agent.endswith("demo-agent")
    assert record.operation == "UPDATE" and (record.row_estimate or 0) > 10_000
    await pilot.press("enter")
    await until(pilot, lambda: getattr(app.screen, "record", None) is not None)
    await pilot.press("a")
    await until(pilot, lambda: any("approved and ran: UPDATE" in r for r in reports), what="run")
    await until(pilot, lambda: app.pending, within=30, what="the next risky UPDATE")
    await until(pilot, lambda: isinstance(app.screen, DashboardScreen))
    await pilot.press("enter")
    await until(pilot, lambda: getattr(app.screen, "record", None) is not None)
    await pilot.press("d")
    await until(pilot, lambda: isinstance(app.screen, DenyReasonScreen))
    await pilot.press(*"not during business hours", "enter")
    await until(
        pilot,
        lambda: any("refused" in r and "not during business hours" in r for r in reports),
        what="the denial reported by the agent",
    )
    assert agent.sent > 5, "ordinary traffic kept flowing"
    assert app.feed.decided_total > 5


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_q_stops_the_runtime_and_quits(runtime: Runtime) -> None:
    app = BackstopApp(runtime)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.header.gateway == "running")
        assert runtime.gateway is not None
        port = runtime.gateway.port
        assert _port_open(port)
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, what="the app to exit")
    assert runtime.store is None
    assert not _port_open(port)


async def test_a_runtime_that_cannot_start_says_why(items_db: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_policy(tmp_path / "policy.json", policy_doc())
        runtime = Runtime(
            Settings(
                upstream=items_db,
                listen=f"127.0.0.1:{port}",
                state_dir=tmp_path / "state",
                policy=path,
                upstream_sslmode="disable",
            )
        )
        app = BackstopApp(runtime)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.header.gateway == "failed")
            assert "cannot listen" in (app.header.error or "")
            assert "cannot listen" in text_of(app.screen.query_one(StatusBar))
