"""The default screen: header, pending approvals, alerts, snapshot health, live query feed."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from backstop_core.store import ApprovalRecord
from backstop_tui.widgets.alert_list import AlertTable, AlertView
from backstop_tui.widgets.approval_list import ApprovalList
from backstop_tui.widgets.query_feed import QueryFeed
from backstop_tui.widgets.snapshot_health import SnapshotHealthPanel, TableHealth, summary
from backstop_tui.widgets.status_bar import HeaderState, StatusBar

if TYPE_CHECKING:
    from backstop_tui.app import BackstopApp


class DashboardScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "review", "Review approval"),
    ]

    @property
    def backstop(self) -> BackstopApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        app = self.backstop
        yield StatusBar(id="status")
        with Horizontal(id="top"):
            with Vertical(id="approvals-panel", classes="panel") as panel:
                panel.border_title = "Pending approvals"
                yield ApprovalList(app.clock, id="approvals")
            with Vertical(id="side"):
                with Vertical(id="alerts-panel", classes="panel") as panel:
                    panel.border_title = "Alerts"
                    yield AlertTable(id="alerts")
                with Vertical(id="snapshots-panel", classes="panel") as panel:
                    panel.border_title = "Snapshots"
                    yield SnapshotHealthPanel(id="snapshot-health")
        with Vertical(id="feed-panel", classes="panel") as panel:
            panel.border_title = "Live queries"
            yield QueryFeed(app.feed, id="feed")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        app = self.backstop
        self.watch(app, "header", self._show_header)
        self.watch(app, "pending", self._show_pending)
        self.watch(app, "alerts", self._show_alerts)
        self.watch(app, "snapshot_health", self._show_health)
        self.watch(app, "feed_version", self._show_feed)
        self.watch(app, "tick", self._tick)
        self.query_one("#approvals-table").focus()

    def _show_header(self, state: HeaderState) -> None:
        self.query_one(StatusBar).show(state)

    def _show_pending(self, records: tuple[ApprovalRecord, ...]) -> None:
        self.query_one(ApprovalList).show(records)
        panel = self.query_one("#approvals-panel")
        panel.border_subtitle = f"{len(records)} waiting" if records else ""
        panel.set_class(bool(records), "attention")

    def _show_alerts(self, views: tuple[AlertView, ...]) -> None:
        table = self.query_one(AlertTable)
        table.show(views, self.backstop.clock())
        live = sum(1 for v in views if v.status == "open")
        panel = self.query_one("#alerts-panel")
        panel.border_subtitle = f"{live} open" if live else "none open"
        panel.set_class(live > 0, "alarm")

    def _show_health(self, rows: tuple[TableHealth, ...] | None) -> None:
        self.query_one(SnapshotHealthPanel).show(rows)
        panel = self.query_one("#snapshots-panel")
        panel.border_subtitle = summary(rows) if rows else ""
        panel.set_class(any(r.health in ("failing", "never", "stale") for r in rows or ()), "alarm")

    def _show_feed(self, _version: int) -> None:
        feed = self.query_one(QueryFeed)
        added = self.backstop.feed.decided_total - getattr(self, "_feed_seen", 0)
        self._feed_seen = self.backstop.feed.decided_total
        feed.rows_changed(added)
        if self.backstop.feed.decided_total == added:
            self._feed_subtitle()  # the first rows; after that once a second, on the tick

    def _feed_subtitle(self) -> None:
        app = self.backstop
        rate = app.header.rate
        shown = len(app.feed)
        self.query_one(
            "#feed-panel"
        ).border_subtitle = (
            f"{rate:,.0f}/s · newest first · last {shown:,} of {app.feed.decided_total:,}"
        )

    def _tick(self, _tick: int) -> None:
        self.query_one(ApprovalList).tick()
        self._feed_subtitle()

    @on(DataTable.RowSelected, "#approvals-table")
    def _approval_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.backstop.open_approval(int(event.row_key.value))

    def action_review(self) -> None:
        approvals = self.query_one(ApprovalList)
        selected = approvals.selected_id()
        if selected is None and approvals.records:
            selected = approvals.records[0].id
        if selected is None:
            self.notify("Nothing is waiting for approval.", timeout=3)
            return
        self.backstop.open_approval(selected)
