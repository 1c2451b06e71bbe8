"""Restore drills (recorded in the state store with their time) and the PITR helpers, against
the real PostgreSQL and a real S3 server."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from backstop_core.localpg import LocalPostgres, LocalPostgresError, find_postgres_bin_dir
from backstop_core.policy import parse_policy
from backstop_core.recovery.drill import DRILL_SCHEMA, last_drills, run_drills
from backstop_core.recovery.pitr import check_pitr
from backstop_core.store import Store
from tests.gateway_harness import GatewayThread
from tests.integration.guard_helpers import audit_where
from tests.integration.test_recovery import (
    Setup,
    gateway_for,
    setup,  # noqa: F401 - the fixture
    snapshot,
    through,
)

pytestmark = pytest.mark.integration


def drills_on_record(state_dir: Path) -> list[dict[str, object]]:
    async def read() -> list[dict[str, object]]:
        store = await Store.open(state_dir)
        try:
            found = await store.drills_list()
        finally:
            await store.close()
        return [{"table": d.table, "status": d.status, **json.loads(d.details_json)} for d in found]

    return asyncio.run(read())


def scratch_tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s",
                (DRILL_SCHEMA,),
            )
        ]


# ------------------------------------------------------------------ drills


def test_drill_restores_validates_records_its_time_and_cleans_up(setup: Setup) -> None:  # noqa: F811
    manifest = snapshot(setup, "public.orders")
    result = setup.cli("drill", "public.orders", "--json")
    assert result.returncode == 0, result.stderr
    (drill,) = json.loads(result.stdout)
    assert drill["table"] == "public.orders" and drill["passed"] is True
    assert drill["snapshot_id"] == manifest.id and drill["rows"] == 2000
    assert drill["seconds"] > 0 and 0 < drill["restore_seconds"] <= drill["seconds"]
    assert [c["name"] for c in drill["checks"]] == [
        "row count",
        "checksum",
        "columns and types",
        "primary key unique",
        "constraints and indexes",
    ]
    assert all(c["passed"] for c in drill["checks"])
    # Recorded in the state store, with rows, seconds and checks.
    (record,) = drills_on_record(setup.state_dir)
    assert record["status"] == "passed" and record["rows"] == 2000
    assert record["seconds"] == drill["seconds"] and len(record["checks"]) == 5  # type: ignore[arg-type]
    # The scratch copy is gone, and the live table was never touched.
    assert scratch_tables(setup.dsn) == []
    with psycopg.connect(setup.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (2000,)
    # The last drill per table, as `backstop snapshots` and the TUI show it.
    shown = setup.cli("drill", "--last", "--json")
    assert shown.returncode == 0, shown.stderr
    (last,) = json.loads(shown.stdout)
    assert last["table"] == "public.orders" and last["status"] == "passed"
    assert last["seconds"] == drill["seconds"] and last["rows"] == 2000
    assert "2,000 rows restored and checked in" in last["detail"]
    text = setup.cli("drill", "--last")
    assert text.stdout.startswith("public.orders: passed ")


def test_drill_all_protected_tables_and_a_failing_one(setup: Setup) -> None:  # noqa: F811
    snapshot(setup, "public.orders")
    customers = snapshot(setup, "public.customers")
    # A forged checksum: the restore works, validation does not.
    (table,) = customers.tables
    forged = customers.to_json().replace(table.checksum.encode(), b"00000000000000ff")
    asyncio.run(setup.store.put(table.manifest_key, forged))
    policy = parse_policy(
        json.dumps(
            {
                "defaults": {
                    "LOW": "allow",
                    "MEDIUM": "allow",
                    "HIGH": "allow",
                    "CRITICAL": "allow",
                },
                "protected": [{"table": "public.*"}],
            }
        )
    )

    async def drill() -> list[object]:
        state = await Store.open(setup.state_dir)
        try:
            results = await run_drills(setup.dsn, setup.store, state, policy=policy)
            latest = await last_drills(state)
        finally:
            await state.close()
        return [results, latest]

    results, latest = asyncio.run(drill())
    by_table = {r.table: r for r in results}  # type: ignore[attr-defined]
    assert set(by_table) == {"public.customers", "public.orders"}
    assert by_table["public.orders"].passed
    failing = by_table["public.customers"]
    assert not failing.passed
    assert [c.name for c in failing.checks if not c.passed] == ["checksum"]
    assert latest["public.customers"].status == "failed"  # type: ignore[index]
    assert latest["public.customers"].failed_checks == ("checksum",)  # type: ignore[index]
    assert scratch_tables(setup.dsn) == []

    # Through the CLI: a failed drill exits 1; a table without any snapshot is a failed drill.
    result = setup.cli("drill", "public.customers")
    assert result.returncode == 1 and "checksum" in result.stdout
    result = setup.cli("drill", "public.nothing_here", "--json")
    assert result.returncode == 1
    (missing,) = json.loads(result.stdout)
    assert missing["passed"] is False and "no complete snapshot" in missing["error"]


# ------------------------------------------------------------------ PITR


def test_pitr_check_on_a_server_without_archiving(setup: Setup) -> None:  # noqa: F811
    result = setup.cli("pitr", "check")
    assert result.returncode == 1, result.stderr
    assert "NOT possible" in result.stdout
    assert "archive_mode is off" in result.stdout and "fix: set archive_mode = on" in result.stdout
    data = json.loads(setup.cli("pitr", "check", "--json").stdout)
    assert data["possible"] is False
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["wal_level"]["ok"] is True and checks["archive_mode"]["ok"] is False
    assert checks["archiver"]["ok"] is False


def test_pitr_check_on_a_server_that_archives() -> None:
    try:
        find_postgres_bin_dir("auto")
    except LocalPostgresError as exc:
        pytest.skip(str(exc))
    # Outside the test's own directory, which the server's user may not be able to reach.
    archive = Path(tempfile.mkdtemp(prefix="backstop-archive-"))
    archive.chmod(0o777)
    server = LocalPostgres(
        settings={
            "archive_mode": "on",
            "archive_command": f"cp %p {archive}/%f",
            "wal_level": "replica",
        }
    )
    with server:
        dsn = server.info.dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
            conn.execute("SELECT pg_switch_wal()")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                row = conn.execute("SELECT archived_count FROM pg_stat_archiver").fetchone()
                if row and row[0]:
                    break
                time.sleep(0.2)

        async def check() -> object:
            import asyncpg

            conn = await asyncpg.connect(dsn)
            try:
                return await check_pitr(conn)
            finally:
                await conn.close()

        report = asyncio.run(check())
    shutil.rmtree(archive, ignore_errors=True)
    assert report.possible, report.lines()  # type: ignore[attr-defined]
    assert "segments archived" in "\n".join(report.lines())  # type: ignore[attr-defined]


def test_pitr_target_prints_the_lsn_of_a_destructive_statement(
    setup: Setup,  # noqa: F811
    gateway_factory: Callable[..., GatewayThread],
    tmp_path: Path,
) -> None:
    gateway = gateway_for(setup, gateway_factory, tmp_path)
    through(gateway, setup, "SELECT count(*) FROM orders")
    through(gateway, setup, "DROP TABLE orders")
    (drop,) = audit_where(gateway, lambda r: r.operation == "DROP_TABLE")
    (select,) = audit_where(gateway, lambda r: r.operation == "SELECT" and "orders" in r.sql)
    assert drop.wal_lsn

    result = setup.cli("pitr", "target", "--event", str(drop.id))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"recovery_target_lsn = '{drop.wal_lsn}'" in lines
    assert "recovery_target_inclusive = false" in lines
    assert lines[0] == f"# Backstop: replay up to just before audit event #{drop.id}"
    assert any("DROP TABLE orders" in line for line in lines if line.startswith("#"))
    data = json.loads(setup.cli("pitr", "target", "--event", str(drop.id), "--json").stdout)
    assert data["settings"] == {
        "recovery_target_lsn": drop.wal_lsn,
        "recovery_target_inclusive": False,
    }

    result = setup.cli("pitr", "target", "--event", str(select.id))
    assert result.returncode == 1
    assert "has no WAL position" in result.stderr and "recovery_target_time" in result.stderr
    result = setup.cli("pitr", "target", "--event", "99999")
    assert result.returncode == 1 and "no audit event #99999" in result.stderr
    result = setup.cli("pitr", "target")
    assert result.returncode == 2 and "--event" in result.stderr
