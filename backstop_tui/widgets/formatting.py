"""How values look on screen: colours per risk and outcome, ages, row counts, times.

Pure functions with no Textual state, shared by every widget and screen.
"""

from __future__ import annotations

import time
from datetime import datetime

from rich.style import Style

RISK_STYLES: dict[str, Style] = {
    "LOW": Style(color="green"),
    "MEDIUM": Style(color="yellow"),
    "HIGH": Style(color="dark_orange", bold=True),
    "CRITICAL": Style(color="red", bold=True),
}
SEVERITY_STYLES: dict[str, Style] = {
    "info": Style(color="cyan"),
    "warning": Style(color="yellow", bold=True),
    "critical": Style(color="red", bold=True),
}
HEALTH_STYLES: dict[str, Style] = {
    "fresh": Style(color="green"),
    "ok": Style(color="green"),
    "stale": Style(color="yellow", bold=True),
    "running": Style(color="cyan"),
    "failing": Style(color="red", bold=True),
    "failed": Style(color="red", bold=True),
    "never": Style(color="red"),
}
GOOD = Style(color="green")
WAIT = Style(color="yellow", bold=True)
BAD = Style(color="red", bold=True)
DIM = Style(dim=True)

_PLAIN = Style()


def risk_style(risk: str) -> Style:
    return RISK_STYLES.get(risk.upper(), _PLAIN)


def severity_style(severity: str) -> Style:
    return SEVERITY_STYLES.get(severity.lower(), _PLAIN)


def health_style(health: str) -> Style:
    return HEALTH_STYLES.get(health.lower(), _PLAIN)


def clock_time(at: float) -> str:
    """HH:MM:SS in the operator's local time."""
    return time.strftime("%H:%M:%S", time.localtime(at))


def stamp(at: datetime | float | None) -> str:
    """YYYY-MM-DD HH:MM:SS in local time, or a dash."""
    if at is None:
        return "—"
    seconds = at.timestamp() if isinstance(at, datetime) else at
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def duration(seconds: float | None) -> str:
    """A short human duration: 4 s, 3m05s, 2h07m, 3d04h."""
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def rows(count: int | None) -> str:
    """A row count as `12,000`, or `?` when unknown."""
    return "?" if count is None else f"{count:,}"


def compact_rows(count: int | None) -> str:
    """A row count in at most six characters: 950, 12.0k, 3.4M."""
    if count is None:
        return "?"
    if count < 10_000:
        return f"{count:,}"
    if count < 1_000_000:
        return f"{count / 1000:.1f}k"
    return f"{count / 1_000_000:.1f}M"


def tables(names: tuple[str, ...] | list[str]) -> str:
    """Table names without the `public.` prefix a reader does not need."""
    return ", ".join(n.removeprefix("public.") for n in names) or "—"


def one_line(sql: str) -> str:
    """SQL folded onto one line, for lists."""
    return " ".join(sql.split())
