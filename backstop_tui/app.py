"""BackstopApp: hosts the runtime, turns its events into messages, and keeps the state the
screens render (header, pending approvals, alerts, snapshot health, the query feed).

The runtime is handed in, so tests give it a real runtime or a scripted stand-in. The app
never speaks SQL: it reads through `runtime.store` and `runtime.status()` and decides through
`runtime.decide()`. Core events arrive on the runtime's bus; statement events are buffered and
folded into the feed at most every `FLUSH_INTERVAL` seconds, every other event becomes a typed
message (`backstop_tui.messages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.reactive import var
from textual.screen import Screen
from textual.timer import Timer

from backstop_core import events
from backstop_core.runtime import Runtime, tune_gc
from backstop_core.store import AlertRecord, ApprovalRecord
from backstop_tui import messages as msg
from backstop_tui.screens.alerts import AlertsScreen
from backstop_tui.screens.approval_detail import ApprovalDetailScreen
from backstop_tui.screens.audit import AuditScreen
from backstop_tui.screens.dashboard import DashboardScreen
from backstop_tui.screens.help import HelpScreen
from backstop_tui.screens.recovery import RecoveryScreen
from backstop_tui.screens.snapshots import SnapshotsScreen
from backstop_tui.widgets.alert_list import POLICY_ALERT_KIND, AlertView, merge_alerts
from backstop_tui.widgets.query_feed import FEED_LIMIT, FeedModel
from backstop_tui.widgets.snapshot_health import TableHealth, read_health
from backstop_tui.widgets.status_bar import HeaderState

log = logging.getLogger("backstop.tui")

# Statement events are folded into the feed at most this often; when a batch brings more
# rows than anyone can read (over BUSY_BATCH, i.e. well over 1,000 statements/s), less often.
FLUSH_INTERVAL = 0.1
BUSY_FLUSH_INTERVAL = 0.25
BUSY_BATCH = 150
# The audit screen re-queries at most this often while statements flow.
AUDIT_REFRESH_INTERVAL = 1.0
# Approvals and alerts are re-read this often even without events (decisions and alerts can
# come from other processes sharing the state directory).
RELOAD_EVERY_TICKS = 2

_STATEMENT_EVENTS = frozenset((events.StatementDecided, events.StatementFinished))
_SESSION_EVENTS = frozenset((events.SessionOpened, events.SessionClosed))
_FORWARDED: dict[type[events.Event], Callable[[Any], Any]] = {
    events.GatewayStarted: msg.GatewayStarted,
    events.GatewayStopped: msg.GatewayStopped,
    events.ApprovalPending: msg.ApprovalPending,
    events.ApprovalDecided: msg.ApprovalDecided,
    events.AlertRaised: msg.AlertRaised,
    events.PolicyReloaded: msg.PolicyReloaded,
    events.PolicyInvalid: msg.PolicyInvalid,
}


class BackgroundAgent(Protocol):
    """Something to run beside the gateway once it listens (the demo's simulated agent)."""

    def start(self) -> object: ...
    async def stop(self) -> None: ...


def operator_name() -> str:
    """Who decides: the operating-system user running the dashboard."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


class BackstopApp(App[None]):
    """The Backstop dashboard."""

    CSS_PATH = "app.tcss"
    TITLE = "Backstop"
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {
        "dashboard": DashboardScreen,
        "audit": AuditScreen,
        "alerts": AlertsScreen,
        "snapshots": SnapshotsScreen,
        "recovery": RecoveryScreen,
    }
    DEFAULT_MODE = "dashboard"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("question_mark", "help", "Help", key_display="?"),
        # One footer entry for the five screens: every footer key is a widget the footer
        # rebuilds on each screen switch, and that rebuild is most of a switch's cost.
        Binding(
            "1", "switch_mode('dashboard')", "Dash Audit Alerts Snaps Recovery", key_display="1-5"
        ),
        Binding("2", "switch_mode('audit')", "Audit", show=False),
        Binding("3", "switch_mode('alerts')", "Alerts", show=False),
        Binding("4", "switch_mode('snapshots')", "Snapshots", show=False),
        Binding("5", "switch_mode('recovery')", "Recovery", show=False),
    ]

    # State the screens watch. `var`, not `reactive`: a change on the App must not repaint
    # the whole screen; the widgets that show it refresh their own regions.
    header: var[HeaderState] = var(HeaderState(gateway="starting", status=None))
    pending: var[tuple[ApprovalRecord, ...]] = var(())
    alerts: var[tuple[AlertView, ...]] = var(())
    snapshot_health: var[tuple[TableHealth, ...] | None] = var(None)
    feed_version: var[int] = var(0)
    audit_version: var[int] = var(0)
    tick: var[int] = var(0)

    def __init__(
        self,
        runtime: Runtime,
        *,
        clock: Callable[[], float] = time.time,
        banner: str | None = None,
        demo_agent: BackgroundAgent | None = None,
        feed_limit: int = FEED_LIMIT,
        tune_gc: bool = True,
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.clock = clock
        self.operator = operator_name()
        self.feed = FeedModel(feed_limit)
        self._banner = banner
        self._demo_agent = demo_agent
        self._feed_buffer: deque[events.Event] = deque(maxlen=feed_limit * 10)
        self._feed_signalled = False
        self._busy = False
        self._tune_gc = tune_gc
        self._flush_timer: Timer | None = None
        self._last_flush = 0.0
        self._audit_timer: Timer | None = None
        self._last_audit_bump = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0
        self._unsubscribe: Callable[[], None] | None = None
        self._started = False
        self._stop_task: asyncio.Task[None] | None = None
        self._local_alerts: dict[tuple[str, str], AlertView] = {}
        self._stored_alerts: tuple[AlertRecord, ...] = ()
        self._audit_keys: dict[int, str | None] = {}
        self._announced: set[int] = set()

    # ------------------------------------------------------------------ life cycle

    def on_mount(self) -> None:
        self._unsubscribe = self.runtime.bus.subscribe(self._on_core_event)
        self.header = replace(self.header, banner=self._banner)
        self.run_worker(self._start_runtime(), name="runtime", group="runtime", exit_on_error=False)
        self.set_interval(1.0, self._tick)

    async def _start_runtime(self) -> None:
        try:
            await self.runtime.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the runtime did not start")
            self.post_message(msg.RuntimeFailed(str(exc) or type(exc).__name__))
            return
        self._started = True
        status = await self.runtime.status()
        self.post_message(msg.StatusPolled(status))
        self.post_message(msg.RuntimeStarted(status.listen))

    async def shutdown_runtime(self) -> None:
        """Stop the simulated agent and the runtime, once, however many times it is asked."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop_everything())
        await asyncio.shield(self._stop_task)

    async def _stop_everything(self) -> None:
        self.header = replace(self.header, gateway="stopping")
        if self._demo_agent is not None:
            with contextlib.suppress(Exception):
                await self._demo_agent.stop()
        try:
            await self.runtime.stop()
        except Exception:
            log.exception("the runtime did not stop cleanly")
        if self._unsubscribe is not None:
            with contextlib.suppress(ValueError):
                self._unsubscribe()
            self._unsubscribe = None
        self.header = replace(self.header, gateway="stopped")

    async def action_quit(self) -> None:
        self.notify("Stopping the gateway…", timeout=2)
        await self.shutdown_runtime()
        self.exit()

    async def on_unmount(self) -> None:
        await self.shutdown_runtime()

    # ------------------------------------------------------------------ core events

    def _on_core_event(self, event: events.Event) -> None:
        """Bus subscriber: runs inside the gateway's hot path, so it only queues."""
        kind = type(event)
        if kind in _STATEMENT_EVENTS:
            self._feed_buffer.append(event)
            if not self._feed_signalled:
                self._feed_signalled = True
                self.post_message(msg.StatementsArrived())
            return
        if kind in _SESSION_EVENTS:
            self.post_message(msg.SessionsChanged())
            return
        factory = _FORWARDED.get(kind)
        if factory is not None:
            self.post_message(factory(event))

    @on(msg.StatementsArrived)
    def _statements_arrived(self) -> None:
        if self._flush_timer is None:
            interval = BUSY_FLUSH_INTERVAL if self._busy else FLUSH_INTERVAL
            wait = max(0.01, interval - (time.monotonic() - self._last_flush))
            self._flush_timer = self.set_timer(wait, self._flush_feed, name="feed-flush")

    def _flush_feed(self) -> None:
        self._flush_timer = None
        self._feed_signalled = False
        self._last_flush = time.monotonic()
        buffer = self._feed_buffer
        batch = [buffer.popleft() for _ in range(len(buffer))]
        if not batch:
            return
        added = self.feed.apply(batch)
        self._busy = added > BUSY_BATCH
        for record in self.pending:
            self.feed.link_approval(record.audit_key, record.id, "pending")
        self.feed_version += 1
        if added:
            self._schedule_audit_refresh()

    def _schedule_audit_refresh(self) -> None:
        if self._audit_timer is not None:
            return
        wait = max(0.01, AUDIT_REFRESH_INTERVAL - (time.monotonic() - self._last_audit_bump))
        self._audit_timer = self.set_timer(wait, self._bump_audit, name="audit-refresh")

    def _bump_audit(self) -> None:
        self._audit_timer = None
        self._last_audit_bump = time.monotonic()
        self.audit_version += 1

    def statement_rate(self) -> float:
        now = time.monotonic()
        mark, total = self._rate_mark
        elapsed = now - mark
        if elapsed <= 0:
            return self._rate
        rate = (self.feed.decided_total - total) / elapsed
        self._rate_mark = (now, self.feed.decided_total)
        return rate

    @on(msg.RuntimeStarted)
    def _runtime_started(self, message: msg.RuntimeStarted) -> None:
        self.header = replace(self.header, gateway="running", error=None)
        if self._tune_gc:
            tune_gc()
        self.poll_status()
        self.reload_approvals()
        self.reload_alerts()
        if self._demo_agent is not None:
            if getattr(self._demo_agent, "report", False) is None:
                self._demo_agent.report = self._demo_report  # type: ignore[attr-defined]
            self._demo_agent.start()

    @on(msg.RuntimeFailed)
    def _runtime_failed(self, message: msg.RuntimeFailed) -> None:
        self.header = replace(self.header, gateway="failed", error=message.error)
        self.notify(message.error, title="The gateway did not start", severity="error")

    @on(msg.GatewayStarted)
    def _gateway_started(self, message: msg.GatewayStarted) -> None:
        self.header = replace(self.header, gateway="running")

    @on(msg.GatewayStopped)
    def _gateway_stopped(self, message: msg.GatewayStopped) -> None:
        self.header = replace(self.header, gateway="stopped")

    @on(msg.SessionsChanged)
    def _sessions_changed(self) -> None:
        self.poll_status()

    @on(msg.StatusPolled)
    def _status_polled(self, message: msg.StatusPolled) -> None:
        status = message.status
        self.header = replace(self.header, status=status, rate=self._rate)
        if status.policy_error and status.policy_path:
            self._policy_alert(status.policy_path, status.policy_error, status.updated_at)

    @on(msg.SnapshotHealthLoaded)
    def _health_loaded(self, message: msg.SnapshotHealthLoaded) -> None:
        self.snapshot_health = message.rows

    @on(msg.PolicyReloaded)
    def _policy_reloaded(self, message: msg.PolicyReloaded) -> None:
        event = message.event
        self.header = replace(self.header, policy_reloaded_at=event.at)
        local = self._local_alerts.get((POLICY_ALERT_KIND, event.path))
        if local is not None and local.status != "closed":
            self._local_alerts[(POLICY_ALERT_KIND, event.path)] = replace(local, status="closed")
            self._publish_alerts()
        self.notify(f"Policy {event.version} is in force.", title="Policy reloaded")
        self.poll_status()
        self.set_timer(0.5, self.reload_alerts)

    @on(msg.PolicyInvalid)
    def _policy_invalid(self, message: msg.PolicyInvalid) -> None:
        event = message.event
        self._policy_alert(event.path, event.error, event.at)
        self.notify(
            event.error, title="Policy edit rejected; the last good policy stays", severity="error"
        )
        self.poll_status()
        # The core files the stored alert just after publishing the event.
        self.set_timer(0.5, self.reload_alerts)

    def _policy_alert(self, path: str, error: str, at: float) -> None:
        key = (POLICY_ALERT_KIND, path)
        current = self._local_alerts.get(key)
        if current is not None and current.details == error and current.status != "closed":
            return
        self._local_alerts[key] = AlertView(
            id=None,
            key=path,
            time=datetime.fromtimestamp(at, UTC),
            kind=POLICY_ALERT_KIND,
            severity="critical",
            title="Policy file is invalid; the last good policy stays in force",
            details=error,
            status="open",
            count=(current.count + 1) if current is not None else 1,
        )
        self._publish_alerts()

    @on(msg.ApprovalPending)
    def _approval_pending(self, message: msg.ApprovalPending) -> None:
        event = message.event
        self._announce(event)
        self.reload_approvals()

    def _announce(self, event: events.ApprovalPending) -> None:
        if event.approval_id in self._announced:
            return
        self._announced.add(event.approval_id)
        rows = f"~{event.row_estimate:,} rows" if event.row_estimate is not None else "rows ?"
        tables = ", ".join(event.tables) or "no table"
        self.notify(
            f"{event.agent}: {event.operation} on {tables}, {rows}. Select it and press Enter.",
            title=f"Approval #{event.approval_id} is waiting",
            severity="warning",
            timeout=8,
        )

    @on(msg.ApprovalDecided)
    def _approval_decided(self, message: msg.ApprovalDecided) -> None:
        event = message.event
        key = self._audit_keys.get(event.approval_id)
        if key is not None:
            if self.feed.link_approval(key, event.approval_id, event.status):
                self.feed_version += 1
        else:
            self._link_decided(event.approval_id, event.status)
        self.reload_approvals()

    @work(group="link", exit_on_error=False)
    async def _link_decided(self, approval_id: int, status: str) -> None:
        store = self.runtime.store
        if store is None:
            return
        try:
            record = await store.approval_get(approval_id)
        except Exception as exc:
            log.warning("could not read approval %s: %s", approval_id, exc)
            return
        if record is not None and self.feed.link_approval(record.audit_key, record.id, status):
            self.feed_version += 1

    @on(msg.AlertRaised)
    def _alert_raised(self, message: msg.AlertRaised) -> None:
        event = message.event
        self.notify(event.title, title="Alert", severity="error", timeout=8)
        self.reload_alerts()

    # ------------------------------------------------------------------ polling

    def _tick(self) -> None:
        self.tick += 1
        self._rate = self.statement_rate()
        self.poll_status()
        if self.tick % RELOAD_EVERY_TICKS == 0 and self._started:
            self.reload_approvals()
            self.reload_alerts()

    @work(exclusive=True, group="status", exit_on_error=False)
    async def poll_status(self) -> None:
        try:
            status = await self.runtime.status()
            health = await read_health(self.runtime, status)
        except Exception as exc:
            log.warning("could not read the runtime's status: %s", exc)
            return
        self.post_message(msg.StatusPolled(status))
        self.post_message(msg.SnapshotHealthLoaded(health))

    @work(exclusive=True, group="approvals", exit_on_error=False)
    async def reload_approvals(self) -> None:
        store = self.runtime.store
        if store is None:
            return
        try:
            records = await store.approvals_list(status="pending", limit=500)
        except Exception as exc:
            log.warning("could not list pending approvals: %s", exc)
            return
        self.post_message(msg.ApprovalsLoaded(sorted(records, key=lambda r: r.id)))

    @on(msg.ApprovalsLoaded)
    def _approvals_loaded(self, message: msg.ApprovalsLoaded) -> None:
        records = message.records
        changed = False
        for record in records:
            self._audit_keys[record.id] = record.audit_key
            changed |= self.feed.link_approval(record.audit_key, record.id, "pending")
        if len(self._audit_keys) > 4 * FEED_LIMIT:
            for old in sorted(self._audit_keys)[: len(self._audit_keys) // 2]:
                del self._audit_keys[old]
        if changed:
            self.feed_version += 1
        self.pending = records

    @work(exclusive=True, group="alerts", exit_on_error=False)
    async def reload_alerts(self) -> None:
        store = self.runtime.store
        if store is None:
            return
        try:
            records = await store.alerts_list(status=None, limit=200)
        except Exception as exc:
            log.warning("could not list alerts: %s", exc)
            return
        self.post_message(msg.AlertsLoaded(records))

    @on(msg.AlertsLoaded)
    def _alerts_loaded(self, message: msg.AlertsLoaded) -> None:
        self._stored_alerts = message.records
        self._publish_alerts()

    def _publish_alerts(self) -> None:
        self.alerts = merge_alerts(self._stored_alerts, list(self._local_alerts.values()))

    # ------------------------------------------------------------------ operator actions

    async def decide(
        self, approval_id: int, *, approve: bool, reason: str | None = None
    ) -> ApprovalRecord:
        """Approve or deny in the operator's name; the waiting client hears at once."""
        # Shielded: a write to the state store must not be cut off halfway by a quit.
        record = await asyncio.shield(
            self.runtime.decide(
                approval_id, approve=approve, decided_by=self.operator, reason=reason
            )
        )
        self._audit_keys[record.id] = record.audit_key
        if self.feed.link_approval(record.audit_key, record.id, record.status):
            self.feed_version += 1
        self.reload_approvals()
        return record

    async def acknowledge(self, view: AlertView) -> None:
        """Acknowledge a stored alert through the store, or a local one here."""
        if view.id is None:
            self._local_alerts[(view.kind, view.key)] = replace(
                view, status="acked", acked_by=self.operator
            )
            self._publish_alerts()
            return
        store = self.runtime.store
        if store is None:
            raise RuntimeError("the state store is not open")
        await asyncio.shield(store.alert_ack(view.id, self.operator))
        self.reload_alerts()

    def open_approval(self, approval_id: int) -> None:
        if self.current_mode != "dashboard":
            self.switch_mode("dashboard")
        self.push_screen(ApprovalDetailScreen(approval_id))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            if not self.is_screen_installed("help"):
                self.install_screen(HelpScreen(), "help")  # composed once, reused
            self.push_screen("help")

    def _demo_report(self, text: str, severity: str = "information") -> None:
        log.info("demo-agent: %s", text)
        self.notify(text, title="demo-agent", severity=severity, timeout=6)  # type: ignore[arg-type]

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield SystemCommand(
            "Dashboard", "Gateway status, live queries, approvals", self._mode("dashboard")
        )
        yield SystemCommand("Audit trail", "Every statement, filterable", self._mode("audit"))
        yield SystemCommand("Alerts", "Bypass alerts and policy errors", self._mode("alerts"))
        yield SystemCommand("Snapshots", "Snapshot health per table", self._mode("snapshots"))
        yield SystemCommand("Recovery wizard", "Restore a table", self._mode("recovery"))
        if self.pending:
            oldest = self.pending[0]
            yield SystemCommand(
                f"Review approval #{oldest.id}",
                f"{oldest.agent}: {oldest.operation} on {', '.join(oldest.tables)}",
                lambda: self.open_approval(oldest.id),
            )
        yield SystemCommand("Help", "Keys on every screen", self.action_help)
        yield from super().get_system_commands(screen)

    def _mode(self, mode: str) -> Callable[[], None]:
        def switch() -> None:
            self.switch_mode(mode)

        return switch
