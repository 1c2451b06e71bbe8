"""Statements waiting for an operator, oldest (closest to expiry) first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Static

from backstop_core.store import ApprovalRecord
from backstop_tui.widgets.formatting import BAD, WAIT, compact_rows, duration, risk_style, tables


class ApprovalTable(DataTable[Text | str]):
    """One row per pending approval; the row key is the approval id."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Review approval"),
    ]


class ApprovalList(Vertical):
    DEFAULT_CSS = """
    ApprovalList > ApprovalTable { height: auto; max-height: 100%; }
    ApprovalList > #approvals-empty { color: $text-muted; padding: 0 1; }
    """

    def __init__(self, clock: Callable[[], float], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.clock = clock
        self.records: tuple[ApprovalRecord, ...] = ()

    def compose(self) -> ComposeResult:
        table = ApprovalTable(cursor_type="row", zebra_stripes=True, id="approvals-table")
        table.add_columns("#", "Agent", "Operation", "Tables", "Rows", "Risk", "Waiting", "Left")
        yield table
        yield Static("Nothing is waiting for approval.", id="approvals-empty")

    def on_mount(self) -> None:
        self._sync_visibility()

    @property
    def table(self) -> ApprovalTable:
        return self.query_one(ApprovalTable)

    def selected_id(self) -> int | None:
        table = self.table
        if not self.records or table.cursor_row < 0 or table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key
        return int(key.value) if key.value is not None else None

    def show(self, records: Sequence[ApprovalRecord]) -> None:
        """Replace the rows, keeping the cursor on the approval it was on."""
        ordered = tuple(sorted(records, key=lambda r: r.id))
        table = self.table
        selected = self.selected_id()
        self.records = ordered
        table.clear()
        now = self.clock()
        for record in ordered:
            table.add_row(*self._cells(record, now), key=str(record.id))
        if selected is not None:
            for index, record in enumerate(ordered):
                if record.id == selected:
                    table.move_cursor(row=index, animate=False)
                    break
        self._sync_visibility()

    def tick(self) -> None:
        """Refresh the waiting/left columns."""
        if not self.records:
            return
        table = self.table
        now = self.clock()
        for record in self.records:
            cells = self._cells(record, now)
            key = str(record.id)
            table.update_cell(key, table.ordered_columns[6].key, cells[6])
            table.update_cell(key, table.ordered_columns[7].key, cells[7])

    def _cells(self, record: ApprovalRecord, now: float) -> list[Text | str]:
        waited = now - record.created_at.timestamp()
        left = record.expires_at.timestamp() - now
        return [
            Text(str(record.id), style="bold"),
            record.agent,
            Text(record.operation, style="bold"),
            tables(record.tables),
            compact_rows(record.row_estimate),
            Text(record.risk, style=risk_style(record.risk)),
            duration(waited),
            Text(duration(left), style=BAD if left < 60 else WAIT),
        ]

    def _sync_visibility(self) -> None:
        self.query_one("#approvals-empty").display = not self.records
