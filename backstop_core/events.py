"""The events the core publishes, and a small in-process bus.

The UI and the JSON log subscribe; nothing in the core waits on a subscriber. Events are
frozen dataclasses so they can cross into the UI's thread of thought unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger("backstop.events")


@dataclass(frozen=True, slots=True)
class Event:
    at: float = field(default_factory=time.time, kw_only=True)

    @property
    def kind(self) -> str:
        kind = _KINDS.get(type(self))
        if kind is None:
            name = type(self).__name__
            kind = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
            _KINDS[type(self)] = kind
        return kind

    def as_dict(self) -> dict[str, Any]:
        names = _FIELD_NAMES.get(type(self))
        if names is None:
            names = _FIELD_NAMES[type(self)] = tuple(f.name for f in dataclasses.fields(self))
        data: dict[str, Any] = {"event": self.kind}
        for name in names:
            data[name] = getattr(self, name)
        return data


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_KINDS: dict[type, str] = {}


@dataclass(frozen=True, slots=True)
class GatewayStarted(Event):
    listen: str
    upstream: str


@dataclass(frozen=True, slots=True)
class GatewayStopped(Event):
    listen: str


@dataclass(frozen=True, slots=True)
class SessionOpened(Event):
    session_id: str
    client: str
    user: str
    database: str
    agent: str


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    session_id: str
    agent: str


@dataclass(frozen=True, slots=True)
class StatementDecided(Event):
    session_id: str
    agent: str
    sql: str
    operation: str
    tables: tuple[str, ...]
    risk: str
    action: str
    rule: str
    reason: str
    row_estimate: int | None = None
    audit_key: str | None = None
    decision_ms: float | None = None  # from arrival to the decision: latency Backstop added


@dataclass(frozen=True, slots=True)
class StatementFinished(Event):
    session_id: str
    audit_key: str | None
    outcome: str
    duration_ms: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyReloaded(Event):
    path: str
    version: str


@dataclass(frozen=True, slots=True)
class PolicyInvalid(Event):
    path: str
    error: str


@dataclass(frozen=True, slots=True)
class UpstreamUnavailable(Event):
    session_id: str
    error: str


@dataclass(frozen=True, slots=True)
class AlertRaised(Event):
    alert_id: int | None
    kind_: str
    title: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ApprovalPending(Event):
    approval_id: int
    agent: str
    sql: str
    operation: str
    tables: tuple[str, ...]
    row_estimate: int | None
    expires_in_seconds: float


@dataclass(frozen=True, slots=True)
class ApprovalDecided(Event):
    approval_id: int
    status: str
    decided_by: str | None
    reason: str | None


Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out. A failing subscriber is logged and never breaks the publisher.

    Routine events are the ones the gateway would publish for every statement that goes
    well: a statement allowed (`StatementDecided` with action allow) and a statement that
    completed as forwarded (`StatementFinished`). A subscriber that only cares about the
    rest (refusals, holds, errors, everything else) subscribes with `routine=False`; while
    no subscriber wants routine events, publishers skip building them (`routine`).
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._routine: list[Subscriber] = []
        # Asked twice for every statement: plain attributes, kept by (un)subscribe.
        self.active = False  # anyone subscribed
        self.routine = False  # anyone wants routine events (see above)

    def subscribe(self, subscriber: Subscriber, *, routine: bool = True) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        if routine:
            self._routine.append(subscriber)
        self._count()

        def unsubscribe() -> None:
            self._subscribers.remove(subscriber)
            if routine:
                self._routine.remove(subscriber)
            self._count()

        return unsubscribe

    def _count(self) -> None:
        self.active = bool(self._subscribers)
        self.routine = bool(self._routine)

    def publish(self, event: Event) -> None:
        for subscriber in tuple(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber failed on %s", event.kind)


def json_line(event: Event) -> str:
    try:
        return orjson.dumps(event.as_dict(), default=str).decode()
    except TypeError:
        return json.dumps(event.as_dict(), default=str, separators=(",", ":"))
