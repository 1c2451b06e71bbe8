"""The runtime as an operator sees it: `backstop status` and Prometheus metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from backstop_core.store import DB_NAME
from tests.gateway_harness import GatewayThread

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backstop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backstop_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_metrics_count_statements_by_decision_and_risk(
    gateway_factory: Callable[..., GatewayThread],
) -> None:
    port = free_port()
    gateway = gateway_factory(metrics=f"127.0.0.1:{port}")
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP SCHEMA public CASCADE")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'backstop_statements_total{action="allow",risk="LOW"} 3.0' in body
    assert 'backstop_statements_total{action="block",risk="CRITICAL"} 1.0' in body
    assert "backstop_decision_seconds_bucket" in body


def test_status_reports_the_running_instance(
    gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    gateway = gateway_factory(state_dir=state)
    deadline = time.monotonic() + 10
    while not (state / "status.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with psycopg.connect(gateway.dsn()):
        time.sleep(2.5)  # one status report later the session is counted
        result = backstop("status", "--json", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["running"] is True
    assert status["listen"] == f"127.0.0.1:{gateway.port}"
    assert status["upstream_reachable"] is True
    assert status["sessions"] == 1
    assert status["pending_approvals"] == 0
    gateway.stop()
    stopped = backstop("status", "--state-dir", str(state))
    assert stopped.returncode == 1
    assert "no Backstop instance is running" in stopped.stderr


def test_a_busy_metrics_port_stops_start_up_with_a_clear_message(
    gateway_factory: Callable[..., GatewayThread],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(Exception, match="metrics: cannot listen"):
            gateway_factory(metrics=f"127.0.0.1:{port}")


def test_the_audit_ingest_process_is_restarted_when_it_dies(
    gateway_factory: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    """The gateway leaves moving the journal into SQLite to a child process; if that dies,
    another takes over and statements still reach the audit database."""
    state = tmp_path / "state"
    gateway = gateway_factory(state_dir=state)
    runtime = gateway.runtime
    assert runtime is not None and runtime._ingester is not None
    first = runtime._ingester.pid
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while runtime._ingester is None or runtime._ingester.pid == first:
        assert time.monotonic() < deadline, "no new ingest process"
        time.sleep(0.05)
    marker = f"ingested-{time.monotonic_ns()}"
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        conn.execute(f"SELECT '{marker}'")
    # Read SQLite directly: the gateway itself never ingests while its child does.
    while True:
        with contextlib.closing(sqlite3.connect(state / DB_NAME)) as db:
            (found,) = db.execute(
                "SELECT count(*) FROM audit_events WHERE sql LIKE ?", (f"%{marker}%",)
            ).fetchone()
        if found:
            break
        assert time.monotonic() < deadline + 15, "the statement never reached the audit database"
        time.sleep(0.1)
