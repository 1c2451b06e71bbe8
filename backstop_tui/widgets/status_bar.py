"""The dashboard's header: is the gateway up, can it reach PostgreSQL, which policy rules."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

from backstop_core.runtime import RuntimeStatus
from backstop_tui.widgets.formatting import BAD, DIM, GOOD, WAIT, clock_time


@dataclass(frozen=True)
class HeaderState:
    """Everything the header shows, gathered by the app from polls and events."""

    gateway: str  # starting, running, stopping, stopped, failed
    status: RuntimeStatus | None
    error: str | None = None
    policy_reloaded_at: float | None = None
    rate: float = 0.0
    banner: str | None = None


def header_text(state: HeaderState) -> Text:
    """Line 1: gateway, upstream, sessions, policy. Line 2: counts, then the news."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(" BACKSTOP ", style="bold reverse")
    text.append("  ")
    status = state.status
    if state.gateway == "running":
        text.append("● ", style=GOOD)
    elif state.gateway in ("starting", "stopping"):
        text.append("◌ ", style=WAIT)
    else:
        text.append("✖ ", style=BAD)
    text.append("gateway ", style=DIM)
    if status is None:
        text.append(state.gateway, style="bold")
    else:
        text.append(status.listen, style="bold")
        if state.gateway != "running":
            text.append(f" {state.gateway}", style=WAIT)
        text.append("  → upstream ", style=DIM)
        text.append(status.upstream)
        reach = status.upstream_reachable
        if reach is True:
            text.append(" ✓ reachable", style=GOOD)
        elif reach is False:
            text.append(" ✖ UNREACHABLE", style=BAD)
        else:
            text.append(" (checking)", style=DIM)
        text.append(f"   {status.sessions} session{'s' if status.sessions != 1 else ''}")
        text.append("   policy ", style=DIM)
        text.append(status.policy_version, style="bold")
        if status.policy_error:
            text.append(" ✖ edit rejected", style=BAD)
        else:
            text.append(" ✓", style=GOOD)
    text.append("\n ")
    if status is not None:
        pending = status.pending_approvals
        text.append(f"{pending} pending", style=WAIT if pending else DIM)
        text.append(" · ", style=DIM)
        alerts = status.open_alerts
        text.append(
            f"{alerts} open alert{'s' if alerts != 1 else ''}", style=BAD if alerts else DIM
        )
        text.append(" · ", style=DIM)
    if state.error:
        text.append(state.error, style=BAD)
    elif status is not None and status.policy_error:
        text.append(f"policy edit rejected, still enforcing {status.policy_version}: ", style=BAD)
        text.append(status.policy_error, style=BAD)
    elif state.banner:
        text.append(state.banner, style="italic")
    elif status is not None:
        text.append(f"policy {status.policy_path or 'built-in default'}", style=DIM)
        if state.policy_reloaded_at is not None:
            text.append(f", reloaded {clock_time(state.policy_reloaded_at)}", style=DIM)
    return text


class StatusBar(Static):
    """Two lines at the top of the dashboard."""

    DEFAULT_CSS = """
    StatusBar { height: 2; background: $panel; }
    """

    def show(self, state: HeaderState) -> None:
        self.update(header_text(state))
