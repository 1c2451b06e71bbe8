"""One held statement in full: the SQL, why it is held, how big it is, the snapshot it is bound
to. `a` approves, `d` asks for a reason and denies; the waiting client hears at once."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Label, Static

from backstop_core.store import ApprovalRecord, StoreError
from backstop_tui.widgets.formatting import (
    BAD,
    DIM,
    GOOD,
    WAIT,
    duration,
    risk_style,
    rows,
    stamp,
)
from backstop_tui.widgets.sql_view import SqlView

if TYPE_CHECKING:
    from backstop_tui.app import BackstopApp


def classifications(record: ApprovalRecord) -> list[dict[str, Any]]:
    try:
        data = json.loads(record.classification_json or "[]")
    except ValueError:
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def title_text(record: ApprovalRecord, now: float) -> Text:
    text = Text()
    text.append(f" Approval #{record.id} ", style="bold reverse")
    text.append(" ")
    status_style = {"pending": WAIT, "approved": GOOD, "used": GOOD}.get(record.status, BAD)
    text.append(record.describe_status().upper(), style=status_style)
    text.append(f"   agent {record.agent}", style="bold")
    text.append(f"  from {record.client}  session {record.session_id}", style=DIM)
    waited = now - record.created_at.timestamp()
    text.append(f"\n requested {stamp(record.created_at)} ({duration(waited)} ago)", style=DIM)
    if record.status == "pending":
        left = record.expires_at.timestamp() - now
        text.append("   expires in ", style=DIM)
        text.append(duration(left), style=BAD if left < 60 else WAIT)
    if record.decision_reason:
        text.append(f"   reason: {record.decision_reason}", style=DIM)
    return text


def facts(record: ApprovalRecord, now: float) -> Group:
    """Why it is held, what it is, how big, and the snapshot it is bound to."""
    why = Table.grid(padding=(0, 2))
    why.add_column(style="bold", width=12)
    why.add_column(ratio=1)
    why.add_row("Rule", Text(record.rule, style="bold"))
    why.add_row("Reason", Text(record.reason))

    size = Text()
    if record.row_estimate is None:
        size.append("no row estimate", style=WAIT)
    else:
        size.append(f"~{rows(record.row_estimate)} rows", style="bold")
    if record.table_rows is not None:
        target = record.tables[0] if record.tables else "the table"
        size.append(f" of {rows(record.table_rows)} in {target}")
        if record.row_estimate is not None and record.table_rows > 0:
            share = 100 * record.row_estimate / record.table_rows
            size.append(f" ({share:.0f}%)", style=DIM)
    why.add_row("Rows", size)

    snapshot = Text()
    if record.snapshot_id is None:
        snapshot.append("none bound: the matching rule does not require a snapshot", style=DIM)
    else:
        snapshot.append(record.snapshot_id, style="bold")
        if record.snapshot_age_seconds is not None:
            age_now = record.snapshot_age_seconds + (now - record.created_at.timestamp())
            snapshot.append(f"  taken {duration(age_now)} ago")
        if record.snapshot_manifest_sha256:
            snapshot.append(f"  manifest {record.snapshot_manifest_sha256[:12]}", style=DIM)
    why.add_row("Snapshot", snapshot)
    why.add_row("Tables", Text(", ".join(record.tables) or "—"))

    parts: list[Any] = [Text("Why it is held", style="bold underline"), why, Text("")]
    parts.append(Text("Classification", style="bold underline"))
    for item in classifications(record) or [{"operation": record.operation, "risk": record.risk}]:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(width=12)
        grid.add_column(ratio=1)
        risk = str(item.get("risk", "?"))
        head = Text()
        head.append(str(item.get("operation", "?")), style="bold")
        head.append(f"  {item.get('category', '')}  ", style=DIM)
        head.append(f"risk {risk}", style=risk_style(risk))
        grid.add_row(Text("Statement", style="bold"), head)
        flags = Text()
        for label, key in (
            ("WHERE clause", "has_where"),
            ("unbounded", "unbounded"),
            ("empties/rewrites table", "table_destructive"),
        ):
            value = item.get(key)
            if value is None:
                continue
            flags.append(f"{label}: ", style=DIM)
            flags.append(
                "yes" if value else "no", style=BAD if value and key != "has_where" else ""
            )
            flags.append("   ")
        grid.add_row("", flags)
        for reason in item.get("reasons") or ():
            grid.add_row("", Text(f"• {reason}"))
        parts.append(grid)
    return Group(*parts)


class DenyReasonScreen(ModalScreen[str | None]):
    """Asks why; the agent reads the answer in its error message."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, approval_id: int) -> None:
        super().__init__()
        self.approval_id = approval_id

    def compose(self) -> ComposeResult:
        with Vertical(id="deny-dialog"):
            yield Label(f"Deny approval #{self.approval_id}", id="deny-title")
            yield Label("Why? The agent receives this reason with the refusal.", classes="dim")
            yield Input(placeholder="e.g. use a WHERE clause on ordered_at", id="deny-reason")
            yield Label("", id="deny-error")
            yield Label("Enter denies · Esc cancels", classes="dim")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        reason = event.value.strip()
        if not reason:
            self.query_one("#deny-error", Label).update("A reason is required to deny.")
            return
        self.dismiss(reason)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ApprovalDetailScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"),
        Binding("d", "deny", "Deny…"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, approval_id: int, record: ApprovalRecord | None = None) -> None:
        super().__init__()
        self.approval_id = approval_id
        self.record = record
        self._deciding = False

    @property
    def backstop(self) -> BackstopApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(Text(f" Approval #{self.approval_id} — loading…"), id="detail-title")
        with VerticalScroll(id="detail-body"):
            yield SqlView(id="detail-sql")
            yield Static(id="detail-facts")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.record is not None:
            self._show_record()
        self.load()
        self.watch(self.backstop, "pending", self._pending_changed, init=False)
        self.watch(self.backstop, "tick", self._tick, init=False)
        self.query_one("#detail-body").focus()

    def _pending_changed(self, records: tuple[ApprovalRecord, ...]) -> None:
        # Gone from the pending list: decided elsewhere, expired or cancelled.
        record = self.record
        gone = all(r.id != self.approval_id for r in records)
        if record is not None and record.status == "pending" and gone:
            self.load()

    def _tick(self, _tick: int) -> None:
        if self.record is not None:
            self.query_one("#detail-title", Static).update(
                title_text(self.record, self.backstop.clock())
            )

    @work(exclusive=True, group="load", exit_on_error=False)
    async def load(self) -> None:
        store = self.backstop.runtime.store
        if store is None:
            return
        try:
            record = await store.approval_get(self.approval_id)
        except Exception as exc:
            self.notify(str(exc), title="Cannot read the approval", severity="error")
            return
        if record is None:
            self.query_one("#detail-title", Static).update(
                Text(f" Approval #{self.approval_id} does not exist.", style=BAD)
            )
            return
        self.record = record
        self._show_record()

    def _show_record(self) -> None:
        record = self.record
        assert record is not None
        now = self.backstop.clock()
        self.query_one("#detail-title", Static).update(title_text(record, now))
        self.query_one(SqlView).show(record.sql)
        self.query_one("#detail-facts", Static).update(facts(record, now))
        self.query_one(SqlView).border_title = f"{record.operation} by {record.agent}"

    def _can_decide(self) -> bool:
        record = self.record
        if record is None:
            self.notify("Still loading the approval.", severity="warning")
            return False
        if record.status != "pending":
            self.notify(
                f"Approval #{record.id} is already {record.describe_status()}.",
                severity="warning",
            )
            return False
        return not self._deciding

    def action_approve(self) -> None:
        if self._can_decide():
            self._decide(True, None)

    def action_deny(self) -> None:
        if not self._can_decide():
            return

        def denied(reason: str | None) -> None:
            if reason:
                self._decide(False, reason)

        self.app.push_screen(DenyReasonScreen(self.approval_id), denied)

    @work(exclusive=True, group="decide", exit_on_error=False)
    async def _decide(self, approve: bool, reason: str | None) -> None:
        self._deciding = True
        try:
            record = await self.backstop.decide(self.approval_id, approve=approve, reason=reason)
        except (StoreError, RuntimeError) as exc:
            self.notify(str(exc), title="Not decided", severity="error")
            self.load()
            return
        finally:
            self._deciding = False
        self.record = record
        if approve:
            self.notify(f"Approved #{record.id}; the statement runs now.", title="Approved")
        else:
            self.notify(f"Denied #{record.id}: {reason}", title="Denied", severity="warning")
        if self.is_current:
            self.app.pop_screen()

    def action_back(self) -> None:
        self.app.pop_screen()
