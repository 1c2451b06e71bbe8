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


def test_a_slowly_growing_or_rotated_journal_is_ingested(clock: list[float]) -> None:
    pace = _Pace()
    pace.busy(10_000, 0)
    clock[0] += 1.0
    assert not pace.busy(10_000 + BUSY_BYTES_PER_SECOND // 10, 100)
    clock[0] += 1.0
    assert not pace.busy(500, 0), "a rotated journal shrank: not busy"


def test_a_large_backlog_is_ingested_even_while_busy(clock: list[float]) -> None:
    pace = _Pace()
    pace.busy(0, 0)
    clock[0] += 1.0
    assert not pace.busy(10 * BUSY_BYTES_PER_SECOND, BACKLOG_LIMIT)
