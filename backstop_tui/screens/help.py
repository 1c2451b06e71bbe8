"""`?`: every key on every screen."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Everywhere",
        (
            ("1 … 5", "dashboard, audit, alerts, snapshots, recovery"),
            ("ctrl+p", "command palette: screens and actions by name"),
            ("tab / shift+tab", "move between panels"),
            ("?", "this help"),
            ("q, ctrl+c", "stop the gateway and quit"),
        ),
    ),
    (
        "Dashboard",
        (
            ("↑ ↓", "choose a pending approval"),
            ("enter", "review it: SQL, classification, size, snapshot, rule"),
        ),
    ),
    (
        "Approval",
        (
            ("a", "approve: the waiting statement runs at once"),
            ("d", "deny, with a reason the agent reads"),
            ("esc", "back to the dashboard"),
        ),
    ),
    (
        "Audit",
        (
            ("type in the filters", "agent, risk, decision, table, text in SQL"),
            ("enter", "the full record of the selected statement"),
            ("ctrl+r", "refresh now"),
        ),
    ),
    ("Alerts", (("k", "acknowledge the selected alert"), ("ctrl+r", "refresh now"))),
    ("Snapshots", (("s", "snapshot the selected table now"),)),
    (
        "Recovery",
        (
            ("enter", "next step"),
            ("backspace", "back to the snapshot choice"),
            ("w", "save the copy-back SQL to a file"),
            ("ctrl+n", "start over"),
        ),
    ),
)


def help_table() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", width=22)
    table.add_column()
    for index, (section, rows) in enumerate(KEYS):
        if index:
            table.add_row("", "")
        table.add_row(Text(section, style="bold underline"), "")
        for key, what in rows:
            table.add_row(key, what)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog"):
            yield Static(Text(" Backstop keys ", style="bold reverse"))
            with VerticalScroll():
                yield Static(help_table())
            yield Static(Text("Esc closes", style="dim"))
