"""The Textual messages the app posts when the core reports something.

The core publishes frozen events on its bus; `BackstopApp` turns each into one of these and
posts it, so widgets react through `@on` handlers and never touch the bus. Messages that can
arrive in floods (statements, status, session churn) say so with `can_replace`, and Textual
folds a queued run of them into one.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.message import Message

from backstop_core import events
from backstop_core.runtime import RuntimeStatus
from backstop_core.store import AlertRecord, ApprovalRecord
from backstop_tui.widgets.snapshot_health import TableHealth


class StatementsArrived(Message):
    """Statement events are waiting in the app's feed buffer; one message stands for many."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatementsArrived)


class StatusPolled(Message):
    """A fresh `RuntimeStatus`; only the newest matters."""

    def __init__(self, status: RuntimeStatus) -> None:
        super().__init__()
        self.status = status

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatusPolled)


class SessionsChanged(Message):
    """A client connected or went away: the session count in the header is stale."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SessionsChanged)


class RuntimeStarted(Message):
    """`runtime.start()` returned: the gateway listens."""

    def __init__(self, listen: str) -> None:
        super().__init__()
        self.listen = listen


class RuntimeFailed(Message):
    """`runtime.start()` raised; `error` says why, for the operator."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class GatewayStarted(Message):
    def __init__(self, event: events.GatewayStarted) -> None:
        super().__init__()
        self.event = event


class GatewayStopped(Message):
    def __init__(self, event: events.GatewayStopped) -> None:
        super().__init__()
        self.event = event


class ApprovalPending(Message):
    """A statement is held for an operator."""

    def __init__(self, event: events.ApprovalPending) -> None:
        super().__init__()
        self.event = event


class ApprovalDecided(Message):
    """A held statement was approved, denied, expired or cancelled."""

    def __init__(self, event: events.ApprovalDecided) -> None:
        super().__init__()
        self.event = event


class AlertRaised(Message):
    def __init__(self, event: events.AlertRaised) -> None:
        super().__init__()
        self.event = event


class PolicyReloaded(Message):
    def __init__(self, event: events.PolicyReloaded) -> None:
        super().__init__()
        self.event = event


class PolicyInvalid(Message):
    def __init__(self, event: events.PolicyInvalid) -> None:
        super().__init__()
        self.event = event


class ApprovalsLoaded(Message):
    """The pending approvals as the store has them now, oldest first."""

    def __init__(self, records: Sequence[ApprovalRecord]) -> None:
        super().__init__()
        self.records = tuple(records)

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ApprovalsLoaded)


class AlertsLoaded(Message):
    """Every alert the store holds (newest first, bounded)."""

    def __init__(self, records: Sequence[AlertRecord]) -> None:
        super().__init__()
        self.records = tuple(records)

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, AlertsLoaded)


class SnapshotHealthLoaded(Message):
    """Per-table snapshot health, or None when the runtime offers none."""

    def __init__(self, rows: Sequence[TableHealth] | None) -> None:
        super().__init__()
        self.rows = None if rows is None else tuple(rows)

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotHealthLoaded)
