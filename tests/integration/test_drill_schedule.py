"""Restore drills on the policy's schedule: a running Backstop (gateway, snapshot scheduler
and drill loop, against the real PostgreSQL and a snapshot store in a local directory)
follows `drills.interval_seconds` of its policy file as it is edited, without a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backstop_core.events import Event
from backstop_core.recovery.drill import DrillFinished
from backstop_core.sidecar.objectstore import open_object_store
from backstop_core.sidecar.snapshot import take_snapshot
from tests.gateway_harness import GatewayThread
from tests.integration.guard_helpers import policy_file

pytestmark = pytest.mark.integration

ORDERS = """
CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric(12, 2), note text);
INSERT INTO orders SELECT g, g * 1.25, 'note ' || g FROM generate_series(1, 2000) g;
"""

PROTECTED = [{"table": "public.orders", "interval_seconds": 3600}]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_runtime_runs_drills_on_the_policys_interval(
    fresh_db: str,
    gateway_factory: Callable[..., GatewayThread],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BACKSTOP_DRILL_INTERVAL", raising=False)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(ORDERS)
    store = f"file://{tmp_path / 'store'}"
    asyncio.run(take_snapshot(fresh_db, open_object_store(store), ["public.orders"]))
    gateway = gateway_factory(
        upstream=fresh_db,
        store=store,
        policy=policy_file(
            tmp_path / "policy", protected=PROTECTED, drills={"interval_seconds": 0}
        ),
    )
    runtime = gateway.runtime
    assert runtime is not None
    finished: list[tuple[float, DrillFinished]] = []

    def stamp(event: Event) -> None:
        if isinstance(event, DrillFinished):
            finished.append((time.monotonic(), event))

    gateway.call_soon(lambda: runtime.bus.subscribe(stamp))

    def set_interval(seconds: int) -> None:
        """Edit the policy file as an operator would, until the running Backstop has it."""

        def applied() -> Any:
            return gateway.call_soon(lambda: runtime.policy.drills.interval_seconds) == seconds

        deadline = time.monotonic() + 20
        while not applied():
            assert time.monotonic() < deadline, "the policy was not reloaded"
            policy_file(
                tmp_path / "policy", protected=PROTECTED, drills={"interval_seconds": seconds}
            )
            time.sleep(0.5)

    # Off: the loop runs, but no drill starts.
    time.sleep(6)
    assert finished == []

    # Turned on: rounds start, one interval apart.
    set_interval(3)
    wait_for(lambda: len(finished) >= 2, 60, "two rounds of drills")
    (first_at, first), (second_at, second) = finished[:2]
    assert first.table == second.table == "public.orders"
    assert first.passed and second.passed and first.rows == 2000
    assert second_at - first_at >= 1.0

    # Off again: the round under way ends, and no other one starts.
    set_interval(0)
    time.sleep(6)
    count = len(finished)
    time.sleep(6)
    assert len(finished) == count
