"""Guided recovery end to end: a protected table with a snapshot in a real S3 server, a
disaster run through the gateway, `backstop recover` as an operator runs it, the copy-back
SQL applied, and the table compared row by row with what it held before."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from backstop_core.recovery.copyback import build_copy_back, diff_table
from backstop_core.recovery.restore import (
    RestoreError,
    RestoreProgress,
    restore_to_side_table,
    restored_name,
)
from backstop_core.recovery.validate import validate_restore
from backstop_core.s3local import LocalS3Info
from backstop_core.sidecar.objectstore import ObjectStore, open_object_store
from backstop_core.sidecar.snapshot import Manifest, take_snapshot
from tests.gateway_harness import GatewayThread
from tests.integration.guard_helpers import REPO, audit_where, policy_file

pytestmark = pytest.mark.integration

SCHEMA = r"""
CREATE TYPE status AS ENUM ('new', 'paid', 'shipped');
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    seq int GENERATED ALWAYS AS IDENTITY,
    customer int REFERENCES customers (id),
    placed timestamptz NOT NULL DEFAULT now(),
    amount numeric(12, 2) CHECK (amount >= 0),
    total numeric GENERATED ALWAYS AS (amount * 2) STORED,
    status status NOT NULL DEFAULT 'new',
    note text,
    tags text[],
    data jsonb,
    ratio double precision,
    flag boolean,
    code char(3),
    UNIQUE (customer, placed)
);
CREATE INDEX orders_note ON orders (lower(note)) WHERE note IS NOT NULL;
INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 50) g;
INSERT INTO orders (customer, placed, amount, status, note, tags, data, ratio, flag, code)
SELECT 1 + g % 50, timestamptz '2024-01-01 00:00+00' + g * interval '1 minute', g * 1.25,
       (ARRAY['new', 'paid', 'shipped'])[1 + g % 3]::status,
       CASE g % 9 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN E'tab\there'
            WHEN 3 THEN E'line\nbreak\r\nx' WHEN 4 THEN E'back\\slash \\N' WHEN 5 THEN '\N'
            WHEN 6 THEN 'quote " and '' and , comma' WHEN 7 THEN 'ünïcødé ✓ 🙂'
            ELSE 'note ' || g END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY['t' || g, NULL, E'a\tb'] END,
       CASE WHEN g % 4 = 0 THEN NULL ELSE jsonb_build_object('k', g, 's', E'x\ty\\z') END,
       CASE g % 6 WHEN 0 THEN 'NaN' WHEN 1 THEN '-Infinity' WHEN 2 THEN '-0' ELSE g / 7.0 END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END,
       CASE WHEN g % 2 = 0 THEN 'ab' ELSE NULL END
FROM generate_series(1, 2000) g;
"""


# ------------------------------------------------------------------ helpers


def _cli_module() -> str:
    """`backstop` once it registers the recovery commands; their own entry point until then."""
    from backstop_core import cli

    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and "recover" in action.choices:
            return "backstop_core.cli"
    return "backstop_core.recovery.cli_commands"


@dataclass(frozen=True)
class Setup:
    dsn: str
    database: str
    store_url: str
    store: ObjectStore
    s3: LocalS3Info
    state_dir: Path

    def cli(self, *args: str, stdin: str = "", upstream: str | None = None) -> Any:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("BACKSTOP_", "AWS_"))}
        env = {
            **clean,
            "PYTHONPATH": str(REPO),
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
        }
        return subprocess.run(
            [
                sys.executable,
                "-m",
                _cli_module(),
                *args,
                "--upstream",
                upstream or self.dsn,
                "--store",
                self.store_url,
                "--state-dir",
                str(self.state_dir),
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    def recover_json(self, *args: str) -> tuple[int, dict[str, Any], str]:
        result = self.cli("recover", *args, "--json")
        try:
            data = json.loads(result.stdout)
        except ValueError:
            pytest.fail(f"no JSON on stdout: {result.stdout!r}\n{result.stderr}")
        return result.returncode, data, result.stderr


@pytest.fixture
def setup(fresh_db: str, s3: LocalS3Info, tmp_path: Path) -> Iterator[Setup]:
    prefix = f"recovery-{uuid.uuid4().hex[:8]}"
    url = f"s3://{s3.bucket}/{prefix}?endpoint={s3.endpoint_url}&region={s3.region}"
    store = open_object_store(url, access_key=s3.access_key, secret_key=s3.secret_key)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(SCHEMA)
        database = str(conn.execute("SELECT current_database()").fetchone()[0])  # type: ignore[index]
    yield Setup(fresh_db, database, url, store, s3, tmp_path / "state")


def rows_of(dsn: str, table: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT (t.*)::text FROM {table} t ORDER BY id")]


def run_sql(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def snapshot(setup: Setup, *tables: str, group: str | None = None, **options: Any) -> Manifest:
    async def take() -> Manifest:
        return await take_snapshot(setup.dsn, setup.store, list(tables), group=group, **options)

    import asyncio

    return asyncio.run(take())


def gateway_for(
    setup: Setup, gateway_factory: Callable[..., GatewayThread], tmp_path: Path, **policy: Any
) -> GatewayThread:
    """A gateway whose policy allows everything (so the disaster goes through) and whose
    state directory is the one `backstop recover` reads."""
    return gateway_factory(
        policy=policy_file(tmp_path / "policy", **policy),
        store=setup.store_url,
        state_dir=setup.state_dir,
    )


def through(gateway: GatewayThread, setup: Setup, sql: str) -> None:
    with psycopg.connect(gateway.dsn(database=setup.database), autocommit=True) as conn:
        conn.execute(sql)


# ------------------------------------------------------------------ the four disasters

DISASTERS = {
    "drop": ("DROP TABLE orders", "dropped"),
    "truncate": ("TRUNCATE orders RESTART IDENTITY", "emptied"),
    "delete": ("DELETE FROM orders", "emptied"),
    "update": ("UPDATE orders SET amount = 0, note = 'oops', status = 'new', data = NULL", "rows"),
}


@pytest.mark.parametrize("disaster", list(DISASTERS))
def test_recover_after_disaster_restores_every_row(
    disaster: str,
    setup: Setup,
    gateway_factory: Callable[..., GatewayThread],
    tmp_path: Path,
) -> None:
    statement, case = DISASTERS[disaster]
    manifest = snapshot(setup, "public.orders")
    before = rows_of(setup.dsn, "orders")
    assert len(before) == 2000
    gateway = gateway_for(setup, gateway_factory, tmp_path)
    through(gateway, setup, statement)
    (event,) = audit_where(gateway, lambda r: r.sql == statement)
    assert event.outcome == "forwarded" and event.wal_lsn
    if disaster != "drop":
        assert rows_of(setup.dsn, "orders") != before

    code, data, stderr = setup.recover_json("--table", "orders", "--snapshot", "latest", "--yes")
    assert code == 0, stderr
    assert data["snapshot"]["id"] == manifest.id
    assert data["side_table"] == "public." + restored_name("orders", manifest.id)
    names = [c["name"] for c in data["checks"]]
    assert names == [
        "row count",
        "checksum",
        "columns and types",
        "primary key unique",
        "constraints and indexes",
        "foreign keys (outgoing)",
        "foreign keys (incoming)",
    ]
    assert all(c["passed"] for c in data["checks"]), data["checks"]
    checksum = next(c for c in data["checks"] if c["name"] == "checksum")
    assert checksum["expected"] == checksum["actual"] == manifest.tables[0].checksum
    assert data["passed"] is True and data["error"] is None
    assert data["case"] == case
    if case == "rows":
        assert data["diff"]["changed"] == 2000 and data["diff"]["only_in_restored"] == 0
        assert data["diff"]["examples"]["changed"]
    sql_file = Path(data["sql_file"])
    assert sql_file.parent == setup.state_dir / "recovery"
    assert sql_file.read_text() == data["sql"]
    assert "LOCK TABLE" in data["sql"] and data["sql"].count("COMMIT;") == 1
    # The original table was not touched by the restore.
    if disaster != "drop":
        assert rows_of(setup.dsn, "orders") != before

    run_sql(setup.dsn, data["sql"])
    assert rows_of(setup.dsn, "orders") == before
    with psycopg.connect(setup.dsn, autocommit=True) as conn:
        # Sequences are past every key copied back: new rows get new ids.
        new_id, new_seq = conn.execute(
            "INSERT INTO orders (customer, amount) VALUES (1, 1) RETURNING id, seq"
        ).fetchone()  # type: ignore[misc]
        assert new_id == 2001 and new_seq == 2001
        if disaster == "drop":
            constraints = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT conname, convalidated FROM pg_constraint"
                    " WHERE conrelid = 'orders'::regclass"
                )
            }
            assert set(constraints) == {
                "orders_pkey",
                "orders_customer_placed_key",
                "orders_amount_check",
                "orders_customer_fkey",
            }
            assert all(constraints.values())
            indexes = {
                r[0]
                for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'orders'")
            }
            assert indexes == {"orders_pkey", "orders_customer_placed_key", "orders_note"}
            sequences = {
                r[0]
                for r in conn.execute(
                    "SELECT pg_get_serial_sequence('orders', c) FROM unnest(ARRAY['id', 'seq']) c"
                )
            }
            assert sequences == {"public.orders_id_seq", "public.orders_seq_seq"}
            side = data["side_table"]
            assert conn.execute("SELECT to_regclass(%s)", (side,)).fetchone() == (None,)


def test_rows_added_since_the_snapshot_stay(
    setup: Setup, gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    snapshot(setup, "public.orders")
    before = rows_of(setup.dsn, "orders")
    gateway = gateway_for(setup, gateway_factory, tmp_path)
    through(gateway, setup, "DELETE FROM orders WHERE id % 10 = 0")
    through(gateway, setup, "UPDATE orders SET note = 'changed' WHERE id IN (1, 2, 3)")
    through(gateway, setup, "INSERT INTO orders (customer, amount, note) VALUES (7, 9.5, 'fresh')")
    added = [r for r in rows_of(setup.dsn, "orders") if ",fresh," in r]
    assert len(added) == 1

    code, data, stderr = setup.recover_json("--table", "public.orders", "--yes")
    assert code == 0, stderr
    diff = data["diff"]
    assert (diff["case"], diff["only_in_restored"], diff["changed"], diff["only_in_current"]) == (
        "rows",
        200,
        3,
        1,
    )
    assert diff["unchanged"] == 2000 - 200 - 3
    assert diff["examples"]["missing"][0] == "(id)=(10)"
    assert "note changed -> " in diff["examples"]["changed"][0]
    assert diff["examples"]["added"] == ["(id)=(2001)"]
    run_sql(setup.dsn, data["sql"])
    assert rows_of(setup.dsn, "orders") == [*before, *added]


# ------------------------------------------------------------------ refusals


def test_tampered_part_is_refused_and_named(setup: Setup) -> None:
    import asyncio

    # A part per 32 KB block of COPY output.
    manifest = snapshot(setup, "public.orders", block_bytes=32 * 1024, part_bytes=1)
    (table,) = manifest.tables
    assert len(table.parts) >= 3
    victim = table.parts[1]
    key = table.part_key(victim)

    async def tamper() -> None:
        data = bytearray(await setup.store.get(key))
        data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
        await setup.store.put(key, bytes(data))

    asyncio.run(tamper())
    code, data, stderr = setup.recover_json("--table", "orders", "--yes")
    assert code == 1
    assert victim.name in data["error"] and victim.name in stderr
    assert "sha256" in data["error"]
    assert data["sql"] is None and data["sql_file"] is None
    side = restored_name("orders", manifest.id)
    with psycopg.connect(setup.dsn) as conn:
        assert conn.execute(f"SELECT to_regclass('public.{side}')").fetchone() == (None,)

    # A part that is gone is named too, before anything is created.
    asyncio.run(setup.store.delete(key))
    code, data, stderr = setup.recover_json("--table", "orders", "--yes")
    assert code == 1 and f"{victim.name} is missing" in data["error"]
    assert data["sql"] is None


def test_checksum_mismatch_fails_validation_and_keeps_the_side_table(setup: Setup) -> None:
    import asyncio

    manifest = snapshot(setup, "public.orders")
    (table,) = manifest.tables
    forged = manifest.to_json().replace(table.checksum.encode(), b"0123456789abcdef")

    async def forge() -> None:
        await setup.store.put(table.manifest_key, forged)

    asyncio.run(forge())
    run_sql(setup.dsn, "DELETE FROM orders WHERE id < 100")
    code, data, stderr = setup.recover_json("--table", "orders", "--yes")
    assert code == 1, stderr
    failed = [c for c in data["checks"] if not c["passed"]]
    assert [c["name"] for c in failed] == ["checksum"]
    assert failed[0]["expected"] == "0123456789abcdef"
    assert failed[0]["actual"] == table.checksum
    assert data["sql"] is None and data["sql_file"] is None
    assert "validation failed" in stderr
    assert not (setup.state_dir / "recovery").exists()
    side = restored_name("orders", manifest.id)
    with psycopg.connect(setup.dsn) as conn:  # kept for a look
        assert conn.execute(f"SELECT count(*) FROM public.{side}").fetchone() == (2000,)


def test_orphaning_foreign_key_fails_validation(setup: Setup) -> None:
    snapshot(setup, "public.orders")
    # Customer 7 and its orders go (the orders first: the foreign key forbids the reverse).
    run_sql(setup.dsn, "DELETE FROM orders WHERE customer = 7; DELETE FROM customers WHERE id = 7")
    code, data, stderr = setup.recover_json("--table", "orders", "--yes")
    assert code == 1, stderr
    (failed,) = [c for c in data["checks"] if not c["passed"]]
    assert failed["name"] == "foreign keys (outgoing)"
    assert failed["actual"] == 40  # 2000 orders over 50 customers
    assert "orders_customer_fkey" in failed["detail"] and "(7)" in failed["detail"]
    assert data["sql"] is None


def test_usage_errors_exit_2(setup: Setup) -> None:
    result = setup.cli("recover", "--table", "orders", "--yes", "--json")
    assert result.returncode == 2  # no snapshot yet
    assert "no snapshot of public.orders" in json.loads(result.stdout)["error"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTOP_")}
    result = subprocess.run(
        [sys.executable, "-m", _cli_module(), "recover", "--table", "orders", "--upstream",
         setup.dsn, "--state-dir", str(setup.state_dir)],
        capture_output=True, text=True, timeout=60, env={**clean, "PYTHONPATH": str(REPO)},
        cwd=setup.state_dir.parent,
    )  # fmt: skip
    assert result.returncode == 2 and "no snapshot store" in result.stderr
    snapshot(setup, "public.orders")
    result = setup.cli("recover", "--table", "orders", "--snapshot", "before-event", "999")
    assert result.returncode == 2 and "no audit event #999" in result.stderr
    result = setup.cli("recover", "--table", "orders", "--snapshot", "20990101T000000.000000Z-0")
    assert result.returncode == 2 and "has no snapshot" in result.stderr


# ------------------------------------------------------------------ groups, events, guided


def test_group_restore_uses_one_snapshot_and_is_consistent(
    setup: Setup, gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    groups = [{"name": "shop", "tables": ["public.customers", "public.orders"]}]
    manifest = snapshot(setup, "public.customers", "public.orders", group="shop")
    older = snapshot(setup, "public.orders")  # a newer snapshot of one member alone
    assert older.id > manifest.id
    customers, orders = rows_of(setup.dsn, "customers"), rows_of(setup.dsn, "orders")
    gateway = gateway_for(setup, gateway_factory, tmp_path, groups=groups)
    through(gateway, setup, "DROP TABLE orders, customers")

    policy = str(tmp_path / "policy" / "policy.json")
    result = setup.cli("recover", "--group", "shop", "--yes", "--json", "--policy", policy)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["group"] == "shop" and data["snapshot"]["id"] == manifest.id
    assert set(data["side_tables"]) == {"public.customers", "public.orders"}
    assert data["side_tables"] == {
        t: t + "__restored_" + manifest.id.replace(".", "").replace("-", "_").lower()
        for t in ("public.customers", "public.orders")
    }
    assert all(c["passed"] for c in data["checks"])
    (fk,) = [
        c
        for c in data["checks"]
        if c["table"] == "public.orders" and c["name"] == "foreign keys (outgoing)"
    ]
    assert "(restored)" in fk["detail"]
    # Customers are put in place before the orders that reference them.
    sql = data["sql"]
    assert sql.index('RENAME TO "customers"') < sql.index('RENAME TO "orders"')
    run_sql(setup.dsn, sql)
    assert rows_of(setup.dsn, "customers") == customers
    assert rows_of(setup.dsn, "orders") == orders
    with psycopg.connect(setup.dsn) as conn:
        assert conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'orders_customer_fkey'"
        ).fetchone() == (True,)


def test_before_event_picks_the_last_snapshot_before_the_statement(
    setup: Setup, gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    snapshot(setup, "public.orders")
    run_sql(setup.dsn, "UPDATE orders SET note = 'second' WHERE id = 1")
    second = snapshot(setup, "public.orders")
    expected = rows_of(setup.dsn, "orders")
    gateway = gateway_for(setup, gateway_factory, tmp_path)
    through(gateway, setup, "TRUNCATE orders")
    (event,) = audit_where(gateway, lambda r: r.operation == "TRUNCATE")
    after = snapshot(setup, "public.orders")  # of the emptied table: "latest" would be wrong
    assert after.tables[0].rows == 0

    code, data, stderr = setup.recover_json(
        "--table", "orders", "--snapshot", "before-event", str(event.id), "--yes"
    )
    assert code == 0, stderr
    assert data["snapshot"]["id"] == second.id
    run_sql(setup.dsn, data["sql"])
    assert rows_of(setup.dsn, "orders") == expected


def test_guided_recovery_with_answers_on_stdin_and_apply(
    setup: Setup, gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    manifest = snapshot(setup, "public.orders")
    before = rows_of(setup.dsn, "orders")
    gateway = gateway_for(setup, gateway_factory, tmp_path)
    through(gateway, setup, "DELETE FROM orders")
    (event,) = audit_where(gateway, lambda r: r.operation == "DELETE")
    # Table by name, the last snapshot before the DELETE, then yes to apply.
    result = setup.cli("recover", "--apply", stdin=f"public.orders\nbefore {event.id}\ny\n")
    assert result.returncode == 0, result.stderr
    assert f"#{event.id}" in result.stderr and "DELETE FROM orders" in result.stderr
    assert manifest.id in result.stderr
    assert "INSERT INTO" in result.stdout  # the SQL, on stdout
    assert "recorded in the audit trail" in result.stderr
    assert rows_of(setup.dsn, "orders") == before
    (recovered,) = audit_where(gateway, lambda r: r.operation == "RECOVER")
    assert (recovered.decision, recovered.rule, recovered.outcome) == (
        "operator",
        "recover",
        "forwarded",
    )
    assert recovered.snapshot_id == manifest.id and recovered.tables == ("public.orders",)


# ------------------------------------------------------------------ the API directly


async def test_restore_api_progress_and_parallel_load(setup: Setup) -> None:
    run_sql(
        setup.dsn,
        "INSERT INTO orders (customer, placed, amount, note) SELECT 1 + g % 50,"
        " timestamptz '2030-01-01 00:00+00' + g * interval '1 s', g, repeat('x', g % 300)"
        " FROM generate_series(1, 30000) g",
    )
    manifest = await take_snapshot(
        setup.dsn, setup.store, ["public.orders"], block_bytes=256 * 1024, part_bytes=1
    )
    (table,) = manifest.tables
    assert len(table.parts) > 1
    seen: list[RestoreProgress] = []
    conn = await asyncpg.connect(setup.dsn)
    try:
        restored = await restore_to_side_table(
            conn, setup.store, manifest, "orders", on_progress=seen.append, dsn=setup.dsn, workers=3
        )
        assert restored.workers == 3 and restored.rows == table.rows == 32000
        assert seen[-1].phase == "done" and seen[-1].rows_done == 32000
        assert seen[-1].parts_done == seen[-1].parts_total == len(table.parts)
        assert {"loading", "indexing"} <= {p.phase for p in seen}
        report = await validate_restore(conn, restored)
        assert report.passed, report.checks
        with pytest.raises(RestoreError, match="already exists"):
            await restore_to_side_table(conn, setup.store, manifest, "orders")
        again = await restore_to_side_table(
            conn, setup.store, manifest, "orders", replace_existing=True, target_name="o2"
        )
        assert again.workers == 1 and again.restored_table == "public.o2"
        diff = await diff_table(conn, again)
        assert diff.case == "unchanged"
        copy_back = await build_copy_back(conn, [again], {again.table: diff})
        assert not copy_back.has_work and "Nothing to copy back" in copy_back.sql
    finally:
        await conn.close()


async def test_table_without_primary_key_compares_whole_rows(setup: Setup) -> None:
    run_sql(
        setup.dsn,
        "CREATE TABLE events (at timestamptz, kind text, payload json);"
        " INSERT INTO events SELECT timestamptz '2024-01-01 00:00+00' + (g % 50) * interval '1 h',"
        " 'k' || g % 7, json_build_object('g', g % 50) FROM generate_series(1, 500) g",
    )
    manifest = await take_snapshot(setup.dsn, setup.store, ["public.events"])

    def events() -> list[str]:
        with psycopg.connect(setup.dsn) as conn:
            return sorted(r[0] for r in conn.execute("SELECT (e.*)::text FROM events e"))

    before = events()
    assert len(set(before)) < len(before)  # duplicates: counted, not collapsed
    # One of each duplicated pair goes, plus some single rows; one row arrives.
    run_sql(
        setup.dsn,
        "DELETE FROM events WHERE ctid IN (SELECT min(ctid) FROM events GROUP BY at, kind"
        " HAVING count(*) > 1 LIMIT 20);"
        " DELETE FROM events WHERE kind = 'k3' AND at < '2024-01-01 05:00+00';"
        " INSERT INTO events VALUES (now(), 'fresh', '{}')",
    )
    gone = len(before) - (len(events()) - 1)
    conn = await asyncpg.connect(setup.dsn)
    try:
        restored = await restore_to_side_table(conn, setup.store, manifest, "events")
        report = await validate_restore(conn, restored)
        assert report.passed, report.checks
        pk = next(c for c in report.checks if c.name == "primary key unique")
        assert "no primary key" in pk.detail
        diff = await diff_table(conn, restored)
        assert (diff.case, diff.key, diff.only_in_restored, diff.only_in_current) == (
            "rows",
            (),
            gone,
            1,
        )
        copy_back = await build_copy_back(conn, [restored], {restored.table: diff})
        await conn.execute(copy_back.sql)
    finally:
        await conn.close()
    after = events()
    fresh = [r for r in after if ",fresh," in r]
    assert len(fresh) == 1
    after.remove(fresh[0])
    assert after == before


async def test_recovery_service_as_the_tui_drives_it(setup: Setup) -> None:
    from backstop_core.recovery.wizard import Recovery

    manifest = await take_snapshot(setup.dsn, setup.store, ["public.orders"])
    run_sql(setup.dsn, "DELETE FROM orders WHERE id <= 10")
    recovery = Recovery(setup.dsn, setup.store, state_dir=setup.state_dir)
    try:
        seen: list[RestoreProgress] = []
        restored = await recovery.restore("public.orders", manifest.id, progress=seen.append)
        assert restored.restored_table.startswith("public.orders__restored_")
        assert restored.seconds > 0 and seen[-1].rows_done == 2000
        checks = [c async for c in recovery.validate(restored)]
        assert len(checks) == 7 and all(c.passed for c in checks)
        diff = await recovery.diff(restored)
        assert (diff.only_in_restored, diff.changed, diff.unchanged) == (10, 0, 1990)
        assert diff.sample[0] == "missing from the live table: (id)=(1)"
        sql = await recovery.copy_back_sql(restored)
        assert "INSERT INTO" in sql
        saved = list((setup.state_dir / "recovery").iterdir())
        assert [p.read_text() for p in saved] == [sql]
    finally:
        await recovery.close()
    run_sql(setup.dsn, sql)
    with psycopg.connect(setup.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (2000,)


async def test_copy_back_guard_and_audit_of_a_failed_apply(setup: Setup) -> None:
    from backstop_core.recovery.copyback import apply_copy_back
    from backstop_core.store import Store

    manifest = await take_snapshot(setup.dsn, setup.store, ["public.orders"])
    run_sql(setup.dsn, "TRUNCATE orders")
    state = await Store.open(setup.state_dir)
    conn = await asyncpg.connect(setup.dsn)
    try:
        restored = await restore_to_side_table(conn, setup.store, manifest, "orders")
        diff = await diff_table(conn, restored)
        assert diff.case == "emptied"
        copy_back = await build_copy_back(conn, [restored], {restored.table: diff})
        # A row arrives after the SQL was written: the guard stops the whole transaction.
        run_sql(setup.dsn, "INSERT INTO orders (customer, amount) VALUES (1, 1)")
        with pytest.raises(asyncpg.RaiseError, match="no longer empty"):
            await apply_copy_back(conn, copy_back, state=state, operator="alice")
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1
        (event,) = await state.audit_query(text="Backstop copy-back")
        assert (event.operation, event.decision, event.rule, event.agent) == (
            "RECOVER",
            "operator",
            "recover",
            "alice",
        )
        assert event.outcome == "error" and "no longer empty" in (event.error or "")
        assert event.snapshot_id == manifest.id and event.wal_lsn
    finally:
        await conn.close()
        await state.close()


def test_long_table_names_are_shortened_deterministically() -> None:
    name = restored_name("a" * 60, "20250101T000000.000000Z-abcdef01")
    assert len(name.encode()) <= 63
    assert name == restored_name("a" * 60, "20250101T000000.000000Z-abcdef01")
    assert name.endswith("__restored_20250101t000000000000z_abcdef01")
    assert name != restored_name("a" * 59 + "b", "20250101T000000.000000Z-abcdef01")
