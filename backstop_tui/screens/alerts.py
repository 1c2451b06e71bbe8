"""Every alert (bypass, policy errors, snapshot failures), with acknowledge."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from backstop_core.store import StoreError
from backstop_tui.widgets.alert_list import AlertTable, AlertView
from backstop_tui.widgets.formatting import DIM, stamp
from backstop_tui.widgets.status_bar import HeaderState, StatusBar

if TYPE_CHECKING:
    from backstop_tui.app import BackstopApp


class AlertsScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("k", "acknowledge", "Acknowledge"),
        Binding("ctrl+r", "refresh", "Refresh"),
    ]

    @property
    def backstop(self) -> BackstopApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Vertical(id="alerts-list-panel", classes="panel") as panel:
            panel.border_title = "Alerts"
            yield AlertTable(full=True, id="alerts-full")
        with Vertical(id="alert-detail-panel", classes="panel") as panel:
            panel.border_title = "Details"
            yield Static(id="alert-detail")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.watch(self.backstop, "header", self._show_header)
        self.watch(self.backstop, "alerts", self._show_alerts)
        self.query_one(AlertTable).focus()

    def on_screen_resume(self) -> None:
        self.backstop.reload_alerts()

    def _show_header(self, state: HeaderState) -> None:
        self.query_one(StatusBar).show(state)

    def _show_alerts(self, views: tuple[AlertView, ...]) -> None:
        table = self.query_one(AlertTable)
        table.show(views, self.backstop.clock())
        live = sum(1 for v in views if v.status == "open")
        self.query_one("#alerts-list-panel").border_subtitle = (
            f"{live} open · {len(views)} in all" if views else "no alerts"
        )
        self._show_detail(table.selected())

    @on(DataTable.RowHighlighted, "#alerts-full")
    def _highlighted(self) -> None:
        self._show_detail(self.query_one(AlertTable).selected())

    def _show_detail(self, view: AlertView | None) -> None:
        detail = self.query_one("#alert-detail", Static)
        if view is None:
            detail.update(Text("No alerts. Bypass alerts and policy errors appear here.", DIM))
            return
        text = Text()
        text.append(view.title, style="bold")
        text.append(f"\n{view.kind} · raised {stamp(view.time)} · {view.count}× ", style=DIM)
        text.append(f"· {view.status}", style=DIM)
        if view.acked_by:
            text.append(f" by {view.acked_by}", style=DIM)
        if view.details:
            text.append(f"\n\n{view.details}")
        detail.update(text)

    def action_acknowledge(self) -> None:
        view = self.query_one(AlertTable).selected()
        if view is None:
            self.notify("No alert selected.", severity="warning")
            return
        if view.status != "open":
            self.notify(f"That alert is already {view.status}.", timeout=3)
            return
        self._acknowledge(view)

    @work(group="ack", exit_on_error=False)
    async def _acknowledge(self, view: AlertView) -> None:
        try:
            await self.backstop.acknowledge(view)
        except (StoreError, RuntimeError) as exc:
            self.notify(str(exc), title="Not acknowledged", severity="error")
            return
        self.notify(f"Acknowledged: {view.title}", timeout=3)

    def action_refresh(self) -> None:
        self.backstop.reload_alerts()
