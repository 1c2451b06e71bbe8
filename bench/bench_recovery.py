"""Recovery of a dropped table: Backstop's restore + validation against pg_restore, same run.

    python bench/bench_recovery.py [--rows N] [--dsn URL] [--store URL] [--repeat K]
                                   [--workers W]

Starts a throwaway PostgreSQL unless --dsn is given, and keeps snapshots in a temporary
directory unless --store is given. It fills a protected table of N rows of mixed types
(default 1,000,000) with a primary key, snapshots it with Backstop and dumps it with
`pg_dump -Fc`, drops it, then measures, alternating, K times each (best kept):

  pg_restore   `pg_restore -d` of the dump: the table, its rows, its primary key (the usual
               way to bring one table back)
  restore      Backstop's restore_to_side_table as `backstop recover` runs it: every
               part's sha256 checked, Parquet streamed as COPY text over W connections,
               primary key built after the load while another connection counts the rows
               and recomputes the checksum in PostgreSQL (by the snapshot's method,
               printed with the snapshot)
  validation   the checks reported: row count and checksum (from that scan), columns
               and types, primary key, constraints, foreign keys
  recover      the whole `backstop recover` flow in-process: restore, validation, diff
               against the live table (dropped here), copy-back SQL

The ratio compares restore + validation with pg_restore (target >= 1.0x), and the whole
recovery must take under 60 s. A CHECKPOINT precedes every measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TABLE = "bench_recovery"

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


def tool(bin_dir: Path | None, name: str) -> str:
    candidates = [bin_dir / name] if bin_dir is not None else []
    try:
        from backstop_core.localpg import find_postgres_bin_dir

        candidates.append(find_postgres_bin_dir("auto") / name)
    except Exception:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found: install the PostgreSQL client tools")
    return found


async def execute(dsn: str, sql: str) -> object:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return (
            await conn.fetchval(sql)
            if sql.lstrip().upper().startswith("SELECT")
            else (await conn.execute(sql))
        )
    finally:
        await conn.close()


async def prepare(dsn: str, store_url: str, rows: int) -> object:
    from backstop_core.sidecar.objectstore import open_object_store
    from backstop_core.sidecar.snapshot import take_snapshot

    await execute(dsn, FILL_SQL.format(table=TABLE, rows=rows))
    await execute(dsn, f"VACUUM (ANALYZE, FREEZE) {TABLE}")
    size = await execute(dsn, f"SELECT pg_table_size('{TABLE}')")
    print(f"  {int(size) / 2**20:,.0f} MB table")  # type: ignore[call-overload]
    started = time.perf_counter()
    manifest = await take_snapshot(dsn, open_object_store(store_url), [f"public.{TABLE}"])
    print(
        f"  snapshot {manifest.id}: {manifest.size_bytes / 2**20:,.0f} MB of Parquet in"
        f" {sum(len(t.parts) for t in manifest.tables)} parts,"
        f" {time.perf_counter() - started:.1f} s, checksum {manifest.checksum_method}"
    )
    return manifest


def dump_table(dsn: str, pg_dump: str, dump: Path) -> None:
    subprocess.run(
        [pg_dump, "-Fc", "-t", TABLE, "-f", str(dump), "--dbname", dsn],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    print(f"  pg_dump -Fc: {dump.stat().st_size / 2**20:,.0f} MB")


def time_pg_restore(dsn: str, pg_restore: str, dump: Path, rows: int) -> float:
    asyncio.run(execute(dsn, f"DROP TABLE IF EXISTS {TABLE}"))
    asyncio.run(execute(dsn, "CHECKPOINT"))
    started = time.perf_counter()
    subprocess.run(
        [pg_restore, "--no-owner", "-d", dsn, str(dump)], check=True, stdin=subprocess.DEVNULL
    )
    elapsed = time.perf_counter() - started
    assert asyncio.run(execute(dsn, f"SELECT count(*) FROM {TABLE}")) == rows
    asyncio.run(execute(dsn, f"DROP TABLE {TABLE}"))
    return elapsed


async def time_backstop(
    dsn: str, store_url: str, manifest: object, workers: int | None
) -> tuple[float, float, float | None, int]:
    """Restore + validation as `backstop recover` runs them; also the seconds of the count
    and checksum scan that ran beside the index build (None if it did not)."""
    import asyncpg

    from backstop_core.recovery.restore import restore_to_side_table
    from backstop_core.recovery.validate import validate_restore
    from backstop_core.sidecar.objectstore import open_object_store

    await execute(dsn, "CHECKPOINT")
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        restored = await restore_to_side_table(
            conn,
            open_object_store(store_url),
            manifest,  # type: ignore[arg-type]
            f"public.{TABLE}",
            dsn=dsn,
            workers=workers,
            replace_existing=True,
            check_data=True,
        )
        middle = time.perf_counter()
        report = await validate_restore(conn, restored)
        finished = time.perf_counter()
        if not report.passed:
            sys.exit(f"validation failed: {[c for c in report.checks if not c.passed]}")
        await conn.execute(f"DROP TABLE {restored.qualified}")
        scan = restored.data_check.seconds if restored.data_check is not None else None
        return middle - started, finished - middle, scan, restored.workers
    finally:
        await conn.close()


async def time_recover(dsn: str, store_url: str, manifest: object, state_dir: Path) -> float:
    from backstop_core.recovery.wizard import Recovery
    from backstop_core.sidecar.objectstore import open_object_store

    await execute(dsn, "CHECKPOINT")
    recovery = Recovery(dsn, open_object_store(store_url), state_dir=state_dir)
    try:
        started = time.perf_counter()
        outcome = await recovery.recover(
            table=f"public.{TABLE}",
            snapshot_id=manifest.id,  # type: ignore[attr-defined]
            replace_existing=True,
        )
        elapsed = time.perf_counter() - started
        assert outcome.passed and outcome.copy_back is not None
        assert outcome.diffs[f"public.{TABLE}"].case == "dropped"
        for result in outcome.results:
            await execute(dsn, f"DROP TABLE {result.qualified}")
        return elapsed
    finally:
        await recovery.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a throwaway server)")
    parser.add_argument("--store", help="snapshot store URL (default: a temporary directory)")
    parser.add_argument("--repeat", type=int, default=3, help="keep the best of K runs")
    parser.add_argument("--workers", type=int, help="loading connections (default: per CPU)")
    args = parser.parse_args()

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
    pg_dump, pg_restore = tool(bin_dir, "pg_dump"), tool(bin_dir, "pg_restore")
    dump = work / "table.dump"
    try:
        print(f"{args.rows:,} rows in {TABLE}, {os.cpu_count()} CPUs:", flush=True)
        manifest = asyncio.run(prepare(dsn, store, args.rows))
        dump_table(dsn, pg_dump, dump)
        asyncio.run(execute(dsn, f"DROP TABLE {TABLE}"))
        dumps, restores, checks = [], [], []
        workers = 1
        for attempt in range(args.repeat):
            dumps.append(time_pg_restore(dsn, pg_restore, dump, args.rows))
            restore_s, validate_s, scan_s, workers = asyncio.run(
                time_backstop(dsn, store, manifest, args.workers)
            )
            restores.append(restore_s)
            checks.append(validate_s)
            beside = (
                f" (count + checksum scan {scan_s:.2f} s of it, beside the index build)"
                if scan_s is not None
                else ""
            )
            print(
                f"  run {attempt + 1}: pg_restore {dumps[-1]:.2f} s, restore {restore_s:.2f} s"
                f"{beside} + validation {validate_s:.2f} s",
                flush=True,
            )
        recover_s = asyncio.run(time_recover(dsn, store, manifest, work / "state"))
        pg_s = min(dumps)
        best = min(range(len(restores)), key=lambda i: restores[i] + checks[i])
        restore_s, validate_s = restores[best], checks[best]
        both = restore_s + validate_s
        rows = args.rows

        def line(name: str, seconds: float) -> str:
            rate = f"{rows / seconds:>12,.0f} rows/s" if seconds >= 0.05 else ""
            return f"  {name:<28} {seconds:7.2f} s  {rate}".rstrip()

        print(f"\n{rows:,} rows, best of {args.repeat} ({workers} loading connections):")
        print(line("pg_restore", pg_s))
        print(line("Backstop restore", restore_s))
        print(line("Backstop validation", validate_s))
        print(line("Backstop restore + validation", both))
        print(line("backstop recover (whole flow)", recover_s))
        print(
            f"\nrestore + validation vs pg_restore: {pg_s / both:.2f}x  (target >= 1.0x)"
            f"\nrestore alone vs pg_restore:        {pg_s / restore_s:.2f}x"
            f"\nwhole recovery: {recover_s:.1f} s (target < 60 s)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if local is not None:
            local.stop()


if __name__ == "__main__":
    main()
