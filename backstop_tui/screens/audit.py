"""The audit trail, newest first, filtered by agent, risk, decision, table and SQL text."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Input, Select, Static

from backstop_core.store import AuditRecord
from backstop_tui.widgets.formatting import (
    BAD,
    DIM,
    GOOD,
    WAIT,
    compact_rows,
    one_line,
    risk_style,
    stamp,
    tables,
)
from backstop_tui.widgets.sql_view import SqlView
from backstop_tui.widgets.status_bar import HeaderState, StatusBar

if TYPE_CHECKING:
    from backstop_tui.app import BackstopApp

log = logging.getLogger("backstop.tui")

AUDIT_LIMIT = 300


def _consume(task: asyncio.Future[Any]) -> None:
    """Read the result of a query nobody waits for any more, so no error goes unreported."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("an abandoned audit query failed: %s", task.exception())


RISKS = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
DECISIONS = ("allow", "require_snapshot", "approve", "approve_with_snapshot", "block")
_OUTCOME_STYLES = {"forwarded": GOOD, "error": WAIT}


def outcome_text(record: AuditRecord) -> Text:
    if record.outcome is None:
        return Text("in flight", style=DIM)
    return Text(record.outcome.replace("_", " "), style=_OUTCOME_STYLES.get(record.outcome, BAD))


class AuditDetailScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("enter", "dismiss", "Close", show=False),
    ]

    def __init__(self, record: AuditRecord) -> None:
        super().__init__()
        self.record = record

    def compose(self) -> ComposeResult:
        record = self.record
        with Vertical(id="audit-detail"):
            yield Static(
                Text(f" Audit event {record.id} ", style="bold reverse")
                + Text(f"  {stamp(record.time)}  {record.agent}  {record.client}", style=DIM)
            )
            with VerticalScroll():
                yield SqlView(record.sql)
                yield Static(self._facts())
            yield Static(Text("Esc closes", style=DIM))

    def _facts(self) -> Group:
        r = self.record
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", width=12)
        grid.add_column(ratio=1)
        grid.add_row("Operation", Text(f"{r.operation} on {tables(r.tables)}"))
        grid.add_row("Risk", Text(r.risk, style=risk_style(r.risk)))
        grid.add_row("Decision", Text(f"{r.decision} (rule {r.rule})"))
        grid.add_row("Reason", Text(r.reason))
        grid.add_row("Outcome", outcome_text(r))
        if r.error:
            grid.add_row("Error", Text(r.error, style=BAD))
        grid.add_row("Rows", Text(compact_rows(r.row_estimate)))
        if r.duration_ms is not None:
            grid.add_row("Duration", Text(f"{r.duration_ms:.1f} ms"))
        if r.approval_id is not None:
            grid.add_row("Approval", Text(f"#{r.approval_id}"))
        if r.snapshot_id is not None:
            grid.add_row("Snapshot", Text(r.snapshot_id))
        if r.wal_lsn is not None:
            grid.add_row("WAL before", Text(r.wal_lsn))
        grid.add_row("Session", Text(r.session_id, style=DIM))
        return Group(grid)


class AuditScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "show_event", "Details", show=True),
        Binding("ctrl+r", "refresh", "Refresh"),
        Binding("escape", "focus_table", "To the list", show=False),
    ]

    class Loaded(Message):
        def __init__(self, records: Sequence[AuditRecord]) -> None:
            super().__init__()
            self.records = tuple(records)

    def __init__(self) -> None:
        super().__init__()
        self.records: tuple[AuditRecord, ...] = ()
        self._debounce: Timer | None = None

    @property
    def backstop(self) -> BackstopApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="audit-filters"):
            yield Input(placeholder="agent (exact)", id="f-agent")
            yield Select([(r, r) for r in RISKS], prompt="any risk", id="f-risk", allow_blank=True)
            yield Select([(d, d) for d in DECISIONS], prompt="any decision", id="f-decision")
            yield Input(placeholder="table", id="f-table")
            yield Input(placeholder="text in SQL", id="f-text")
        with Vertical(id="audit-panel", classes="panel") as panel:
            panel.border_title = "Audit trail"
            table: DataTable[Text | str] = DataTable(
                cursor_type="row", zebra_stripes=True, id="audit-table"
            )
            table.add_columns(
                "#", "Time", "Agent", "Operation", "Tables", "Rows", "Risk", "Decision",
                "Outcome", "SQL",
            )  # fmt: skip
            yield table
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.watch(self.backstop, "header", self._show_header)
        self.watch(self.backstop, "audit_version", self._changed, init=False)
        self.query_one("#audit-table").focus()
        self.refresh_audit()

    def on_screen_resume(self) -> None:
        self.refresh_audit()

    def _show_header(self, state: HeaderState) -> None:
        self.query_one(StatusBar).show(state)

    def _changed(self, _version: int) -> None:
        if self.is_current:
            self.refresh_audit()

    def filters(self) -> dict[str, Any]:
        def text(selector: str) -> str | None:
            value = self.query_one(selector, Input).value.strip()
            return value or None

        def choice(selector: str) -> str | None:
            value = self.query_one(selector, Select).value
            return value if isinstance(value, str) else None

        return {
            "agent": text("#f-agent"),
            "risk": choice("#f-risk"),
            "decision": choice("#f-decision"),
            "table": text("#f-table"),
            "text": text("#f-text"),
        }

    @on(Input.Changed)
    @on(Select.Changed)
    def _filter_changed(self) -> None:
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(0.25, self.refresh_audit)

    @on(Input.Submitted)
    def _filter_submitted(self) -> None:
        self.refresh_audit()
        self.query_one("#audit-table").focus()

    @work(exclusive=True, group="audit", exit_on_error=False)
    async def refresh_audit(self) -> None:
        store = self.backstop.runtime.store
        if store is None:
            return
        # audit_query first moves the journal into the store in a transaction: a newer
        # refresh may replace this worker, but must not cut that transaction off.
        query = asyncio.ensure_future(store.audit_query(limit=AUDIT_LIMIT, **self.filters()))
        try:
            records = await asyncio.shield(query)
        except asyncio.CancelledError:
            query.add_done_callback(_consume)
            raise
        except Exception as exc:
            self.query_one("#audit-panel").border_subtitle = f"cannot read the audit: {exc}"
            return
        self.post_message(self.Loaded(records))

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        self.records = message.records
        table = self.query_one("#audit-table", DataTable)
        row = table.cursor_row
        table.clear()
        for record in self.records:
            decision = Text(record.decision)
            if record.decision == "block":
                decision.stylize(BAD)
            elif record.decision != "allow":
                decision.stylize(WAIT)
            table.add_row(
                str(record.id),
                stamp(record.time)[11:],
                record.agent,
                Text(record.operation, style="bold"),
                tables(record.tables),
                compact_rows(record.row_estimate) if record.row_estimate is not None else "",
                Text(record.risk, style=risk_style(record.risk)),
                decision,
                outcome_text(record),
                one_line(record.sql)[:80],
                key=str(record.id),
            )
        if 0 < row < table.row_count:
            table.move_cursor(row=row, animate=False)
        active = {k: v for k, v in self.filters().items() if v}
        suffix = (" · " + ", ".join(f"{k}={v}" for k, v in active.items())) if active else ""
        self.query_one("#audit-panel").border_subtitle = (
            f"{len(self.records)} newest{suffix}"
            if self.records
            else f"no audited statements match{suffix}"
        )

    def action_show_event(self) -> None:
        table = self.query_one("#audit-table", DataTable)
        if not self.records or not 0 <= table.cursor_row < len(self.records):
            return
        self.app.push_screen(AuditDetailScreen(self.records[table.cursor_row]))

    @on(DataTable.RowSelected, "#audit-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_show_event()

    def action_refresh(self) -> None:
        self.refresh_audit()

    def action_focus_table(self) -> None:
        self.query_one("#audit-table").focus()
