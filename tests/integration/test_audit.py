"""The audit trail: a row for every statement, with who, what, the decision and how it
ended; readable from the store and from `backstop audit`; and durable when the gateway is
killed outright."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors

from backstop_core.store import AuditRecord, Store
from tests.conftest import AGENT_ROLE, PgServer
from tests.gateway_harness import GatewayThread
from tests.integration.guard_helpers import (
    REPO,
    audit_where,
    backstop_cli,
    policy_file,
    psql,
    role_reading_backslashes,
    unique,
    upstream,
)

pytestmark = pytest.mark.integration

Factory = Callable[..., GatewayThread]

RULES = [
    {
        "name": "no-ledger-deletes",
        "match": {"operation": "DELETE", "tables": "ledger_*"},
        "action": "block",
        "reason": "Ledger entries are permanent.",
    }
]
AGENTS = [{"match": {"user": AGENT_ROLE.name, "application_name": "intern*"}, "agent": "intern"}]


@pytest.fixture
def ledger(pg: PgServer) -> Iterator[str]:
    name = unique("ledger")
    upstream(
        pg,
        f"CREATE TABLE {name} (id int PRIMARY KEY, secret text);"
        f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b');"
        f"GRANT ALL ON {name} TO {AGENT_ROLE.name}",
    )
    yield name
    upstream(pg, f"DROP TABLE IF EXISTS {name}")


def by_sql(rows: list[AuditRecord]) -> dict[str, AuditRecord]:
    return {r.sql: r for r in rows}


def test_every_statement_from_every_client_is_audited(
    pg: PgServer, gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    gateway = gateway_factory(policy=policy_file(tmp_path, RULES, agents=AGENTS))
    intern = gateway.dsn(user=AGENT_ROLE.name, application_name="intern-3")
    with psycopg.connect(intern, autocommit=True) as conn:
        conn.execute(f"SELECT count(*) FROM {ledger} WHERE pg_sleep(0.2) IS NOT NULL")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(f"DELETE FROM {ledger} WHERE id = 1")
        with pytest.raises(errors.DivisionByZero):
            conn.execute(f"SELECT 1/0 FROM {ledger}")

    async def from_asyncpg() -> None:
        conn = await asyncpg.connect(gateway.dsn())  # no application_name: the user alone
        try:
            await conn.execute(f"UPDATE {ledger} SET secret = 'z' WHERE id = 2")
        finally:
            await conn.close()

    asyncio.run(from_asyncpg())
    result = psql(pg, gateway.dsn(), "-c", f"DELETE FROM {ledger}")  # application_name psql
    assert "no-ledger-deletes" in result.stderr

    rows = by_sql(audit_where(gateway, lambda r: True, table=ledger))
    read = rows[f"SELECT count(*) FROM {ledger} WHERE pg_sleep(0.2) IS NOT NULL"]
    assert (read.agent, read.operation, read.risk, read.decision, read.outcome) == (
        "intern",
        "SELECT",
        "MEDIUM",  # pg_sleep holds the session
        "allow",
        "forwarded",
    )
    assert read.tables == (f"public.{ledger}",)
    assert read.duration_ms is not None and read.duration_ms >= 200
    assert read.rule.startswith("default:")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", read.client), read.client

    refused = rows[f"DELETE FROM {ledger} WHERE id = 1"]
    assert (refused.agent, refused.operation, refused.decision, refused.rule) == (
        "intern",
        "DELETE",
        "block",
        "no-ledger-deletes",
    )
    assert refused.outcome == "blocked"
    assert refused.reason.startswith("backstop: DELETE on public.")
    assert refused.session_id == read.session_id

    failed = rows[f"SELECT 1/0 FROM {ledger}"]
    assert (failed.decision, failed.outcome) == ("allow", "error")
    assert failed.error is not None and "division by zero" in failed.error

    update = rows[f"UPDATE {ledger} SET secret = 'z' WHERE id = 2"]
    assert (update.agent, update.operation, update.outcome) == ("postgres", "UPDATE", "forwarded")
    assert update.row_estimate == 1
    assert update.session_id != read.session_id

    unbounded = rows[f"DELETE FROM {ledger}"]
    assert (unbounded.agent, unbounded.risk, unbounded.outcome) == (
        "postgres/psql",
        "CRITICAL",
        "blocked",
    )
    assert unbounded.classifications[0]["unbounded"] is True
    assert unbounded.classifications[0]["table_destructive"] is True


def test_cli_reads_the_running_gateways_audit(
    gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    state = tmp_path / "state"
    gateway = gateway_factory(policy=policy_file(tmp_path, RULES), state_dir=state)
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT secret FROM {ledger} WHERE id = 1")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(f"DELETE FROM {ledger} WHERE id = 2")
    expected = audit_where(gateway, lambda r: True, table=ledger)
    assert len(expected) == 2
    result = backstop_cli("audit", "--json", "--state-dir", str(state), "--table", ledger)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert [(p["key"], p["sql"], p["decision"], p["outcome"]) for p in printed] == [
        (r.key, r.sql, r.decision, r.outcome) for r in expected
    ]
    for entry in printed:
        for field in ("agent", "rule", "risk", "operation", "tables", "duration_ms", "time"):
            assert field in entry
    text = backstop_cli("audit", "--state-dir", str(state), "--table", ledger)
    lines = text.stdout.splitlines()
    assert len(lines) == 2  # oldest first
    assert " SELECT LOW allow -> forwarded " in lines[0]
    assert " DELETE " in lines[1] and "block -> blocked" in lines[1]


def test_redacted_audit_keeps_literals_out(
    gateway_factory: Factory, tmp_path: Path, ledger: str
) -> None:
    policy = policy_file(tmp_path, RULES, audit={"redact_literals": True})
    gateway = gateway_factory(policy=policy)
    with (
        psycopg.connect(gateway.dsn(), autocommit=True) as conn,
        psycopg.ClientCursor(conn) as cur,
    ):
        cur.execute(f"UPDATE {ledger} SET secret = 'hunter2' WHERE id = 1")
        with pytest.raises(errors.InsufficientPrivilege):
            cur.execute(f"DELETE FROM {ledger} WHERE secret = 'swordfish'")
    rows = audit_where(gateway, lambda r: True, table=ledger)
    assert len(rows) == 2
    for row in rows:
        assert "hunter2" not in row.sql and "swordfish" not in row.sql, row.sql
        assert "$1" in row.sql


@pytest.fixture
def lax_role(pg: PgServer) -> Iterator[str]:
    with role_reading_backslashes(pg) as role:
        yield role


def test_redaction_covers_lexer_refusals(
    gateway_factory: Factory, tmp_path: Path, lax_role: str
) -> None:
    gateway = gateway_factory(policy=policy_file(tmp_path, audit={"redact_literals": True}))
    with (
        psycopg.connect(gateway.dsn(user=lax_role), autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege, match="standard_conforming"),
    ):
        conn.execute("SELECT 'hunter2' AS password")
    rows = audit_where(gateway, lambda r: r.rule == "lexer-safety")
    assert rows and all("hunter2" not in r.sql for r in rows)


def test_redaction_covers_error_text(gateway_factory: Factory, tmp_path: Path, ledger: str) -> None:
    gateway = gateway_factory(policy=policy_file(tmp_path, audit={"redact_literals": True}))
    with (
        psycopg.connect(gateway.dsn(), autocommit=True) as conn,
        psycopg.ClientCursor(conn) as cur,
        pytest.raises(errors.InvalidTextRepresentation),
    ):
        cur.execute(f"SELECT * FROM {ledger} WHERE id = 'hunter2'")
    rows = audit_where(gateway, lambda r: r.outcome == "error", table=ledger)
    assert rows and all("hunter2" not in (r.error or "") for r in rows)


# ------------------------------------------------------------------ a gateway killed outright

WORKERS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """`backstop-tui --no-ui` as a separate process, as it runs in production."""

    def __init__(self, pg: PgServer, state: Path, policy: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backstop_tui.main",
                "--no-ui",
                "--upstream",
                pg.dsn(),
                "--upstream-sslmode",
                "disable",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--state-dir",
                str(state),
                "--policy",
                str(policy),
            ],
            stdout=self.log,
            stderr=self.log,
            cwd=state.parent,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"the gateway did not start; see {log}") from None
                time.sleep(0.1)

    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?sslmode=disable"

    def kill(self, signum: int) -> int:
        self.proc.send_signal(signum)
        code = self.proc.wait(20)
        self.log.close()
        return code


async def audited(state: Path, table: str) -> list[AuditRecord]:
    store = await Store.open(state)  # ingests whatever the dead gateway journalled
    try:
        return await store.audit_query(limit=10**6, text=f"INSERT INTO {table} ")
    finally:
        await store.close()


def test_audit_survives_kill_9_and_the_gateway_restarts(pg: PgServer, tmp_path: Path) -> None:
    table = unique("durable")
    upstream(pg, f"CREATE TABLE {table} (id bigint PRIMARY KEY, worker int)")
    state = tmp_path / "state"
    policy = policy_file(tmp_path, [])
    gateway = GatewayProcess(pg, state, policy, tmp_path / "gateway.log")
    stop = threading.Event()

    def insert(worker: int) -> None:
        with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                n += 1
                conn.execute(f"INSERT INTO {table} VALUES ({worker * 10**7 + n}, {worker})")

    threads = [threading.Thread(target=_quietly(insert), args=(w,)) for w in range(WORKERS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(2)
        assert gateway.kill(signal.SIGKILL) == -signal.SIGKILL
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    reached = {int(r[0]) for r in upstream(pg, f"SELECT id FROM {table}")}
    rows = asyncio.run(audited(state, table))
    ids = [int(m.group(1)) for r in rows if (m := re.search(r"VALUES \((\d+),", r.sql))]
    assert len(ids) == len(set(ids)) == len(rows)
    assert len(reached) > 100, "too little load to prove anything"
    assert not reached - set(ids), f"{len(reached - set(ids))} inserted rows have no audit row"
    # At most the statement each client had in flight was audited without reaching the table.
    assert len(set(ids) - reached) <= WORKERS
    # Outcomes are buffered: at most one per client in flight, and one per client unwritten.
    assert sum(r.outcome is None for r in rows) <= 2 * WORKERS
    assert all(r.outcome in (None, "forwarded", "error") for r in rows)

    again = GatewayProcess(pg, state, policy, tmp_path / "gateway.log")
    try:
        with psycopg.connect(again.dsn(), autocommit=True) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (-1, -1)")
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (len(reached) + 1,)
    finally:
        assert again.kill(signal.SIGTERM) == 0
    after = asyncio.run(audited(state, table))
    assert {r.key for r in rows} < {r.key for r in after}
    (restarted,) = [r for r in after if r.sql == f"INSERT INTO {table} VALUES (-1, -1)"]
    assert restarted.outcome == "forwarded"
    upstream(pg, f"DROP TABLE {table}")


def _quietly(work: Callable[[int], None]) -> Callable[[int], None]:
    """Clients see their connection drop when the gateway dies; that is the point."""

    def run(worker: int) -> None:
        with contextlib.suppress(psycopg.OperationalError):
            work(worker)

    return run
