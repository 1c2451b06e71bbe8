"""The audit ingest process's pacing: it waits while the gateway is busy, within a bound."""

from __future__ import annotations

import pytest

from backstop_core import ingest
from backstop_core.ingest import BACKLOG_LIMIT, BUSY_BYTES_PER_SECOND, _Pace


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(ingest.time, "monotonic", lambda: now[0])
    return now


def test_a_fast_growing_journal_is_left_for_later(clock: list[float]) -> None:
    pace = _Pace()
    assert not pace.busy(1000, 0), "nothing is known at first: ingest"
    clock[0] += 1.0
    assert pace.busy(1000 + 2 * BUSY_BYTES_PER_SECOND, 2 * BUSY_BYTES_PER_SECOND)


def test_a_slowly_growing_journal_is_ingested(clock: list[float]) -> None:
    pace = _Pace()
    pace.busy(10_000, 0)
    clock[0] += 1.0
    assert not pace.busy(10_000 + BUSY_BYTES_PER_SECOND // 10, 100)
    clock[0] += 1.0
    assert not pace.busy(500, 0), "rotated after a quiet spell: still quiet"


def test_a_journal_rotated_while_busy_stays_busy(clock: list[float]) -> None:
    """The gateway rotates the journal once it is ingested: the shrink says nothing about
    how fast statements arrive, and must not let the ingest compete with them."""
    pace = _Pace()
    pace.busy(0, 0)
    clock[0] += 1.0
    assert not pace.busy(10 * BUSY_BYTES_PER_SECOND, BACKLOG_LIMIT), "backlog full: ingest"
    clock[0] += 1.0
    assert pace.busy(1000, 0), "rotated after that ingest, still under load: wait"
    clock[0] += 1.0
    assert pace.busy(1000 + 2 * BUSY_BYTES_PER_SECOND, 2 * BUSY_BYTES_PER_SECOND)
    clock[0] += 1.0
    assert not pace.busy(1000 + 2 * BUSY_BYTES_PER_SECOND + 10, 10), "load gone: ingest"


def test_a_large_backlog_is_ingested_even_while_busy(clock: list[float]) -> None:
    pace = _Pace()
    pace.busy(0, 0)
    clock[0] += 1.0
    assert not pace.busy(10 * BUSY_BYTES_PER_SECOND, BACKLOG_LIMIT)
