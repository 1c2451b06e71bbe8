"""Snapshot health per protected table, from whatever the runtime offers.

The runtime reports health through `runtime.snapshot_health()` (sync or async; a list of
objects or dicts with `table`, `health`, `age_seconds`, `max_age_seconds`, `snapshot_id` or
`last_snapshot_id`, `detail`), or a `scheduler` with a `health()` method, or the
`snapshot_health` field of its status. Without a scheduler (`runtime.scheduler` is None: no
snapshot store) or any of these, the panel says snapshots are not configured.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.widgets import DataTable, Static

from backstop_tui.widgets.formatting import DIM, duration, health_style

NOT_CONFIGURED = "snapshots not configured"


@dataclass(frozen=True)
class TableHealth:
    table: str
    health: str
    age_seconds: float | None = None
    max_age_seconds: float | None = None
    last_snapshot_id: str | None = None
    detail: str = ""

    @classmethod
    def from_any(cls, item: object) -> TableHealth:
        def get(name: str, default: Any = None) -> Any:
            if isinstance(item, Mapping):
                return item.get(name, default)
            return getattr(item, name, default)

        age = get("age_seconds")
        max_age = get("max_age_seconds")
        return cls(
            table=str(get("table", "?")),
            health=str(get("health", "unknown")),
            age_seconds=float(age) if age is not None else None,
            max_age_seconds=float(max_age) if max_age is not None else None,
            last_snapshot_id=get("last_snapshot_id") or get("snapshot_id"),
            detail=str(get("detail", "") or ""),
        )


async def read_health(runtime: object, status: object | None) -> list[TableHealth] | None:
    """Per-table health, or None when the runtime has no snapshot scheduling at all."""
    if hasattr(runtime, "scheduler") and getattr(runtime, "scheduler", None) is None:
        return None  # the runtime knows snapshots, but no store is configured
    source = getattr(runtime, "snapshot_health", None)
    if source is None:
        scheduler = getattr(runtime, "scheduler", None)
        source = getattr(scheduler, "health", None) if scheduler is not None else None
    if callable(source):
        result = source()
        if inspect.isawaitable(result):
            result = await result
        return [TableHealth.from_any(item) for item in result or ()]
    reported = getattr(status, "snapshot_health", None) if status is not None else None
    if reported:
        return [TableHealth.from_any(item) for item in reported]
    return None


def health_cells(row: TableHealth) -> list[Text | str]:
    age = duration(row.age_seconds) if row.age_seconds is not None else "never"
    if row.max_age_seconds is not None:
        age += f" / {duration(row.max_age_seconds)}"
    return [
        row.table.removeprefix("public."),
        Text(row.health, style=health_style(row.health)),
        age,
        Text(row.detail, style=DIM),
    ]


_WORST_FIRST = {"failing": 0, "failed": 0, "never": 1, "stale": 2}


def summary(rows: Sequence[TableHealth]) -> str:
    """`2 fresh · 1 stale · 1 failing`."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.health] = counts.get(row.health, 0) + 1
    return " · ".join(f"{n} {health}" for health, n in sorted(counts.items()))


class SnapshotHealthPanel(Static):
    """One line per protected table, the worst first, or the reason there are none."""

    DEFAULT_CSS = "SnapshotHealthPanel { height: auto; }"

    def show(self, rows: Sequence[TableHealth] | None) -> None:
        if rows is None:
            self.update(Text(NOT_CONFIGURED, style=DIM))
            return
        if not rows:
            self.update(Text("no protected tables", style=DIM))
            return
        ordered = sorted(rows, key=lambda r: (_WORST_FIRST.get(r.health, 3), r.table))
        text = Text(no_wrap=True, overflow="ellipsis")
        for index, row in enumerate(ordered):
            if index:
                text.append("\n")
            age = duration(row.age_seconds) if row.age_seconds is not None else "never"
            text.append(f"{row.table.removeprefix('public.'):<18.18} ")
            text.append(f"{row.health:<8}", style=health_style(row.health))
            text.append(f" {age:>7}", style=DIM)
        self.update(text)


class SnapshotHealthTable(DataTable[Text | str]):
    """The full table on the snapshots screen."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, id=id)
        self.add_columns("Table", "Health", "Age / max", "Detail")

    def show(self, rows: Sequence[TableHealth]) -> None:
        self.clear()
        for row in rows:
            self.add_row(*health_cells(row), key=row.table)
