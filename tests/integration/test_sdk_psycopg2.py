"""The psycopg2 SDK against the real PostgreSQL: the same guarantees as the psycopg 3 one,
with psycopg2's own error classes, cursor factories and COPY methods."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2  # type: ignore[import-untyped]
import psycopg2.errors  # type: ignore[import-untyped]
import psycopg2.extensions  # type: ignore[import-untyped]
import psycopg2.extras  # type: ignore[import-untyped]
import pytest

from backstop_core.sdk import core
from backstop_core.sdk import psycopg2 as bpsycopg2
from tests.integration.test_sdk_psycopg import (
    AGENT,
    audit_rows,
    background,
    cli,
    decide_from_cli,
    direct,
    wait_for_pending,
    write_policy,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "policy.json")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def items(fresh_db: str) -> str:
    direct(fresh_db, "CREATE TABLE items (id int PRIMARY KEY, name text)")
    direct(fresh_db, "INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 10) i")
    return fresh_db


@pytest.fixture
def connect(items: str, policy: Path, state_dir: Path) -> Iterator[Callable[..., Any]]:
    opened: list[Any] = []

    def open_(*, autocommit: bool = True, **kwargs: Any) -> Any:
        conn = bpsycopg2.connect(items, agent=AGENT, policy=policy, state_dir=state_dir, **kwargs)
        conn.autocommit = autocommit
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.close()


def count(dsn: str) -> int:
    return int(direct(dsn, "SELECT count(*) FROM items")[0][0])


def test_allowed_statements_return_what_plain_psycopg2_returns(
    connect: Callable[..., Any], items: str
) -> None:
    conn = connect()
    cur = conn.cursor()
    cur.execute("SELECT id, name FROM items WHERE id <= %s ORDER BY id", (2,))
    assert cur.fetchall() == [(1, "item 1"), (2, "item 2")]
    cur.execute("INSERT INTO items VALUES (%(id)s, %(name)s)", {"id": 11, "name": "50% off"})
    cur.executemany("INSERT INTO items VALUES (%s, %s)", [(12, "a"), (13, "b")])
    psycopg2.extras.execute_values(cur, "INSERT INTO items VALUES %s", [(14, "c"), (15, "d")])
    cur.callproc("upper", ("shout",))
    assert cur.fetchone() == ("SHOUT",)
    dict_cur = conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
    assert isinstance(dict_cur, bpsycopg2.Cursor)
    dict_cur.execute("SELECT id, name FROM items WHERE id = %s", (11,))
    assert dict_cur.fetchone() == {"id": 11, "name": "50% off"}
    plain = psycopg2.connect(items)
    try:
        plain_cur = plain.cursor()
        plain_cur.execute("SELECT * FROM items ORDER BY id")
        cur.execute("SELECT * FROM items ORDER BY id")
        assert cur.fetchall() == plain_cur.fetchall()
    finally:
        plain.close()
    assert count(items) == 15


def test_transactions_named_cursors_and_copy(connect: Callable[..., Any], items: str) -> None:
    conn = connect(autocommit=False)
    cur = conn.cursor()
    cur.execute("INSERT INTO items VALUES (20, 'rolled back')")
    conn.rollback()
    with conn:  # commits
        cur.execute("INSERT INTO items VALUES (21, 'committed')")
    named = conn.cursor("named")
    named.execute("SELECT id FROM items WHERE id > %s ORDER BY id", (10,))
    assert named.fetchall() == [(21,)]
    named.close()
    cur.copy_expert("COPY items FROM STDIN", io.StringIO("30\tcopied\n31\t\\N\n"))
    cur.copy_from(io.StringIO("32\tfrom\n"), "items", columns=("id", "name"))
    out = io.StringIO()
    cur.copy_expert("COPY (SELECT id FROM items WHERE id >= 30 ORDER BY id) TO STDOUT", out)
    assert out.getvalue() == "30\n31\n32\n"
    conn.commit()
    assert direct(items, "SELECT id FROM items WHERE id >= 20 ORDER BY id") == [
        (21,),
        (30,),
        (31,),
        (32,),
    ]


def test_blocked_statement_raises_a_psycopg2_error_and_runs_nothing(
    connect: Callable[..., Any], items: str
) -> None:
    conn = connect()
    cur = conn.cursor()
    with pytest.raises(bpsycopg2.BackstopBlocked) as caught:
        cur.execute("DROP TABLE items")
    error = caught.value
    assert isinstance(error, psycopg2.errors.InsufficientPrivilege)
    assert isinstance(error, psycopg2.Error) and isinstance(error, core.BackstopError)
    assert error.pgcode == "42501"
    assert "never dropped by agents" in error.reason and error.pgerror == error.reason
    assert count(items) == 10
    with pytest.raises(bpsycopg2.BackstopBlocked):
        cur.copy_expert("TRUNCATE items", io.StringIO())
    cur.execute("SELECT count(*) FROM items")
    assert cur.fetchone() == (10,)


def test_a_refusal_inside_a_transaction_fails_the_transaction(
    connect: Callable[..., Any], items: str
) -> None:
    conn = connect(autocommit=False)
    cur = conn.cursor()
    cur.execute("INSERT INTO items VALUES (40, 'doomed')")
    with pytest.raises(psycopg2.Error):
        cur.execute("DROP TABLE items")
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
    conn.rollback()
    assert count(items) == 10


def test_an_approval_from_the_cli_in_another_process_lets_the_statement_run(
    connect: Callable[..., Any], items: str, state_dir: Path
) -> None:
    cur = connect().cursor()

    def delete() -> int:
        cur.execute("DELETE FROM items WHERE id = %s", (3,))
        return int(cur.rowcount)

    deleting = background(delete)
    pending = wait_for_pending(state_dir)
    assert pending["sql"] == "DELETE FROM items WHERE id = 3"
    assert count(items) == 10
    decide_from_cli(state_dir, pending["id"], "approve")
    assert deleting.result(timeout=30) == 1
    assert count(items) == 9


def test_not_waiting_raises_approval_required_with_the_id(
    connect: Callable[..., Any], items: str, state_dir: Path
) -> None:
    cur = connect(wait_for_approval=False).cursor()
    with pytest.raises(bpsycopg2.ApprovalRequired) as caught:
        cur.execute("DELETE FROM items WHERE id = 4")
    assert isinstance(caught.value, psycopg2.Error)
    assert caught.value.approval_id == wait_for_pending(state_dir)["id"]
    decide_from_cli(state_dir, caught.value.approval_id, "approve")
    cur.execute("DELETE FROM items WHERE id = 4")
    assert cur.rowcount == 1
    assert cli(state_dir, "pending", "--json").stdout.strip() == "[]"


def test_every_statement_is_audited_with_the_agent_name(
    connect: Callable[..., Any], state_dir: Path
) -> None:
    cur = connect().cursor()
    cur.execute("SELECT 1")
    cur.execute("UPDATE items SET name = %s WHERE id = %s", ("renamed", 1))
    with pytest.raises(bpsycopg2.BackstopBlocked):
        cur.execute("DROP TABLE items")
    rows = audit_rows(state_dir, finished=3)
    assert [(r.agent, r.sql, r.outcome) for r in rows] == [
        (AGENT, "SELECT 1", "forwarded"),
        (AGENT, "UPDATE items SET name = 'renamed' WHERE id = 1", "forwarded"),
        (AGENT, "DROP TABLE items", "blocked"),
    ]
