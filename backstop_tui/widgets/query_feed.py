"""The live query feed: every statement the gateway judged, newest first, bounded in memory.

`FeedModel` folds core statement events into rows (a `StatementDecided` makes a row, a
`StatementFinished` or an approval decision updates it). `QueryFeed` draws only the lines on
screen with the Line API, each row's strip cached until the row changes, so a feed taking
thousands of statements per second costs a repaint of about one screenful per batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from rich.cells import set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget

from backstop_core.events import Event, StatementDecided, StatementFinished
from backstop_tui.widgets.formatting import (
    BAD,
    DIM,
    GOOD,
    WAIT,
    clock_time,
    compact_rows,
    one_line,
    risk_style,
    tables,
)

FEED_LIMIT = 1000

# (title, width); the last column takes what is left.
COLUMNS: tuple[tuple[str, int], ...] = (
    ("Time", 8),
    ("Agent", 19),
    ("Operation", 13),
    ("Tables", 18),
    ("Est.", 7),
    ("Risk", 8),
    ("Decision", 22),
    ("SQL", 0),
)
_GAP = Segment(" ")
_HEADER = Style(bold=True, underline=True)
_BOLD = Style(bold=True)


@dataclass(slots=True)
class FeedRow:
    """One statement as the feed shows it; mutable so later events can update it in place."""

    key: str | None
    at: float
    session_id: str
    agent: str
    operation: str
    tables: tuple[str, ...]
    estimate: int | None
    risk: str
    action: str
    rule: str
    sql: str
    outcome: str | None = None
    duration_ms: float | None = None
    error: str | None = None
    approval_id: int | None = None
    approval_status: str | None = None
    version: int = 0

    def decision_text(self) -> tuple[str, Style]:
        """What happened to the statement, in words and colour."""
        label = f" #{self.approval_id}" if self.approval_id is not None else ""
        status = self.approval_status
        outcome = self.outcome
        if self.action in ("approve", "approve_with_snapshot") and outcome is None:
            if status in (None, "pending"):
                return (f"held{label}", WAIT)
            if status in ("approved", "used"):
                return (f"approved{label}", GOOD)
            return (_WORDS.get(status, status) + label, BAD)
        if outcome is None:
            return ("allowed…" if self.action != "block" else "blocked", DIM)
        if outcome == "forwarded":
            if status in ("approved", "used"):
                return ("approved → forwarded", GOOD)
            return ("allowed → forwarded", GOOD)
        if outcome == "error":
            first = "approved" if status in ("approved", "used") else "allowed"
            return (f"{first} → error", WAIT)
        return (_WORDS.get(outcome, outcome) + label, BAD)


_WORDS = {"timed_out": "timed out", "expired": "timed out"}


class FeedModel:
    """The newest `limit` statements, indexed by audit key."""

    def __init__(self, limit: int = FEED_LIMIT) -> None:
        self.limit = limit
        self.rows: deque[FeedRow] = deque(maxlen=limit)
        self._by_key: dict[str, FeedRow] = {}
        self.decided_total = 0
        # Set by an approval decision for a row that has not arrived (or was evicted).
        self._approval_by_key: dict[str, tuple[int, str]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def newest(self, index: int) -> FeedRow:
        """The row `index` places from the newest (0 is the newest)."""
        return self.rows[-1 - index]

    def apply(self, batch: Iterable[Event]) -> int:
        """Fold a batch of events in; returns how many rows were added."""
        added = 0
        for event in batch:
            if isinstance(event, StatementDecided):
                self._add(event)
                added += 1
            elif isinstance(event, StatementFinished):
                row = self._by_key.get(event.audit_key) if event.audit_key else None
                if row is not None:
                    row.outcome = event.outcome
                    row.duration_ms = event.duration_ms
                    row.error = event.error
                    row.version += 1
        self.decided_total += added
        return added

    def _add(self, event: StatementDecided) -> None:
        rows = self.rows
        if len(rows) == self.limit:
            old = rows[0]
            if old.key is not None:
                self._by_key.pop(old.key, None)
        row = FeedRow(
            key=event.audit_key,
            at=event.at,
            session_id=event.session_id,
            agent=event.agent,
            operation=event.operation,
            tables=event.tables,
            estimate=event.row_estimate,
            risk=event.risk,
            action=event.action,
            rule=event.rule,
            sql=event.sql,
        )
        if event.audit_key is not None:
            self._by_key[event.audit_key] = row
            linked = self._approval_by_key.pop(event.audit_key, None)
            if linked is not None:
                row.approval_id, row.approval_status = linked
        rows.append(row)

    def link_approval(self, audit_key: str | None, approval_id: int, status: str) -> bool:
        """Record which approval holds a row and how it stands; False if the row is gone."""
        if audit_key is None:
            return False
        row = self._by_key.get(audit_key)
        if row is None:
            if status == "pending":
                self._approval_by_key[audit_key] = (approval_id, status)
                if len(self._approval_by_key) > self.limit:
                    self._approval_by_key.pop(next(iter(self._approval_by_key)))
            return False
        if row.approval_id == approval_id and row.approval_status == status:
            return False
        row.approval_id = approval_id
        row.approval_status = status
        row.version += 1
        return True

    def row_for_approval(self, approval_id: int) -> FeedRow | None:
        for row in reversed(self.rows):
            if row.approval_id == approval_id:
                return row
        return None


def _cell(text: str, width: int, style: Style | None = None, right: bool = False) -> Segment:
    if right:
        text = text[-width:] if len(text) > width else text
        return Segment(text.rjust(width), style)
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…"
    return Segment(set_cell_size(text, width), style)


def render_row(row: FeedRow, width: int) -> Strip:
    decision, decision_style = row.decision_text()
    segments = [
        _cell(clock_time(row.at), 8, DIM),
        _GAP,
        _cell(row.agent, 19),
        _GAP,
        _cell(row.operation, 13, _BOLD),
        _GAP,
        _cell(tables(row.tables), 18),
        _GAP,
        _cell(compact_rows(row.estimate) if row.estimate is not None else "", 7, right=True),
        _GAP,
        _cell(row.risk, 8, risk_style(row.risk)),
        _GAP,
        _cell(decision, 22, decision_style),
        _GAP,
    ]
    used = sum(seg.cell_length for seg in segments)
    rest = width - used
    if rest > 0:
        segments.append(_cell(one_line(row.sql), rest, DIM))
    return Strip(segments).crop(0, width)


def render_header(width: int) -> Strip:
    segments: list[Segment] = []
    for title, size in COLUMNS:
        if size == 0:
            rest = width - sum(seg.cell_length for seg in segments)
            if rest > 0:
                segments.append(_cell(title, rest, _HEADER))
            break
        segments.append(_cell(title, size, _HEADER, right=title == "Est."))
        segments.append(_GAP)
    return Strip(segments).crop(0, width)


class FeedLines(ScrollView, can_focus=True):
    """The scrolling body of the feed: line y shows the y-th newest statement."""

    DEFAULT_CSS = """
    FeedLines { height: 1fr; scrollbar-size-vertical: 1; }
    """

    def __init__(self, model: FeedModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model
        self._cache: dict[int, tuple[int, int, Strip]] = {}

    def rows_changed(self, added: int) -> None:
        """New rows arrived: keep the operator's place if they scrolled away from the top."""
        self.virtual_size = Size(self.size.width, len(self.model))
        if added and self.scroll_y > 0:
            self.scroll_to(y=self.scroll_y + added, animate=False, immediate=True)
        if added >= self.size.height or len(self._cache) > 2 * max(1, self.size.height):
            self._cache.clear()  # every row on screen is new, or the cache outgrew the screen
        self.refresh()

    def render_line(self, y: int) -> Strip:
        index = self.scroll_offset.y + y
        width = self.size.width
        model = self.model
        if index >= len(model):
            if index == 0 and not model.rows:
                return Strip([Segment("No statements yet.", DIM)]).crop(0, width)
            return Strip.blank(width)
        row = model.newest(index)
        ident = id(row)
        cached = self._cache.get(ident)
        if cached is not None and cached[0] == row.version and cached[1] == width:
            return cached[2]
        strip = render_row(row, width)
        self._cache[ident] = (row.version, width, strip)
        return strip


class FeedHeader(Widget):
    DEFAULT_CSS = "FeedHeader { height: 1; }"

    def render_line(self, y: int) -> Strip:
        return render_header(self.size.width)


class QueryFeed(Vertical):
    """Column headings above the scrolling feed."""

    def __init__(self, model: FeedModel, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.model = model

    def compose(self) -> ComposeResult:
        yield FeedHeader()
        yield FeedLines(self.model, id="feed-lines")

    def rows_changed(self, added: int) -> None:
        self.query_one(FeedLines).rows_changed(added)
