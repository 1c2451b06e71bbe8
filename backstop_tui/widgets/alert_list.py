"""Alerts: what the store holds (bypass, policy reload errors, snapshot failures, ...).

A policy edit that does not validate arrives as a `PolicyInvalid` event, and the core files it
as a stored alert (kind `policy`, keyed by the policy path) a moment later. The app keeps a
local entry (`id` None) for it meanwhile, and for a core that does not file one, so the
operator always sees it in the same list; once the store has the alert the local entry goes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from rich.text import Text
from textual.widgets import DataTable

from backstop_core.store import AlertRecord
from backstop_tui.widgets.formatting import DIM, duration, severity_style, stamp

POLICY_ALERT_KIND = "policy"


@dataclass(frozen=True)
class AlertView:
    """One alert as the UI lists it, from the store or kept locally."""

    id: int | None
    key: str
    time: datetime
    kind: str
    severity: str
    title: str
    details: str
    status: str
    acked_by: str | None = None
    count: int = 1

    @property
    def row_key(self) -> str:
        return str(self.id) if self.id is not None else f"local:{self.kind}:{self.key}"

    @classmethod
    def from_record(cls, record: AlertRecord) -> AlertView:
        return cls(
            id=record.id,
            key=record.key,
            time=record.time,
            kind=record.kind,
            severity=record.severity,
            title=record.title,
            details=_details(record.details_json),
            status=record.status,
            acked_by=record.acked_by,
            count=record.count,
        )


def _details(details_json: str) -> str:
    try:
        data = json.loads(details_json)
    except ValueError:
        return details_json
    if isinstance(data, dict):
        return "; ".join(f"{k}: {v}" for k, v in data.items())
    return str(data)


def merge_alerts(
    stored: Sequence[AlertRecord], local: Sequence[AlertView]
) -> tuple[AlertView, ...]:
    """Stored alerts and local ones, newest first; a local entry the store also has is dropped."""
    views = [AlertView.from_record(r) for r in stored]
    known = {(v.kind, v.key) for v in views}
    views.extend(v for v in local if (v.kind, v.key) not in known)
    views.sort(key=lambda v: v.time, reverse=True)
    return tuple(views)


class AlertTable(DataTable[Text | str]):
    """Alerts newest first; the row key is `AlertView.row_key`."""

    def __init__(self, *, full: bool = False, id: str | None = None) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, id=id)
        self.full = full
        self.views: tuple[AlertView, ...] = ()
        if full:
            self.add_columns("#", "Raised", "Severity", "Kind", "Title", "Status", "Seen")
        else:
            self.add_columns("Severity", "Age", "Alert")

    def show(self, views: Sequence[AlertView], now: float) -> None:
        selected = self.selected()
        shown = tuple(views) if self.full else tuple(v for v in views if v.status != "closed")
        self.views = shown
        self.clear()
        for view in shown:
            self.add_row(*self._cells(view, now), key=view.row_key)
        if selected is not None:
            for index, view in enumerate(shown):
                if view.row_key == selected.row_key:
                    self.move_cursor(row=index, animate=False)
                    break

    def selected(self) -> AlertView | None:
        if not self.views or self.row_count == 0:
            return None
        row = self.cursor_row
        return self.views[row] if 0 <= row < len(self.views) else None

    def _cells(self, view: AlertView, now: float) -> list[Text | str]:
        severity = Text(view.severity.upper(), style=severity_style(view.severity))
        if view.status == "acked":
            severity.stylize("dim")
        if not self.full:
            title = Text(view.title)
            if view.status == "acked":
                title.stylize("dim")
                title.append(" (acked)", style=DIM)
            return [severity, duration(now - view.time.timestamp()), title]
        status = view.status
        if view.acked_by and status == "acked":
            status = f"acked by {view.acked_by}"
        return [
            str(view.id) if view.id is not None else "—",
            stamp(view.time),
            severity,
            view.kind,
            view.title,
            status,
            f"{view.count}×",
        ]
