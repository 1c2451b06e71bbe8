"""The approval workflow with real clients: a statement held for an operator and decided from
the `backstop` command line in another process, denied, timed out, cancelled, replayed, and
never run by anything that arrives through the gateway's own SQL path."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from psycopg.pq import TransactionStatus

from backstop_core.store import ApprovalRecord, AuditRecord
from tests.conftest import PgServer
from tests.gateway_harness import GatewayThread, settings_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AGENT_APP = "cursor-tests"  # mapped to agent "cursor" by the test policy
T = TypeVar("T")


# ----------------------------------------------------------------------------- helpers


def write_policy(
    path: Path,
    *,
    timeout: int = 20,
    window: int = 0,
    webhook: str | None = None,
) -> Path:
    """Reads and ordinary writes pass, DELETE waits for an operator, HIGH and CRITICAL are
    refused outright (so an agent's attempt to reach the state files fails at once)."""
    path.write_text(
        json.dumps(
            {
                "defaults": {
                    "LOW": "allow",
                    "MEDIUM": "allow",
                    "HIGH": "block",
                    "CRITICAL": "block",
                },
                "rules": [
                    {
                        "name": "approve-deletes",
                        "match": {"operation": "DELETE"},
                        "action": "approve",
                        "reason": "Deletes wait for an operator.",
                    }
                ],
                "agents": [
                    {"match": {"application_name": "cursor*"}, "agent": "cursor"},
                    {"match": {"application_name": "other*"}, "agent": "other"},
                ],
                "approval": {
                    "timeout_seconds": timeout,
                    "auto_approve_window_seconds": window,
                    "webhook_url": webhook,
                },
            }
        )
    )
    return path


def cli_command(state_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "backstop_core.cli", *args, "--state-dir", str(state_dir)]


def backstop(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's `backstop` command, in a process of its own."""
    return subprocess.run(
        cli_command(state_dir, *args), cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def show(state_dir: Path, approval_id: int) -> dict[str, Any]:
    result = backstop(state_dir, "show", str(approval_id), "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def wait_until(check: Callable[[], T | None], timeout: float = 10, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def background(fn: Callable[[], T]) -> Future[T]:
    """Run a blocking client call on a thread; the test goes on while it waits."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def tool(pg: PgServer, name: str) -> str:
    if pg.bin_dir is not None and (pg.bin_dir / name).exists():
        return str(pg.bin_dir / name)
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Approvals:
    """A gateway with the approval policy, its state directory, and views of its store."""

    gateway: GatewayThread
    state_dir: Path
    policy: Path

    @property
    def dsn(self) -> str:
        return self.gateway.dsn(application_name=AGENT_APP)

    def all(self) -> list[ApprovalRecord]:
        runtime = self.gateway.runtime
        assert runtime is not None and runtime.store is not None
        return self.gateway.call(runtime.store.approvals_list(status=None))

    def get(self, approval_id: int) -> ApprovalRecord:
        (record,) = [a for a in self.all() if a.id == approval_id]
        return record

    def wait_pending(self, count: int = 1, timeout: float = 10) -> list[ApprovalRecord]:
        def pending() -> list[ApprovalRecord]:
            found = [a for a in self.all() if a.status == "pending"]
            return found if len(found) >= count else []

        return sorted(
            wait_until(pending, timeout, f"{count} pending approvals"), key=lambda a: a.id
        )

    def wait_status(self, approval_id: int, status: str, timeout: float = 10) -> ApprovalRecord:
        def reached() -> ApprovalRecord | None:
            record = self.get(approval_id)
            return record if record.status == status else None

        return wait_until(
            reached,
            timeout,
            f"approval {approval_id} to become {status}",
        )

    def audit(self, approval: ApprovalRecord, timeout: float = 10) -> AuditRecord:
        """The statement's audit event once its outcome is recorded."""
        runtime = self.gateway.runtime
        assert runtime is not None and runtime.store is not None
        store = runtime.store
        assert approval.audit_key is not None

        def finished() -> AuditRecord | None:
            record = self.gateway.call(store.audit_get_by_key(approval.audit_key or ""))
            return record if record is not None and record.outcome is not None else None

        return wait_until(finished, timeout, f"the audit outcome of approval {approval.id}")


@pytest.fixture
def approvals(
    gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> Callable[..., Approvals]:
    def start(**policy: Any) -> Approvals:
        state_dir = tmp_path / f"state-{uuid.uuid4().hex[:6]}"
        path = write_policy(tmp_path / f"policy-{uuid.uuid4().hex[:6]}.json", **policy)
        gateway = gateway_factory(policy=path, state_dir=state_dir)
        return Approvals(gateway, state_dir, path)

    return start


@pytest.fixture
def victims(pg: PgServer) -> str:
    """A table of ten rows, made directly on PostgreSQL (ids 1..10)."""
    name = f"victims_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO {name} SELECT i, 'row ' || i FROM generate_series(1, 10) i")
        conn.execute(f"ANALYZE {name}")
    return name


def ids(pg: PgServer, table: str) -> list[int]:
    """The table's ids, read directly from PostgreSQL."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


ALL = list(range(1, 11))


# ----------------------------------------------------------------------------- approve


def test_psql_waits_for_a_cli_approval_and_prints_the_result(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    client = subprocess.Popen(
        [
            tool(pg, "psql"),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            gw.dsn,
            "-c",
            f"DELETE FROM {victims} WHERE id <= 3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        (pending,) = gw.wait_pending()
        assert client.poll() is None, "psql returned before anyone decided"
        assert ids(pg, victims) == ALL
        decided = backstop(gw.state_dir, "approve", str(pending.id), "--reason", "cleanup ok")
        assert decided.returncode == 0, decided.stderr
        assert f"Approval #{pending.id} approved" in decided.stdout
        out, err = client.communicate(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err
    assert out.strip() == "DELETE 3"
    assert (
        f"NOTICE:  backstop: waiting for approval {pending.id} — DELETE on public.{victims}, "
        f"~{pending.row_estimate} rows; an operator must approve within 20 s"
    ) in err
    assert ids(pg, victims) == [4, 5, 6, 7, 8, 9, 10]
    assert gw.get(pending.id).status == "used"
    assert gw.get(pending.id).decision_reason == "cleanup ok"


def test_psycopg_gets_the_notice_and_the_returned_rows(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    notices: list[tuple[str | None, str | None, str | None]] = []
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        # A Diagnostic is only valid inside the handler: keep its fields.
        conn.add_notice_handler(
            lambda d: notices.append((d.severity, d.message_primary, d.message_detail))
        )
        rows = background(
            lambda: conn.execute(
                f"DELETE FROM {victims} WHERE id IN (%s, %s) RETURNING id, note", (2, 5)
            ).fetchall()
        )
        (pending,) = gw.wait_pending()
        wait_until(lambda: notices, what="the notice at the client")
        assert not rows.done()
        decided = backstop(gw.state_dir, "approve", str(pending.id))
        assert decided.returncode == 0, decided.stderr
        assert sorted(rows.result(20)) == [(2, "row 2"), (5, "row 5")]
    ((severity, primary, detail),) = notices
    assert severity == "NOTICE"
    assert (primary or "").startswith(
        f"backstop: waiting for approval {pending.id} — DELETE on public.{victims}, "
    )
    assert (primary or "").endswith("an operator must approve within 20 s")
    assert f"backstop approve {pending.id}" in (detail or "")
    assert pending.params_hash is not None  # bound parameters are part of what was approved
    assert ids(pg, victims) == [1, 3, 4, 6, 7, 8, 9, 10]


def test_asyncpg_waits_in_a_task_while_the_cli_approves(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()

    async def run() -> tuple[str, list[str]]:
        conn = await asyncpg.connect(gw.dsn)
        notices: list[str] = []
        conn.add_log_listener(lambda _conn, message: notices.append(message.message))
        try:
            task = asyncio.ensure_future(conn.execute(f"DELETE FROM {victims} WHERE id > $1", 8))
            (pending,) = await asyncio.to_thread(gw.wait_pending)
            await asyncio.sleep(0.1)
            assert not task.done()
            operator = await asyncio.create_subprocess_exec(
                *cli_command(gw.state_dir, "approve", str(pending.id)),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await operator.communicate()
            assert operator.returncode == 0, err
            status = await asyncio.wait_for(task, 20)
            return status, notices
        finally:
            await conn.close()

    status, notices = asyncio.run(run())
    assert status == "DELETE 2"
    assert any(n.startswith("backstop: waiting for approval ") for n in notices), notices
    assert ids(pg, victims) == list(range(1, 9))


@pytest.mark.parametrize(
    ("first", "first_params"),
    [
        pytest.param("DELETE FROM {t} WHERE id = %b", (7,), id="binary-int"),
        pytest.param("DELETE FROM {t} WHERE id = %t", ("seven",), id="text-not-an-int"),
    ],
)
def test_the_operator_sees_row_estimates_for_parameterized_statements(
    pg: PgServer,
    approvals: Callable[..., Approvals],
    victims: str,
    first: str,
    first_params: tuple[object, ...],
) -> None:
    """What the operator approves includes the planner's row estimate, whatever the
    parameter format, and one statement that cannot be estimated spoils no later one."""
    gw = approvals()
    estimates = []
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        for sql, params in (
            (first.format(t=victims), first_params),
            (f"DELETE FROM {victims} WHERE note = %t", ("row 3",)),
        ):
            outcome = background(functools.partial(conn.execute, sql, params))
            (pending,) = gw.wait_pending()
            estimates.append(pending.row_estimate)
            assert backstop(gw.state_dir, "deny", str(pending.id), "--reason", "n").returncode == 0
            with contextlib.suppress(psycopg.Error):
                outcome.result(20)
    if first_params == (7,):
        assert estimates == [1, 1]
    else:
        assert estimates[1] == 1
    assert ids(pg, victims) == ALL


# ----------------------------------------------------------------------------- deny


def test_deny_sends_the_operator_reason_and_the_session_goes_on(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    reason = "not while the nightly export runs"
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        outcome = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 1"))
        (pending,) = gw.wait_pending()
        decided = backstop(gw.state_dir, "deny", str(pending.id), "--reason", reason)
        assert decided.returncode == 0, decided.stderr
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as error:
            outcome.result(20)
        message = str(error.value)
        assert f"approval {pending.id}" in message
        assert "was denied by" in message
        assert reason in message
        assert error.value.sqlstate == "42501"
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    assert ids(pg, victims) == ALL
    denied = gw.get(pending.id)
    assert (denied.status, denied.decision_reason) == ("denied", reason)
    assert denied.decided_by


def test_deny_inside_a_transaction_fails_the_transaction(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    with psycopg.connect(gw.dsn) as conn:
        conn.execute(f"INSERT INTO {victims} VALUES (100, 'inside the transaction')")
        outcome = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 2"))
        (pending,) = gw.wait_pending()
        assert backstop(gw.state_dir, "deny", str(pending.id), "--reason", "no").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied"):
            outcome.result(20)
        assert conn.info.transaction_status == TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {victims}").fetchone() == (10,)
    assert ids(pg, victims) == ALL


# ----------------------------------------------------------------------------- timeout


def test_timeout_refuses_the_statement_and_expires_the_approval(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals(timeout=1)
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.QueryCanceled) as error:
            conn.execute(f"DELETE FROM {victims} WHERE id = 3")
        assert "timed out" in str(error.value)
        assert "did not run" in str(error.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    (approval,) = gw.all()
    assert approval.status == "expired"
    late = backstop(gw.state_dir, "approve", str(approval.id))
    assert late.returncode == 1
    assert f"approval {approval.id} is already expired" in late.stderr
    assert ids(pg, victims) == ALL
    audit = gw.audit(approval)
    assert (audit.outcome, audit.approval_id) == ("timed_out", approval.id)


# ----------------------------------------------------------------------------- disconnect


def test_client_disconnect_cancels_the_approval(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    client = subprocess.Popen(
        [tool(pg, "psql"), "-X", gw.dsn, "-c", f"DELETE FROM {victims} WHERE id = 4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (pending,) = gw.wait_pending()
    client.kill()
    client.wait(10)
    wait_until(
        lambda: show(gw.state_dir, pending.id)["status"] == "cancelled",
        timeout=3,
        what="the approval to be cancelled after the client went away",
    )
    late = backstop(gw.state_dir, "approve", str(pending.id))
    assert late.returncode == 1
    assert f"approval {pending.id} is already cancelled" in late.stderr
    assert ids(pg, victims) == ALL
    audit = gw.audit(gw.get(pending.id))
    assert (audit.outcome, audit.approval_id) == ("cancelled", pending.id)


def test_approving_after_the_client_left_never_runs_the_statement(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    client = subprocess.Popen(
        [tool(pg, "psql"), "-X", gw.dsn, "-c", f"DELETE FROM {victims} WHERE id <= 5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (pending,) = gw.wait_pending()
    client.kill()
    client.wait(10)
    with contextlib.suppress(AssertionError):  # give the gateway a moment to notice
        wait_until(lambda: gw.get(pending.id).status != "pending", timeout=1)
    late = backstop(gw.state_dir, "approve", str(pending.id))
    if late.returncode == 0:
        # The approval was still open: whatever the gateway does with it now must not
        # reach the table, whose client is gone.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: ids(pg, victims) != ALL, timeout=2)
    assert ids(pg, victims) == ALL
    assert late.returncode == 1, late.stdout


def test_cancel_request_while_waiting_cancels_the_approval(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    """Ctrl-C in psql, or a driver's cancel(), while the statement waits for an operator."""
    gw = approvals()
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        outcome = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 6"))
        (pending,) = gw.wait_pending()
        conn.cancel_safe(timeout=5)
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                outcome.result(3)
        finally:
            if not outcome.done():  # release the client so the test can end
                backstop(gw.state_dir, "deny", str(pending.id), "--reason", "test cleanup")
                with contextlib.suppress(Exception):
                    outcome.result(10)
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
    assert gw.wait_status(pending.id, "cancelled", timeout=2).status == "cancelled"
    assert ids(pg, victims) == ALL


# ----------------------------------------------------------------------------- restart


def test_gateway_killed_while_waiting_expires_the_approval_at_start_up(
    pg: PgServer,
    gateway_factory: Callable[..., GatewayThread],
    tmp_path: Path,
    victims: str,
) -> None:
    state_dir = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.json")
    port = free_port()
    gateway = subprocess.Popen(
        [
            sys.executable, "-m", "backstop_tui.main", "--no-ui",
            "--upstream", pg.dsn(), "--upstream-sslmode", "disable",
            "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(state_dir), "--policy", str(policy),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: _listening(port), what="the gateway to listen")
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
        client = subprocess.Popen(
            [tool(pg, "psql"), "-X", dsn, "-c", f"DELETE FROM {victims} WHERE id = 7"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def pending() -> list[dict[str, Any]]:
            listed = backstop(state_dir, "pending", "--json")
            return list(json.loads(listed.stdout)) if listed.returncode == 0 else []

        (held,) = wait_until(pending, what="a pending approval")
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait(10)
        out, _ = client.communicate(timeout=10)
        assert client.returncode != 0
        assert "DELETE" not in out
        assert show(state_dir, held["id"])["status"] == "pending"  # nobody cleaned up
    finally:
        for process in (client, gateway):
            if process is not None and process.poll() is None:
                process.kill()
    gateway_factory(policy=policy, state_dir=state_dir)
    after = show(state_dir, held["id"])
    assert after["status"] == "expired"
    assert "restarted" in (after["decision_reason"] or "")
    late = backstop(state_dir, "approve", str(held["id"]))
    assert late.returncode == 1
    assert "already expired" in late.stderr
    assert ids(pg, victims) == ALL


def test_gateway_stopped_while_waiting_leaves_nothing_to_approve(
    pg: PgServer,
    gateway_factory: Callable[..., GatewayThread],
    tmp_path: Path,
    victims: str,
) -> None:
    state_dir = tmp_path / "state"
    policy = write_policy(tmp_path / "policy.json")
    gateway = GatewayThread(
        settings_for(pg.dsn(), state_dir, upstream_sslmode="disable", policy=policy)
    ).start()
    try:
        conn = psycopg.connect(gateway.dsn(application_name=AGENT_APP), autocommit=True)
        outcome = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 8"))
        wait_until(lambda: backstop(state_dir, "pending", "--json").stdout.strip() != "[]")
        (held,) = json.loads(backstop(state_dir, "pending", "--json").stdout)
    finally:
        gateway.stop()
    with pytest.raises(psycopg.OperationalError):
        outcome.result(10)
    conn.close()
    assert show(state_dir, held["id"])["status"] in ("cancelled", "expired")
    gateway_factory(policy=policy, state_dir=state_dir)
    late = backstop(state_dir, "approve", str(held["id"]))
    assert late.returncode == 1
    assert ids(pg, victims) == ALL
    trail = json.loads(backstop(state_dir, "audit", "--json", "--table", victims).stdout)
    (event,) = [e for e in trail if e["approval_id"] == held["id"]]
    assert event["key"] == held["audit_key"]
    assert event["outcome"] != "forwarded"


def test_a_second_gateway_on_the_same_state_refuses_to_start(
    pg: PgServer,
    approvals: Callable[..., Approvals],
    gateway_factory: Callable[..., GatewayThread],
    victims: str,
) -> None:
    """A second gateway on a state directory in use would expire the first's approvals:
    it refuses to start, naming the directory, and the waiting approval is untouched."""
    gw = approvals()
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        outcome = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 8"))
        (pending,) = gw.wait_pending()
        with pytest.raises(Exception, match="is in use by a running gateway"):
            gateway_factory(policy=gw.policy, state_dir=gw.state_dir)
        time.sleep(0.2)  # several poll intervals of the first gateway
        still = gw.get(pending.id).status
        if not outcome.done():
            backstop(gw.state_dir, "approve", str(pending.id))
        with contextlib.suppress(psycopg.Error):
            outcome.result(20)
    assert still == "pending"
    assert ids(pg, victims) == [1, 2, 3, 4, 5, 6, 7, 9, 10]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


# ----------------------------------------------------------------------------- replay


def test_an_approval_covers_one_execution_only(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    delete = f"DELETE FROM {victims} WHERE id = 1"
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        first_run = background(lambda: conn.execute(delete).rowcount)
        (first,) = gw.wait_pending()
        assert backstop(gw.state_dir, "approve", str(first.id)).returncode == 0
        assert first_run.result(20) == 1
        assert gw.get(first.id).status == "used"
        conn.execute(f"INSERT INTO {victims} VALUES (1, 'back')")

        second_run = background(lambda: conn.execute(delete).rowcount)
        (second,) = gw.wait_pending()
        assert second.id > first.id
        assert second.sql == first.sql
        again = backstop(gw.state_dir, "approve", str(first.id))
        assert again.returncode == 1
        assert f"approval {first.id} is already used" in again.stderr
        time.sleep(0.2)  # several poll intervals: the old approval must not release it
        assert not second_run.done()
        assert ids(pg, victims) == ALL
        assert backstop(gw.state_dir, "deny", str(second.id), "--reason", "once").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            second_run.result(20)
        twice = backstop(gw.state_dir, "deny", str(second.id), "--reason", "twice")
        assert twice.returncode == 1
        assert "already denied" in twice.stderr
    assert ids(pg, victims) == ALL


def test_psycopg_pipeline_held_then_approved_runs_once(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    with psycopg.connect(gw.dsn, autocommit=True) as conn:

        def pipeline() -> tuple[int, ...] | None:
            with conn.pipeline():
                conn.execute(f"INSERT INTO {victims} VALUES (%s, %s)", (101, "a"))
                conn.execute(f"INSERT INTO {victims} VALUES (%s, %s)", (102, "b"))
                conn.execute(f"DELETE FROM {victims} WHERE id <= %s", (3,))
                conn.execute(f"INSERT INTO {victims} VALUES (%s, %s)", (103, "c"))
                cur = conn.execute(f"SELECT count(*) FROM {victims}")
            return cur.fetchone()

        outcome = background(pipeline)
        (pending,) = gw.wait_pending()
        assert backstop(gw.state_dir, "approve", str(pending.id)).returncode == 0
        assert outcome.result(20) == (10,)
    assert ids(pg, victims) == [4, 5, 6, 7, 8, 9, 10, 101, 102, 103]
    assert len(gw.all()) == 1
    assert gw.audit(gw.get(pending.id)).outcome == "forwarded"


def test_asyncpg_executemany_held_then_approved_runs_once(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()

    async def run() -> None:
        conn = await asyncpg.connect(gw.dsn)
        try:
            task = asyncio.ensure_future(
                conn.executemany(f"DELETE FROM {victims} WHERE id = $1", [(1,), (2,), (3,)])
            )
            (pending,) = await asyncio.to_thread(gw.wait_pending)
            decided = await asyncio.to_thread(backstop, gw.state_dir, "approve", str(pending.id))
            assert decided.returncode == 0, decided.stderr
            await asyncio.wait_for(task, 20)
            assert await conn.fetchval(f"SELECT count(*) FROM {victims}") == 7
        finally:
            await conn.close()

    asyncio.run(run())
    assert ids(pg, victims) == [4, 5, 6, 7, 8, 9, 10]
    assert len(gw.all()) == 1


# ----------------------------------------------------------------------------- other sessions


def test_other_sessions_keep_working_while_one_statement_waits(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()

    def latencies(conn: psycopg.Connection[Any], n: int = 200) -> list[float]:
        samples = []
        for i in range(n):
            started = time.perf_counter()
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            samples.append(time.perf_counter() - started)
        return samples

    with (
        psycopg.connect(gw.dsn, autocommit=True) as holder,
        psycopg.connect(gw.dsn, autocommit=True) as other,
        psycopg.connect(gw.dsn, autocommit=True) as third,
    ):
        before = statistics.median(latencies(other))
        held = background(lambda: holder.execute(f"DELETE FROM {victims} WHERE id = 9"))
        (first,) = gw.wait_pending()
        during = statistics.median(latencies(other))
        other.execute(f"INSERT INTO {victims} VALUES (200, 'written meanwhile')")
        also_held = background(lambda: third.execute(f"DELETE FROM {victims} WHERE id = 200"))
        _, second = gw.wait_pending(count=2)
        assert not held.done() and not also_held.done()
        assert gw.get(first.id).status == "pending"
        # Loose on purpose: a stalled event loop would cost the whole hold, not a multiple.
        assert during < before * 5 + 0.01, (before, during)
        assert backstop(gw.state_dir, "deny", str(second.id), "--reason", "no").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            also_held.result(20)
        assert not held.done()
        assert backstop(gw.state_dir, "approve", str(first.id)).returncode == 0
        assert held.result(20).rowcount == 1
    assert ids(pg, victims) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 200]


# ----------------------------------------------------------------------------- operator view


def test_pending_and_show_describe_the_held_statement(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    delete = f"DELETE FROM {victims} WHERE id <= 2"
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        outcome = background(lambda: conn.execute(delete))
        (pending,) = gw.wait_pending()
        listed = backstop(gw.state_dir, "pending", "--json")
        assert listed.returncode == 0, listed.stderr
        (item,) = json.loads(listed.stdout)
        assert item["id"] == pending.id
        assert item["agent"] == "cursor"
        assert item["sql"] == delete
        assert item["operation"] == "DELETE"
        assert item["tables"] == [f"public.{victims}"]
        assert isinstance(item["row_estimate"], int) and 1 <= item["row_estimate"] <= 10
        assert item["status"] == "pending"
        assert item["rule"] == "approve-deletes"
        assert item["audit_key"]
        expires = time.mktime(time.strptime(item["expires_at"][:19], "%Y-%m-%dT%H:%M:%S"))
        left = expires - time.mktime(time.gmtime())
        assert 10 < left <= 21, item["expires_at"]

        text = backstop(gw.state_dir, "pending")
        assert text.returncode == 0, text.stderr
        assert (
            f"#{pending.id} cursor DELETE on public.{victims}, ~{item['row_estimate']} rows"
        ) in text.stdout
        assert delete in text.stdout

        shown = backstop(gw.state_dir, "show", str(pending.id))
        assert shown.returncode == 0, shown.stderr
        assert f"sql: {delete}" in shown.stdout
        assert "status: pending" in shown.stdout
        assert show(gw.state_dir, pending.id) == item

        missing = backstop(gw.state_dir, "show", "99999")
        assert missing.returncode == 1
        assert "there is no approval 99999" in missing.stderr
        assert backstop(gw.state_dir, "deny", str(pending.id), "--reason", "seen").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            outcome.result(20)
    assert json.loads(backstop(gw.state_dir, "pending", "--json").stdout) == []


def test_every_approval_outcome_is_in_the_audit_trail(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals(timeout=2)
    outcomes: dict[int, str] = {}
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        for decision, expected in (("approve", "forwarded"), ("deny", "denied")):
            run = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 10"))
            (pending,) = gw.wait_pending()
            args = ["--reason", "audited"] if decision == "deny" else []
            assert backstop(gw.state_dir, decision, str(pending.id), *args).returncode == 0
            with contextlib.suppress(psycopg.Error):
                run.result(20)
            outcomes[pending.id] = expected
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"DELETE FROM {victims} WHERE id = 1")
        outcomes[max(a.id for a in gw.all())] = "timed_out"
    audited = {}
    for approval_id in outcomes:
        approval = gw.get(approval_id)
        record = gw.audit(approval)
        assert record.key == approval.audit_key
        assert record.approval_id == approval_id
        assert record.decision == "approve"
        assert record.rule == "approve-deletes"
        audited[approval_id] = record.outcome
    # The same trail through the operator's command line.
    listed = json.loads(backstop(gw.state_dir, "audit", "--json", "--table", victims).stdout)
    by_approval = {r["approval_id"]: r["outcome"] for r in listed if r["approval_id"]}
    assert by_approval == audited
    assert audited == outcomes


# ----------------------------------------------------------------------------- webhook


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(  # type: ignore[attr-defined]
            {"content_type": self.headers["Content-Type"], "body": json.loads(body)}
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    received: list[dict[str, Any]] = []
    server.received = received  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/backstop", received
    server.shutdown()
    server.server_close()


def test_webhook_gets_a_json_post_for_each_pending_approval(
    pg: PgServer,
    approvals: Callable[..., Approvals],
    victims: str,
    webhook: tuple[str, list[dict[str, Any]]],
) -> None:
    url, received = webhook
    gw = approvals(webhook=url)
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        outcome = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 3"))
        (pending,) = gw.wait_pending()
        wait_until(lambda: received, what="the webhook POST")
        assert backstop(gw.state_dir, "approve", str(pending.id)).returncode == 0
        assert outcome.result(20).rowcount == 1
    (post,) = received
    assert post["content_type"] == "application/json"
    payload = post["body"]
    assert f"approval {pending.id}" in payload["text"]
    assert f"backstop approve {pending.id}" in payload["text"]
    assert payload["approval_id"] == pending.id
    assert payload["agent"] == "cursor"
    assert payload["operation"] == "DELETE"
    assert payload["tables"] == [f"public.{victims}"]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_broken_webhook_never_blocks_the_statement(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str, kind: str
) -> None:
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        if kind == "silent":
            sink.listen(16)  # accepts connections in the kernel, never answers
        else:
            sink.close()  # nothing listens: connections are refused
        gw = approvals(webhook=f"http://127.0.0.1:{port}/hook")
        with psycopg.connect(gw.dsn, autocommit=True) as conn:
            outcome = background(lambda: conn.execute(f"DELETE FROM {victims} WHERE id = 4"))
            (pending,) = gw.wait_pending()
            started = time.monotonic()
            assert backstop(gw.state_dir, "approve", str(pending.id)).returncode == 0
            assert outcome.result(20).rowcount == 1
            # Below the webhook's own 5 s timeout: the statement never waited for it.
            assert time.monotonic() - started < 4
    assert 4 not in ids(pg, victims)


# ----------------------------------------------------------------------------- auto-approve


def test_auto_approve_window_lets_the_identical_statement_through(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals(window=60)
    delete = f"DELETE FROM {victims} WHERE id = %s"
    with psycopg.connect(gw.dsn, autocommit=True) as conn:
        first_run = background(lambda: conn.execute(delete, (5,)).rowcount)
        (first,) = gw.wait_pending()
        assert backstop(gw.state_dir, "approve", str(first.id)).returncode == 0
        assert first_run.result(20) == 1
        conn.execute(f"INSERT INTO {victims} VALUES (5, 'back')")
        assert background(lambda: conn.execute(delete, (5,)).rowcount).result(10) == 1
        assert len(gw.all()) == 1  # no second approval was asked for

        other_params = background(lambda: conn.execute(delete, (6,)).rowcount)
        (asked,) = gw.wait_pending()
        assert backstop(gw.state_dir, "deny", str(asked.id), "--reason", "no").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            other_params.result(20)
    conn_other = psycopg.connect(gw.gateway.dsn(application_name="other-agent"), autocommit=True)
    with conn_other:
        conn_other.execute(f"INSERT INTO {victims} VALUES (5, 'back again')")
        other_agent = background(lambda: conn_other.execute(delete, (5,)).rowcount)
        (asked,) = gw.wait_pending()
        assert asked.agent == "other"
        assert backstop(gw.state_dir, "deny", str(asked.id), "--reason", "no").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            other_agent.result(20)
    assert ids(pg, victims) == ALL

    runtime = gw.gateway.runtime
    assert runtime is not None and runtime.store is not None
    store = runtime.store
    auto = wait_until(
        lambda: [
            r
            for r in gw.gateway.call(store.audit_query(limit=50, table=victims))
            if r.rule.startswith("auto-approved") and r.outcome
        ],
        what="the auto-approved audit row",
    )
    (row,) = auto
    assert row.rule == f"auto-approved:{first.id}"
    assert row.outcome == "forwarded"
    assert "approved again automatically" in row.reason


def test_auto_approve_window_covers_the_parameters_of_a_batch(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    """An approved executemany of ids 1 and 2 does not approve the same SQL for ids 3 and 4."""
    gw = approvals(window=60)
    delete = f"DELETE FROM {victims} WHERE id = $1"

    async def run() -> None:
        conn = await asyncpg.connect(gw.dsn)
        try:
            task = asyncio.ensure_future(conn.executemany(delete, [(1,), (2,)]))
            (first,) = await asyncio.to_thread(gw.wait_pending)
            decided = await asyncio.to_thread(backstop, gw.state_dir, "approve", str(first.id))
            assert decided.returncode == 0
            await asyncio.wait_for(task, 20)
            other = asyncio.ensure_future(conn.executemany(delete, [(3,), (4,)]))
            try:
                (asked,) = await asyncio.to_thread(gw.wait_pending, 1, 3)
            finally:
                if not other.done():
                    pending = [a for a in gw.all() if a.status == "pending"]
                    for approval in pending:
                        await asyncio.to_thread(
                            backstop, gw.state_dir, "deny", str(approval.id), "--reason", "no"
                        )
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(other, 20)
            assert asked.id != first.id
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    finally:
        assert ids(pg, victims) == list(range(3, 11))


# ----------------------------------------------------------------------------- SQL path


def test_nothing_on_the_sql_path_can_approve(
    pg: PgServer, approvals: Callable[..., Approvals], victims: str
) -> None:
    gw = approvals()
    db_file = gw.state_dir / "backstop.db"
    with psycopg.connect(gw.dsn, autocommit=True) as holder:
        held = background(lambda: holder.execute(f"DELETE FROM {victims} WHERE id = 1"))
        (pending,) = gw.wait_pending()
        with psycopg.connect(gw.dsn, autocommit=True) as agent:
            text = f"backstop approve {pending.id}"
            assert agent.execute(f"SELECT '{text}'").fetchone() == (text,)
            agent.execute(f"NOTIFY backstop, '{text}'")
            agent.execute(f"SET application_name = '{text}'")
            for attempt in (
                f"COPY (SELECT 'approved') TO '{db_file}'",
                f"COPY {victims} FROM PROGRAM 'sqlite3 {db_file} \"UPDATE approvals "
                "SET status = ''approved''\"'",
                f"SELECT lo_export(lo_from_bytea(0, 'approved'), '{db_file}')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    agent.execute(attempt)
        time.sleep(0.2)  # several poll intervals
        assert not held.done()
        assert gw.get(pending.id).status == "pending"
        assert show(gw.state_dir, pending.id)["status"] == "pending"
        assert backstop(gw.state_dir, "deny", str(pending.id), "--reason", "no").returncode == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            held.result(20)
    assert ids(pg, victims) == ALL
