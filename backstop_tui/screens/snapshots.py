"""Snapshot health per protected table, the snapshots on record, and "snapshot now".

Uses, looked up with getattr so the screen runs on any runtime:
    runtime.scheduler                       None when no snapshot store is configured
    runtime.snapshot_health() -> list of {table, health, age_seconds, max_age_seconds,
                                          snapshot_id, detail}
    await runtime.snapshot_now(tables=[table]) -> the snapshot's manifest (has `id`)
Without them it says the snapshot store is not configured, and still lists what the state
store has on record.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.coordinate import Coordinate
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from backstop_core.store import SnapshotRecord
from backstop_tui.widgets.formatting import DIM, duration, health_style, rows, stamp, tables
from backstop_tui.widgets.snapshot_health import SnapshotHealthTable, TableHealth
from backstop_tui.widgets.status_bar import HeaderState, StatusBar

if TYPE_CHECKING:
    from backstop_tui.app import BackstopApp

NOT_CONFIGURED_TEXT = (
    "Snapshot store not configured.\n\n"
    "Start Backstop with --store file:///path or --store s3://bucket/prefix to take "
    "scheduled snapshots of the protected tables. Without one there is no freshness per "
    "table and no “snapshot now”, and statements whose rule needs a snapshot "
    "(approve_with_snapshot, require_snapshot) are refused."
)


def size_text(size: int | None) -> str:
    if size is None:
        return "—"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class SnapshotsScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "snapshot_now", "Snapshot now"),
        Binding("ctrl+r", "refresh", "Refresh"),
    ]

    class Loaded(Message):
        def __init__(self, records: Sequence[SnapshotRecord]) -> None:
            super().__init__()
            self.records = tuple(records)

    @property
    def backstop(self) -> BackstopApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Vertical(id="health-panel", classes="panel") as panel:
            panel.border_title = "Snapshot health"
            yield Static(NOT_CONFIGURED_TEXT, id="snapshots-missing")
            yield SnapshotHealthTable(id="health-table")
        with Vertical(id="recorded-panel", classes="panel") as panel:
            panel.border_title = "Snapshots on record"
            table: DataTable[Text | str] = DataTable(cursor_type="row", id="recorded-table")
            table.add_columns("Id", "Tables", "Status", "Started", "Took", "Rows", "Size", "LSN")
            yield table
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.watch(self.backstop, "header", self._show_header)
        self.watch(self.backstop, "snapshot_health", self._show_health)
        self.load_recorded()

    def on_screen_resume(self) -> None:
        self.load_recorded()

    def _show_header(self, state: HeaderState) -> None:
        self.query_one(StatusBar).show(state)

    def _show_health(self, rows_: tuple[TableHealth, ...] | None) -> None:
        missing = rows_ is None
        self.query_one("#snapshots-missing").display = missing
        table = self.query_one(SnapshotHealthTable)
        table.display = not missing
        if rows_ is not None:
            table.show(rows_)
            if self.focused is None:
                table.focus()

    @work(exclusive=True, group="recorded", exit_on_error=False)
    async def load_recorded(self) -> None:
        store = self.backstop.runtime.store
        lister = getattr(store, "snapshots_list", None) if store is not None else None
        if lister is None:
            return
        self.post_message(self.Loaded(await lister(limit=100)))

    @on(Loaded)
    def _loaded(self, message: Loaded) -> None:
        table = self.query_one("#recorded-table", DataTable)
        table.clear()
        for record in message.records:
            took = (
                duration((record.finished_at - record.started_at).total_seconds())
                if record.finished_at is not None
                else "—"
            )
            table.add_row(
                record.id,
                tables(record.tables),
                Text(record.status, style=health_style(record.status)),
                stamp(record.started_at),
                took,
                rows(record.rows),
                size_text(record.size_bytes),
                record.wal_lsn or "—",
                key=record.id,
            )
        self.query_one("#recorded-panel").border_subtitle = (
            f"{len(message.records)} newest" if message.records else "none recorded yet"
        )
        if not message.records:
            table.add_row(Text("no snapshots recorded", style=DIM), *[""] * 7)

    def action_snapshot_now(self) -> None:
        runtime = self.backstop.runtime
        snapshot_now = getattr(runtime, "snapshot_now", None)
        if snapshot_now is None or getattr(runtime, "scheduler", True) is None:
            self.notify(
                "Snapshot store not configured: start Backstop with --store to take snapshots.",
                severity="warning",
            )
            return
        table = self.query_one(SnapshotHealthTable)
        if table.row_count == 0:
            self.notify("No protected table to snapshot.", severity="warning")
            return
        key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
        if key is not None:
            self._snapshot(key)

    @work(group="snapshot-now", exit_on_error=False)
    async def _snapshot(self, table: str) -> None:
        snapshot_now = self.backstop.runtime.snapshot_now  # type: ignore[attr-defined]
        self.notify(f"Taking a snapshot of {table}…", timeout=3)
        try:
            result = snapshot_now(tables=[table])
            if inspect.isawaitable(result):
                # Shielded: leaving the screen must not cut a snapshot off halfway.
                result = await asyncio.shield(result)
        except Exception as exc:
            self.notify(str(exc), title=f"Snapshot of {table} failed", severity="error")
            return
        ident = getattr(result, "id", None) or str(result)
        self.notify(f"Snapshot {ident} of {table} is done.", title="Snapshot taken")
        self.load_recorded()
        self.backstop.poll_status()

    def action_refresh(self) -> None:
        self.load_recorded()
        self.backstop.poll_status()
