"""SQL with syntax highlighting, wrapped to the panel."""

from __future__ import annotations

from rich.syntax import Syntax
from textual.widgets import Static


def sql_syntax(sql: str) -> Syntax:
    return Syntax(
        sql.strip(),
        "sql",
        theme="ansi_dark",
        word_wrap=True,
        background_color="default",
        line_numbers=sql.count("\n") > 2,
    )


class SqlView(Static):
    DEFAULT_CSS = """
    SqlView { height: auto; padding: 0 1; border: round $accent; }
    """

    def __init__(self, sql: str = "", *, id: str | None = None) -> None:
        super().__init__(sql_syntax(sql), id=id)
        self.sql = sql

    def show(self, sql: str) -> None:
        self.sql = sql
        self.update(sql_syntax(sql))
