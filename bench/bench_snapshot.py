"""Snapshot throughput and memory, against pg_dump and raw COPY measured in the same run.

    python bench/bench_snapshot.py [--rows N] [--dsn URL] [--store URL] [--repeat K]

Starts a throwaway PostgreSQL unless --dsn is given, and snapshots into a temporary
directory unless --store is given. It fills a table of N rows of mixed types (default
1,000,000), then measures rows per second of:

  pg_dump     `pg_dump -Fc -t <table>` into a file (the usual way to back up one table)
  COPY binary `COPY <table> TO STDOUT (FORMAT binary)` into nothing, via asyncpg: the most
              any client can read, a ceiling rather than a competitor
  snapshot    Backstop's take_snapshot: one consistent transaction, Parquet parts with
              sha256, the checksum computed in PostgreSQL (on a second connection, in
              parallel with the COPY; its method is printed), the manifest, into the store

The snapshot runs in a child process, so its peak resident memory (ru_maxrss) is its own;
the child's resident memory right after its imports is shown beside it. With --repeat K
each measurement runs K times and the best is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TABLE = "bench_snapshot"

FILL_SQL = """
DROP TABLE IF EXISTS {table};
CREATE TABLE {table} (
    id bigint PRIMARY KEY,
    n integer,
    amount numeric(12, 2),
    ratio double precision,
    name text,
    note varchar(100),
    flag boolean,
    created timestamptz,
    day date,
    tags text[],
    payload jsonb,
    ref uuid
);
INSERT INTO {table}
SELECT g, g % 1000, (g * 1.37)::numeric(12, 2), g / 7.0, 'name ' || g,
       md5(g::text) || md5((g + 1)::text), g % 2 = 0,
       timestamptz '2024-01-01 00:00+00' - g * interval '1 second',
       date '2020-01-01' + g % 1000, ARRAY['a' || g, 'b'],
       jsonb_build_object('k', g, 's', 'x' || g), md5(g::text)::uuid
FROM generate_series(1, {rows}) g;
"""


def find_pg_dump(bin_dir: Path | None) -> str:
    candidates = []
    if bin_dir is not None:
        candidates.append(bin_dir / "pg_dump")
    try:
        from backstop_core.localpg import find_postgres_bin_dir

        candidates.append(find_postgres_bin_dir("auto") / "pg_dump")
    except Exception:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("pg_dump")
    if found is None:
        sys.exit("pg_dump not found: install the PostgreSQL client tools")
    return found


async def fill(dsn: str, rows: int) -> tuple[int, int]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        existing = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", TABLE)
        if not existing or await conn.fetchval(f"SELECT count(*) FROM {TABLE}") != rows:
            await conn.execute(FILL_SQL.format(table=TABLE, rows=rows))
            await conn.execute(f"VACUUM (ANALYZE, FREEZE) {TABLE}")
        size = await conn.fetchval("SELECT pg_table_size($1)", TABLE)
        return rows, int(size)
    finally:
        await conn.close()


def time_pg_dump(pg_dump: str, dsn: str, out_dir: Path) -> float:
    target = out_dir / "table.dump"
    started = time.perf_counter()
    subprocess.run(
        [pg_dump, "-Fc", "-t", TABLE, "-f", str(target), "--dbname", dsn],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


async def time_copy_binary(dsn: str) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    received = 0

    async def sink(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    try:
        started = time.perf_counter()
        await conn.copy_from_table(TABLE, output=sink, format="binary")
        return time.perf_counter() - started
    finally:
        await conn.close()


def time_snapshot(dsn: str, store: str) -> dict[str, Any]:
    """Run the snapshot in a child process; returns its timings and memory."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", "--dsn", dsn, "--store", store],
        check=True,
        capture_output=True,
        text=True,
    )
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def child(dsn: str, store_url: str) -> None:
    import pyarrow.csv
    import pyarrow.parquet  # noqa: F401  (imported before the baseline is read)

    from backstop_core.sidecar.objectstore import open_object_store
    from backstop_core.sidecar.snapshot import take_snapshot

    baseline = rss_mb()
    store = open_object_store(store_url)
    started = time.perf_counter()
    manifest = await take_snapshot(dsn, store, [TABLE])
    elapsed = time.perf_counter() - started
    for table in manifest.tables:
        await store.delete_prefix(table.directory)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "rows": manifest.rows,
                "parquet_bytes": manifest.size_bytes,
                "parts": sum(len(t.parts) for t in manifest.tables),
                "peak_rss_mb": peak,
                "baseline_rss_mb": baseline,
                "checksum_method": manifest.checksum_method,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a throwaway server)")
    parser.add_argument("--store", help="snapshot store URL (default: a temporary directory)")
    parser.add_argument("--repeat", type=int, default=1, help="keep the best of K runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            import uvloop  # the event loop backstop-tui runs on when it is installed
        except ImportError:
            asyncio.run(child(args.dsn, args.store))
        else:
            uvloop.run(child(args.dsn, args.store))
        return

    local = None
    bin_dir: Path | None = None
    dsn = args.dsn
    if dsn is None:
        from backstop_core.localpg import LocalPostgres

        local = LocalPostgres()
        info = local.start()
        dsn, bin_dir = info.dsn(), info.bin_dir
    work = Path(tempfile.mkdtemp(prefix="backstop-bench-"))
    store = args.store or f"file://{work / 'store'}"
    try:
        print(f"filling {TABLE} with {args.rows:,} rows ...", flush=True)
        started = time.perf_counter()
        rows, size = asyncio.run(fill(dsn, args.rows))
        print(f"  {size / 2**20:,.0f} MB table in {time.perf_counter() - started:.1f} s")
        pg_dump = find_pg_dump(bin_dir)
        copy_s = min(asyncio.run(time_copy_binary(dsn)) for _ in range(args.repeat))
        dump_s = min(time_pg_dump(pg_dump, dsn, work) for _ in range(args.repeat))
        snaps = [time_snapshot(dsn, store) for _ in range(args.repeat)]
        snap = min(snaps, key=lambda r: r["seconds"])
        peak = max(r["peak_rss_mb"] for r in snaps)
        assert snap["rows"] == rows, snap

        def line(name: str, seconds: float) -> str:
            return f"  {name:<12} {seconds:7.2f} s  {rows / seconds:>12,.0f} rows/s"

        print(f"\n{rows:,} rows, best of {args.repeat}:")
        print(line("pg_dump -Fc", dump_s))
        print(line("COPY binary", copy_s))
        print(line("snapshot", snap["seconds"]))
        print(
            f"\nsnapshot / pg_dump:      {dump_s / snap['seconds']:.2f}x  (target >= 2x)"
            f"\nsnapshot / COPY binary:  {copy_s / snap['seconds']:.2f}x of the ceiling"
            f"\nsnapshot checksum method: {snap['checksum_method']}"
            f"\nsnapshot: {snap['parts']:.0f} parts, {snap['parquet_bytes'] / 2**20:,.0f} MB of"
            f" Parquet; peak RSS {peak:,.0f} MB (after imports {snap['baseline_rss_mb']:,.0f} MB)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if local is not None:
            local.stop()


if __name__ == "__main__":
    main()
