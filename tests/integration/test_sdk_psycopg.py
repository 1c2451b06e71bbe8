"""The psycopg 3 SDK against the real PostgreSQL: allowed statements behave as plain psycopg,
refused ones raise Backstop's error (also psycopg's) and run nothing, approvals are decided
from the `backstop` CLI in another process, and every statement is in the audit trail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg import pq

from backstop_core.sdk import core
from backstop_core.sdk import psycopg as bpsycopg
from backstop_core.store import AuditRecord, Store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AGENT = "sdk-test-agent"
T = TypeVar("T")


# ----------------------------------------------------------------- helpers shared by the SDK tests


def write_policy(path: Path, *, timeout: int = 30) -> Path:
    """Reads and ordinary writes pass; DELETE waits for an operator; DROP TABLE is blocked;
    TRUNCATE (CRITICAL) needs a snapshot and an approval."""
    path.write_text(
        json.dumps(
            {
                "defaults": {
                    "LOW": "allow",
                    "MEDIUM": "allow",
                    "HIGH": "approve",
                    "CRITICAL": "approve_with_snapshot",
                },
                "rules": [
                    {
                        "name": "approve-deletes",
                        "match": {"operation": "DELETE"},
                        "action": "approve",
                        "reason": "Deletes wait for an operator.",
                    },
                    {
                        "name": "no-drop-table",
                        "match": {"operation": "DROP_TABLE"},
                        "action": "block",
                        "reason": "Tables are never dropped by agents.",
                    },
                    {
                        "name": "snapshot-before-truncate",
                        "match": {"operation": "TRUNCATE"},
                        "action": "require_snapshot",
                    },
                ],
                "approval": {"timeout_seconds": timeout},
            }
        )
    )
    return path


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's `backstop` command in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "backstop_core.cli", *args, "--state-dir", str(state_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for_pending(state_dir: Path, agent: str = AGENT, timeout: float = 30) -> dict[str, Any]:
    """Poll `backstop pending --json` until an approval for `agent` shows up."""
    deadline = time.monotonic() + timeout
    while True:
        result = cli(state_dir, "pending", "--json")
        assert result.returncode == 0, result.stderr
        found = [a for a in json.loads(result.stdout) if a["agent"] == agent]
        if found:
            return dict(found[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"no pending approval for {agent} after {timeout} s")
        time.sleep(0.1)


def decide_from_cli(state_dir: Path, approval_id: int, verb: str, *extra: str) -> None:
    result = cli(state_dir, verb, str(approval_id), *extra)
    assert result.returncode == 0, result.stderr


def background(fn: Callable[[], T]) -> Future[T]:
    """Run a blocking call on a thread; the test goes on while it waits."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def audit_rows(state_dir: Path, agent: str = AGENT, *, finished: int = 0) -> list[AuditRecord]:
    """The audit trail of `agent`, oldest first, read the way `backstop audit` reads it; waits
    until at least `finished` rows have an outcome (outcomes are written a moment later)."""

    async def read() -> list[AuditRecord]:
        store = await Store.open(state_dir)
        try:
            return await store.audit_query(agent=agent, limit=1000)
        finally:
            await store.close()

    deadline = time.monotonic() + 10
    while True:
        rows = list(reversed(asyncio.run(read())))
        if sum(r.outcome is not None for r in rows) >= finished or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def direct(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    """SQL on PostgreSQL itself, around the SDK."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "policy.json")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def items(fresh_db: str) -> str:
    """A table of ten rows in a fresh database; returns the database's DSN."""
    direct(fresh_db, "CREATE TABLE items (id int PRIMARY KEY, name text)")
    direct(fresh_db, "INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 10) i")
    return fresh_db


@pytest.fixture
def connect(
    items: str, policy: Path, state_dir: Path
) -> Iterator[Callable[..., bpsycopg.Connection]]:
    opened: list[bpsycopg.Connection] = []

    def open_(**kwargs: Any) -> bpsycopg.Connection:
        kwargs.setdefault("autocommit", True)
        conn = bpsycopg.connect(items, agent=AGENT, policy=policy, state_dir=state_dir, **kwargs)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.close()


# ----------------------------------------------------------------------------- allowed


def test_allowed_statements_return_what_plain_psycopg_returns(
    connect: Callable[..., bpsycopg.Connection], items: str
) -> None:
    conn = connect()
    cur = conn.cursor()
    cur.execute("SELECT id, name FROM items WHERE id <= %s ORDER BY id", (3,))
    assert cur.fetchall() == [(1, "item 1"), (2, "item 2"), (3, "item 3")]
    assert conn.execute("SELECT name FROM items WHERE id = %(id)s", {"id": 7}).fetchone() == (
        "item 7",
    )
    cur.execute("INSERT INTO items VALUES (%s, %s) RETURNING id", (11, "it's %s literally"))
    assert cur.fetchone() == (11,)
    cur.executemany("INSERT INTO items VALUES (%s, %s)", [(12, "a"), (13, "b")])
    cur.execute("UPDATE items SET name = 'renamed' WHERE id = 12")
    assert cur.rowcount == 1
    with conn.transaction(), conn.cursor(name="server_side") as named:
        named.execute("SELECT id FROM items WHERE id > %s ORDER BY id", (10,))
        assert named.fetchall() == [(11,), (12,), (13,)]
    assert list(conn.cursor().stream("SELECT generate_series(1, 3)")) == [(1,), (2,), (3,)]
    with psycopg.connect(items) as plain:
        assert (
            plain.execute("SELECT * FROM items ORDER BY id").fetchall()
            == conn.execute("SELECT * FROM items ORDER BY id").fetchall()
        )
    assert direct(items, "SELECT name FROM items WHERE id IN (11, 12) ORDER BY id") == [
        ("it's %s literally",),
        ("renamed",),
    ]


def test_transactions_commit_and_roll_back_as_usual(
    connect: Callable[..., bpsycopg.Connection], items: str
) -> None:
    conn = connect(autocommit=False)
    conn.execute("INSERT INTO items VALUES (20, 'rolled back')")
    conn.rollback()
    with conn.transaction():
        conn.execute("INSERT INTO items VALUES (21, 'committed')")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():  # a savepoint
            conn.execute("INSERT INTO items VALUES (21, 'twice')")
    conn.commit()
    assert direct(items, "SELECT id FROM items WHERE id >= 20") == [(21,)]


def test_copy_in_and_out_and_client_cursors(
    connect: Callable[..., bpsycopg.Connection], items: str
) -> None:
    conn = connect(cursor_factory=psycopg.ClientCursor)
    cur = conn.cursor()
    assert isinstance(cur, psycopg.ClientCursor) and isinstance(cur, bpsycopg.Cursor)
    with cur.copy("COPY items (id, name) FROM STDIN") as copy:
        copy.write_row((30, "copied in"))
        copy.write_row((31, None))
    with cur.copy("COPY (SELECT id, name FROM items WHERE id >= 30 ORDER BY id) TO STDOUT") as copy:
        rows = list(copy.rows())
    assert rows == [("30", "copied in"), ("31", None)]
    assert direct(items, "SELECT count(*) FROM items") == [(12,)]


# ----------------------------------------------------------------------------- refused


def test_blocked_statement_raises_a_psycopg_error_and_runs_nothing(
    connect: Callable[..., bpsycopg.Connection], items: str
) -> None:
    conn = connect()
    with pytest.raises(bpsycopg.BackstopBlocked) as caught:
        conn.execute("DROP TABLE items")
    error = caught.value
    assert isinstance(error, psycopg.errors.InsufficientPrivilege)
    assert isinstance(error, psycopg.Error) and isinstance(error, core.BackstopError)
    assert error.sqlstate == "42501"
    assert error.decision == "block"
    assert "no-drop-table" in error.reason and "never dropped by agents" in error.reason
    assert str(error) == error.reason and error.reason.startswith("backstop:")
    assert direct(items, "SELECT count(*) FROM items") == [(10,)]
    # The session goes on.
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (10,)


def test_a_refusal_inside_a_transaction_fails_the_transaction(
    connect: Callable[..., bpsycopg.Connection], items: str
) -> None:
    conn = connect(autocommit=False)
    conn.execute("INSERT INTO items VALUES (40, 'in the failed transaction')")
    with pytest.raises(bpsycopg.BackstopBlocked):
        conn.execute("DROP TABLE items")
    assert conn.info.transaction_status == pq.TransactionStatus.INERROR
    conn.rollback()
    assert direct(items, "SELECT count(*) FROM items") == [(10,)]


def test_a_statement_that_needs_a_snapshot_is_refused_without_a_snapshot_store(
    connect: Callable[..., bpsycopg.Connection], items: str
) -> None:
    conn = connect()
    with pytest.raises(bpsycopg.BackstopBlocked) as caught:
        conn.execute("TRUNCATE items")
    assert "No snapshot store is configured" in caught.value.reason
    assert caught.value.decision == "approve_with_snapshot"
    assert direct(items, "SELECT count(*) FROM items") == [(10,)]


def test_a_copy_into_a_blocked_statement_never_starts(
    items: str, tmp_path: Path, state_dir: Path
) -> None:
    path = tmp_path / "no-copy.json"
    path.write_text(
        json.dumps(
            {
                "defaults": {
                    "LOW": "allow",
                    "MEDIUM": "allow",
                    "HIGH": "block",
                    "CRITICAL": "block",
                },
                "rules": [{"name": "no-copy", "match": {"operation": "COPY"}, "action": "block"}],
            }
        )
    )
    with bpsycopg.connect(items, agent=AGENT, policy=path, state_dir=state_dir) as conn:
        with (
            pytest.raises(bpsycopg.BackstopBlocked),
            conn.cursor().copy("COPY items FROM STDIN") as copy,
        ):
            copy.write_row((50, "never"))
        # Nothing had begun, so nothing failed: the connection goes on.
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (10,)
    assert direct(items, "SELECT count(*) FROM items") == [(10,)]


# ----------------------------------------------------------------------------- approvals


def test_an_approval_from_the_cli_in_another_process_lets_the_statement_run(
    connect: Callable[..., bpsycopg.Connection], items: str, state_dir: Path
) -> None:
    conn = connect()
    deleting = background(lambda: conn.execute("DELETE FROM items WHERE id = %s", (3,)).rowcount)
    pending = wait_for_pending(state_dir)
    assert pending["operation"] == "DELETE"
    assert pending["sql"] == "DELETE FROM items WHERE id = 3"
    assert direct(items, "SELECT count(*) FROM items") == [(10,)]  # still waiting
    decide_from_cli(state_dir, pending["id"], "approve")
    assert deleting.result(timeout=30) == 1
    assert direct(items, "SELECT count(*) FROM items WHERE id = 3") == [(0,)]
    shown = json.loads(cli(state_dir, "show", str(pending["id"]), "--json").stdout)
    assert shown["status"] == "used"
    (row,) = [r for r in audit_rows(state_dir, finished=1) if r.approval_id == pending["id"]]
    assert row.outcome == "forwarded" and row.decision == "approve"


def test_a_denied_approval_raises_with_the_operators_reason(
    connect: Callable[..., bpsycopg.Connection], items: str, state_dir: Path
) -> None:
    conn = connect()
    deleting = background(lambda: conn.execute("DELETE FROM items WHERE id = 4"))
    pending = wait_for_pending(state_dir)
    decide_from_cli(state_dir, pending["id"], "deny", "--reason", "keep item four")
    with pytest.raises(bpsycopg.ApprovalDenied) as caught:
        deleting.result(timeout=30)
    assert isinstance(caught.value, psycopg.Error)
    assert caught.value.approval_id == pending["id"]
    assert "keep item four" in caught.value.reason
    assert direct(items, "SELECT count(*) FROM items") == [(10,)]


def test_an_approval_nobody_decides_times_out(items: str, policy: Path, state_dir: Path) -> None:
    with (
        bpsycopg.connect(
            items,
            agent=AGENT,
            policy=policy,
            state_dir=state_dir,
            approval_timeout=0.5,
            autocommit=True,
        ) as conn,
        pytest.raises(bpsycopg.ApprovalTimedOut) as caught,
    ):
        conn.execute("DELETE FROM items WHERE id = 5")
    assert isinstance(caught.value, psycopg.errors.QueryCanceled)
    assert "timed out" in caught.value.reason
    shown = json.loads(cli(state_dir, "show", str(caught.value.approval_id), "--json").stdout)
    assert shown["status"] == "expired"
    assert direct(items, "SELECT count(*) FROM items") == [(10,)]


def test_not_waiting_raises_approval_required_and_the_retry_runs_once_approved(
    connect: Callable[..., bpsycopg.Connection], items: str, state_dir: Path
) -> None:
    with connect(wait_for_approval=False) as conn:
        with pytest.raises(bpsycopg.ApprovalRequired) as caught:
            conn.execute("DELETE FROM items WHERE id = 6")
        approval_id = caught.value.approval_id
        assert approval_id is not None
        assert isinstance(caught.value, psycopg.Error)
        assert f"backstop approve {approval_id}" in caught.value.reason
        # Asking again before a decision names the same approval instead of a new one.
        with pytest.raises(bpsycopg.ApprovalRequired) as again:
            conn.execute("DELETE FROM items WHERE id = 6")
        assert again.value.approval_id == approval_id
        assert wait_for_pending(state_dir)["id"] == approval_id
        decide_from_cli(state_dir, approval_id, "approve")
        assert conn.execute("DELETE FROM items WHERE id = 6").rowcount == 1
        # The approval covered one execution.
        with pytest.raises(bpsycopg.ApprovalRequired):
            conn.execute("DELETE FROM items WHERE id = 6")
    assert direct(items, "SELECT count(*) FROM items") == [(9,)]


# ----------------------------------------------------------------------------- audit


def test_every_statement_is_audited_with_the_agent_name(
    connect: Callable[..., bpsycopg.Connection], state_dir: Path
) -> None:
    conn = connect()
    conn.execute("SELECT count(*) FROM items")
    conn.execute("INSERT INTO items VALUES (%s, %s)", (60, "audited"))
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO items VALUES (60, 'again')")
    with pytest.raises(bpsycopg.BackstopBlocked):
        conn.execute("DROP TABLE items")
    rows = audit_rows(state_dir, finished=4)
    assert [(r.sql, r.decision, r.outcome) for r in rows] == [
        ("SELECT count(*) FROM items", "allow", "forwarded"),
        ("INSERT INTO items VALUES (60, 'audited')", "allow", "forwarded"),
        ("INSERT INTO items VALUES (60, 'again')", "allow", "error"),
        ("DROP TABLE items", "block", "blocked"),
    ]
    assert {r.agent for r in rows} == {AGENT}
    assert rows[0].operation == "SELECT" and rows[1].tables == ("public.items",)
    assert "duplicate key" in (rows[2].error or "")


def test_row_estimates_from_postgresql_feed_rows_over_rules(
    items: str, tmp_path: Path, state_dir: Path
) -> None:
    path = tmp_path / "large-writes.json"
    path.write_text(
        json.dumps(
            {
                "defaults": {
                    "LOW": "allow",
                    "MEDIUM": "allow",
                    "HIGH": "allow",
                    "CRITICAL": "allow",
                },
                "rules": [
                    {
                        "name": "approve-large-writes",
                        "match": {"category": "WRITE", "rows_over": 5},
                        "action": "approve",
                    }
                ],
            }
        )
    )
    direct(items, "ANALYZE items")
    with bpsycopg.connect(
        items, agent=AGENT, policy=path, state_dir=state_dir, wait_for_approval=False
    ) as conn:
        assert conn.execute("UPDATE items SET name = 'one' WHERE id = %s", (1,)).rowcount == 1
        with pytest.raises(bpsycopg.ApprovalRequired) as caught:
            conn.execute("UPDATE items SET name = 'all'")
        assert "approve-large-writes" in caught.value.reason
        conn.commit()
    assert direct(items, "SELECT count(*) FROM items WHERE name = 'all'") == [(0,)]
    shown = json.loads(cli(state_dir, "show", str(caught.value.approval_id), "--json").stdout)
    assert shown["row_estimate"] == 10


def test_an_edited_policy_file_applies_to_the_next_statement(
    connect: Callable[..., bpsycopg.Connection], policy: Path
) -> None:
    conn = connect()
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (10,)
    doc = json.loads(policy.read_text())
    doc["rules"].append(
        {"name": "no-reads-today", "match": {"category": "READ"}, "action": "block"}
    )
    policy.write_text(json.dumps(doc))
    with pytest.raises(bpsycopg.BackstopBlocked) as caught:
        conn.execute("SELECT count(*) FROM items")
    assert "no-reads-today" in caught.value.reason
    policy.write_text("{ not json")  # an invalid edit keeps the last good policy
    with pytest.raises(bpsycopg.BackstopBlocked):
        conn.execute("SELECT count(*) FROM items")
