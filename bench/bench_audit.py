"""Audit hot path: microseconds per audit_begin + audit_finish pair (appending to the journal,
copying into the gateway's spool, and as the gateway's lanes journal: into the spool, as a
short record naming the session's audit template), and ingest throughput of each.

Baseline in the same run: json.dumps of the same record plus one os.write of it, which is the
least any durable per-statement journal can cost.

    python bench/bench_audit.py [N]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from backstop_core.store import AuditStart, Store

CLASSIFICATION_JSON = json.dumps(
    [
        {
            "operation": "UPDATE",
            "category": "WRITE",
            "tables": ["public.orders"],
            "has_where": True,
            "unbounded": False,
            "table_destructive": False,
            "risk": "MEDIUM",
            "reasons": ["UPDATE with a WHERE clause"],
        }
    ],
    separators=(",", ":"),
)
START = AuditStart(
    session_id="s-1f3a",
    agent="cursor",
    client="127.0.0.1:53122",
    sql="UPDATE public.orders SET status = 'shipped' WHERE id = 4242",
    operation="UPDATE",
    risk="MEDIUM",
    tables=("public.orders",),
    classification_json=CLASSIFICATION_JSON,
    decision="allow",
    rule="defaults.MEDIUM",
    reason="medium risk statements are allowed",
    row_estimate=1,
)


def _median_us(samples: list[int], per: int) -> float:
    return statistics.median(samples) / per / 1000


def bench_baseline(directory: Path, n: int, per: int) -> float:
    fd = os.open(directory / "baseline.journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    record = [
        "b", "k-1", time.time(), START.session_id, START.agent, START.client, START.sql,
        START.operation, START.risk, START.tables, START.decision, START.rule, START.reason,
    ]  # fmt: skip
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n // per):
        t0 = clock()
        for _ in range(per):
            os.write(fd, (json.dumps(record) + "\n").encode())
        samples.append(clock() - t0)
    os.close(fd)
    return _median_us(samples, per)


async def bench_store(directory: Path, n: int, per: int, mode: str) -> tuple[float, float]:
    """`mode`: "journal" (a write per statement), "spool" (a copy into the spool), "whole"
    (the spool, each whole record built from an audit template, as the gateway did before
    "c" records) or "templated" (the spool, records naming an audit template)."""
    store = await Store.open(directory / mode)
    if mode != "journal":
        store.use_spool()  # as the gateway does; a full spool moves inside the timed loop
    begin, finish = store.audit_begin, store.audit_finish
    template = store.audit_template(START)
    begin_sql, forwarded = store.journal.begin_sql, store.journal.forwarded
    begin_whole = store.journal.begin
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n // per):
        t0 = clock()
        if mode == "templated":
            for _ in range(per):
                key = begin_sql(template, START.sql)
                forwarded(key, 420_000)
        elif mode == "whole":
            for _ in range(per):
                key = begin_whole(template.with_sql(START.sql))
                forwarded(key, 420_000)
        else:
            for _ in range(per):
                key = begin(START)
                finish(key, "forwarded", 0.42)
        samples.append(clock() - t0)
    t0 = time.perf_counter()
    ingested = await store.ingest()
    ingest_seconds = time.perf_counter() - t0
    await store.close()
    return _median_us(samples, per), ingested / ingest_seconds


MODES = ("journal", "spool", "whole", "templated")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    per = 100  # statements per timed sample: perf_counter_ns resolution, GC noise
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        baseline = bench_baseline(directory, n, per)
        results = {mode: asyncio.run(bench_store(directory, n, per, mode)) for mode in MODES}
    pair = results["journal"][0]
    print(f"audit_begin+audit_finish: {pair:.2f} µs per statement (median, n={n})")
    print(f"  with the gateway's spool: {results['spool'][0]:.2f} µs")
    print(f"  spooled, whole records from a template: {results['whole'][0]:.2f} µs")
    print(f"  spooled, naming a template (the gateway's lanes): {results['templated'][0]:.2f} µs")
    print(f"baseline json.dumps+os.write: {baseline:.2f} µs; ratio {pair / baseline:.2f}")
    print("ingest into SQLite, records/s (begin+finish pairs: 2 per statement):")
    for mode, (_, rate) in results.items():
        print(f"  {mode:10} {rate:,.0f}")


if __name__ == "__main__":
    main()
