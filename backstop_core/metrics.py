"""Prometheus metrics (`--metrics HOST:PORT`), fed by core events and the runtime's status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from backstop_core.events import AlertRaised, Event, EventBus, PolicyInvalid, StatementDecided

log = logging.getLogger("backstop.metrics")


class Metrics:
    def __init__(self, bus: EventBus) -> None:
        self.registry = CollectorRegistry()
        self.statements = Counter(
            "backstop_statements",
            "Statements decided by the gateway",
            ["action", "risk"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "backstop_decision_seconds",
            "Latency the gateway added before forwarding or refusing a statement",
            ["action"],
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300),
            registry=self.registry,
        )
        self.pending = Gauge(
            "backstop_pending_approvals",
            "Approvals waiting for an operator",
            registry=self.registry,
        )
        self.open_alerts = Gauge("backstop_open_alerts", "Open alerts", registry=self.registry)
        self.alerts = Counter("backstop_alerts", "Alerts raised", ["kind"], registry=self.registry)
        self.sessions = Gauge("backstop_sessions", "Client sessions open", registry=self.registry)
        self.upstream_up = Gauge(
            "backstop_upstream_up", "1 when PostgreSQL accepts connections", registry=self.registry
        )
        self.snapshot_age = Gauge(
            "backstop_snapshot_age_seconds",
            "Age of the newest snapshot per protected table",
            ["table"],
            registry=self.registry,
        )
        bus.subscribe(self.on_event)

    def on_event(self, event: Event) -> None:
        if isinstance(event, StatementDecided):
            self.statements.labels(event.action, event.risk).inc()
            if event.decision_ms is not None:
                self.decision_seconds.labels(event.action).observe(event.decision_ms / 1000)
        elif isinstance(event, AlertRaised):
            self.alerts.labels(event.kind_).inc()
        elif isinstance(event, PolicyInvalid):
            self.alerts.labels("policy").inc()

    def serve(self, address: str) -> Any:
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.registry
        )
        return server

    async def refresh(self, status: Callable[[], Awaitable[Any]], interval: float = 2.0) -> None:
        """Keeps the gauges that come from the runtime's status current."""
        while True:
            with contextlib.suppress(Exception):
                current = await status()
                self.pending.set(current.pending_approvals)
                self.open_alerts.set(current.open_alerts)
                self.sessions.set(current.sessions)
                self.upstream_up.set(1 if current.upstream_reachable else 0)
                for table in current.snapshot_health:
                    age = table.get("age_seconds")
                    if age is not None:
                        self.snapshot_age.labels(str(table.get("table"))).set(float(age))
            await asyncio.sleep(interval)
