"""Gateways in front of the session's PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PgServer
from tests.gateway_harness import GatewayThread, settings_for


@pytest.fixture(scope="session")
def relay(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """The gateway with a pass-through hook: the wire protocol alone."""
    gateway = GatewayThread(
        settings_for(pg.dsn(), tmp_path_factory.mktemp("relay-state"), upstream_sslmode="disable"),
        pass_through=True,
    ).start()
    yield gateway
    gateway.stop()


@pytest.fixture
def gateway_factory(pg: PgServer, tmp_path: Path) -> Iterator[Callable[..., GatewayThread]]:
    """Start gateways with their own settings; all are stopped after the test."""
    started: list[GatewayThread] = []

    def start(
        *, pass_through: bool = False, upstream: str | None = None, **settings: Any
    ) -> GatewayThread:
        settings.setdefault("state_dir", tmp_path / f"state-{len(started)}")
        settings.setdefault("upstream_sslmode", "disable")
        gateway = GatewayThread(
            settings_for(upstream or pg.dsn(), **settings), pass_through=pass_through
        ).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
