"""A low-priority process that moves the audit journal into SQLite.

The gateway writes each audit record to the journal before forwarding the statement; turning
those lines into SQLite rows is bulk work that would otherwise compete with the gateway for
the CPU (and the GIL) at thousands of statements per second. Run at idle priority, it
catches up whenever the machine has a moment. It exits when its parent (the gateway) goes away.

    python -m backstop_core.ingest STATE_DIR [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from backstop_core.store import Store

log = logging.getLogger("backstop.ingest")


# While statements arrive faster than this, the ingest waits (the journal holds them),
# unless the backlog has grown past BACKLOG_LIMIT (some 300,000 statements): moving
# records into SQLite costs CPU the statements need on a busy machine. Reading the audit
# (`backstop audit`, the dashboard) ingests first, so nothing is hidden meanwhile.
BUSY_BYTES_PER_SECOND = 256 * 1024  # about a thousand statements a second
BACKLOG_LIMIT = 256 * 1024 * 1024


class _Pace:
    """Whether the journal is growing fast right now (a busy gateway)."""

    def __init__(self) -> None:
        self._size = -1
        self._at = 0.0
        self._fast = False

    def busy(self, size: int, backlog: int) -> bool:
        now = time.monotonic()
        grew = size - self._size if self._size >= 0 else 0
        elapsed = now - self._at
        self._size, self._at = size, now
        # A journal that shrank was rotated by the gateway (only ever after an ingest): how
        # fast it grew meanwhile is unknown, so the last reading stands.
        if grew >= 0 and elapsed > 0:
            self._fast = grew / elapsed > BUSY_BYTES_PER_SECOND
        return self._fast and backlog < BACKLOG_LIMIT


async def ingest_forever(state_dir: Path, interval: float, parent: int) -> None:
    store = await Store.open(state_dir)
    pace = _Pace()
    try:
        while os.getppid() == parent:
            try:
                stats = await store.journal_stats()
                backlog = stats.journal_bytes - stats.ingested_bytes
                if not pace.busy(stats.journal_bytes, backlog):
                    await store.ingest()
            except Exception:
                log.exception("audit ingest failed; retrying")
            await asyncio.sleep(interval)
    finally:
        await store.close()


def _yield_cpu(nice: int) -> None:
    """Run only on CPU time nobody else wants (SCHED_IDLE, where the platform has it), so
    that under load the ingest waits instead of slowing the statements down; niced too,
    for platforms without it."""
    with contextlib.suppress(OSError):
        os.nice(nice)
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, policy, os.sched_param(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backstop-ingest")
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--nice", type=int, default=10)
    args = parser.parse_args(argv)
    _yield_cpu(args.nice)
    parent = os.getppid()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(ingest_forever(args.state_dir, args.interval, parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
