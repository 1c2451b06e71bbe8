"""Approval workflow: how fast an operator's decision reaches the waiting client, and what
held statements cost everyone else.

    python bench/bench_approvals.py [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
        [--rounds 20] [--held 50] [--seconds 5] [--clients 4]

Without --dsn a throwaway PostgreSQL is started. The gateway runs as its own process
(`backstop-tui --no-ui`) with a policy that holds every DELETE for approval, on a state
directory of its own; the operator is the real `backstop` command in another process.

1. Decision latency, median of --rounds: a raw-socket client sends a DELETE and waits (it has
   the approval's NoticeResponse); the clock starts when `backstop approve ID` is started and
   stops at the first byte of the result at the client. Split into the CLI process itself
   (start to commit) and commit to first result byte (the gateway's poll of the store plus
   forwarding). Target: <= 250 ms end to end.
2. Throughput of allowed statements (pgbench -S) with 0 and with --held approvals pending
   (one client per held DELETE). Rounds alternate so drift affects both alike. Target: the
   ratio is ~1.0.

The waiting clients speak the protocol on raw sockets, so the timestamps are the bytes'
arrival; they authenticate with trust, password or md5 (not SCRAM).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TABLE = "bench_approvals"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def gateway_process(cmd: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def backstop(state_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backstop_core.cli", *args, "--state-dir", state_dir],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ----------------------------------------------------------------------------- raw client


class RawClient:
    """A PostgreSQL client on a plain socket: just enough protocol to time bytes."""

    def __init__(self, port: int, user: str, database: str, password: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        body = struct.pack("!i", 196608)
        for key, value in (("user", user), ("database", database)):
            body += key.encode() + b"\x00" + value.encode() + b"\x00"
        body += b"\x00"
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            kind, payload = self.message()
            if kind == b"R":
                self._authenticate(payload, user, password)
            elif kind == b"E":
                raise RuntimeError(f"login failed: {payload!r}")
            elif kind == b"Z":
                return

    def _authenticate(self, payload: bytes, user: str, password: str | None) -> None:
        (code,) = struct.unpack_from("!i", payload)
        if code == 0:
            return
        if password is None:
            raise RuntimeError("the server asks for a password and the DSN has none")
        if code == 3:
            secret = password.encode()
        elif code == 5:
            inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
            secret = b"md5" + hashlib.md5(inner + payload[4:8]).hexdigest().encode()
        else:
            raise RuntimeError(f"authentication method {code} is not supported here (use md5)")
        self.sock.sendall(b"p" + struct.pack("!i", len(secret) + 5) + secret + b"\x00")

    def _fill(self) -> float:
        data = self.sock.recv(65536)
        arrived = time.perf_counter()
        if not data:
            raise RuntimeError("the gateway closed the connection")
        self.buffer += data
        return arrived

    def message(self) -> tuple[bytes, bytes]:
        while len(self.buffer) < 5:
            self._fill()
        (length,) = struct.unpack_from("!i", self.buffer, 1)
        while len(self.buffer) < 1 + length:
            self._fill()
        kind, payload = self.buffer[:1], self.buffer[5 : 1 + length]
        self.buffer = self.buffer[1 + length :]
        return kind, payload

    def query(self, sql: str) -> None:
        data = sql.encode() + b"\x00"
        self.sock.sendall(b"Q" + struct.pack("!i", len(data) + 4) + data)

    def wait_for_approval_notice(self) -> int:
        """Read until the gateway's NoticeResponse naming the approval; return its id."""
        while True:
            kind, payload = self.message()
            if kind == b"N":
                match = re.search(rb"waiting for approval (\d+)", payload)
                if match:
                    return int(match.group(1))
            elif kind in (b"E", b"Z"):
                raise RuntimeError(f"the statement was not held: {kind!r} {payload!r}")

    def first_byte(self) -> tuple[float, float]:
        """(perf_counter, wall clock) of the next bytes to arrive."""
        if self.buffer:
            return time.perf_counter(), time.time()
        arrived = self._fill()
        return arrived, time.time() - (time.perf_counter() - arrived)

    def finish(self) -> bytes:
        """Read to ReadyForQuery; the command tag (or error) of the statement."""
        tag = b""
        while True:
            kind, payload = self.message()
            if kind in (b"C", b"E"):
                tag = payload
            elif kind == b"Z":
                return tag

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"X\x00\x00\x00\x04")
        self.sock.close()


# ----------------------------------------------------------------------------- measurements


def decision_latency(
    port: int, user: str, database: str, password: str | None, state_dir: str, rounds: int
) -> dict[str, list[float]]:
    client = RawClient(port, user, database, password)
    results: dict[str, list[float]] = {"total": [], "cli": [], "commit_to_result": []}
    try:
        for number in range(rounds + 2):  # two warm-up rounds
            client.query(f"DELETE FROM {TABLE} WHERE id = {number + 1}")
            approval = client.wait_for_approval_notice()
            started = time.perf_counter()
            operator = subprocess.Popen(
                [
                    sys.executable, "-m", "backstop_core.cli", "approve", str(approval),
                    "--state-dir", state_dir,
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            arrived, arrived_wall = client.first_byte()
            _, err = operator.communicate(timeout=60)
            if operator.returncode != 0:
                raise RuntimeError(f"backstop approve failed: {err.decode()}")
            tag = client.finish()
            if not tag.startswith(b"DELETE 1"):
                raise RuntimeError(f"unexpected result {tag!r}")
            shown = json.loads(backstop(state_dir, "show", str(approval), "--json").stdout)
            committed = datetime.fromisoformat(shown["decided_at"]).timestamp()
            if number < 2:
                continue
            results["total"].append(arrived - started)
            results["commit_to_result"].append(arrived_wall - committed)
            results["cli"].append((arrived - started) - (arrived_wall - committed))
    finally:
        client.close()
    return results


def pgbench(dsn: str, seconds: int, clients: int) -> float:
    out = subprocess.run(
        ["pgbench", "-n", "-S", "-c", str(clients), "-j", "2", "-T", str(seconds), dsn],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    if not match:
        raise RuntimeError(out)
    return float(match.group(1))


@contextlib.contextmanager
def held_deletes(
    count: int, port: int, user: str, database: str, password: str | None, state_dir: str
) -> Iterator[list[int]]:
    """`count` clients, each with a DELETE waiting for approval; denied on the way out."""
    clients: list[RawClient] = []
    approvals: list[int] = []
    try:
        for number in range(count):
            client = RawClient(port, user, database, password)
            clients.append(client)
            client.query(f"DELETE FROM {TABLE} WHERE id = {100000 + number}")
            approvals.append(client.wait_for_approval_notice())
        pending = json.loads(backstop(state_dir, "pending", "--json").stdout)
        if len(pending) != count:
            raise RuntimeError(f"expected {count} pending approvals, found {len(pending)}")
        yield approvals
    finally:
        asyncio.run(deny_all(state_dir, approvals))
        for client in clients:
            with contextlib.suppress(OSError, RuntimeError):
                client.finish()
            client.close()


async def deny_all(state_dir: str, approvals: list[int]) -> None:
    """The operator denies every held statement (one process instead of one per id)."""
    from backstop_core.store import Store, StoreError

    store = await Store.open(Path(state_dir))
    try:
        for approval in approvals:
            with contextlib.suppress(StoreError):
                await store.approval_decide(
                    approval, approve=False, decided_by="bench", reason="benchmark round over"
                )
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dsn")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--held", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2, help="pgbench runs per condition")
    args = parser.parse_args()

    local = None
    dsn = args.dsn
    if dsn is None:
        from backstop_core.localpg import LocalPostgres

        local = LocalPostgres(settings={"max_connections": str(args.held + 50)})
        dsn = local.start().dsn(database="postgres")
    try:
        run(dsn, args)
    finally:
        if local is not None:
            local.stop()


def run(dsn: str, args: argparse.Namespace) -> None:
    import psycopg

    parts = urlsplit(dsn)
    user = unquote(parts.username or "postgres")
    password = unquote(parts.password) if parts.password else None
    database = unquote(parts.path.lstrip("/")) or user
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, note text)")
        conn.execute(f"INSERT INTO {TABLE} SELECT i, 'row' FROM generate_series(1, 200000) i")
        conn.execute(f"ANALYZE {TABLE}")
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", dsn], check=True, capture_output=True)

    state_dir = tempfile.mkdtemp(prefix="backstop-bench-approvals-")
    atexit.register(shutil.rmtree, state_dir, ignore_errors=True)
    policy = Path(state_dir) / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "defaults": {
                    "LOW": "allow",
                    "MEDIUM": "allow",
                    "HIGH": "approve",
                    "CRITICAL": "block",
                },
                "rules": [
                    {
                        "name": "approve-deletes",
                        "match": {"operation": "DELETE"},
                        "action": "approve",
                    }
                ],
                "approval": {"timeout_seconds": 900},
            }
        )
    )
    port = free_port()
    cmd = [
        sys.executable, "-m", "backstop_tui.main", "--no-ui",
        "--upstream", dsn, "--upstream-sslmode", "disable",
        "--listen", f"127.0.0.1:{port}",
        "--state-dir", state_dir, "--policy", str(policy),
    ]  # fmt: skip
    auth = parts.username or "postgres"
    if parts.password:
        auth += f":{parts.password}"
    gateway_dsn = f"postgresql://{auth}@127.0.0.1:{port}/{parts.path.lstrip('/')}?sslmode=disable"

    tps: dict[str, list[float]] = {"0 pending": [], f"{args.held} pending": []}
    try:
        with gateway_process(cmd, port):
            latency = decision_latency(port, user, database, password, state_dir, args.rounds)
            pgbench(gateway_dsn, 1, args.clients)  # warm-up: connections, caches, plans
            for _ in range(args.repeat):
                tps["0 pending"].append(pgbench(gateway_dsn, args.seconds, args.clients))
                with held_deletes(args.held, port, user, database, password, state_dir):
                    tps[f"{args.held} pending"].append(
                        pgbench(gateway_dsn, args.seconds, args.clients)
                    )
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)

    def ms(values: list[float]) -> str:
        ordered = sorted(values)
        p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
        return (
            f"median {statistics.median(values) * 1000:6.1f} ms   p90 {p90 * 1000:6.1f} ms   "
            f"max {max(values) * 1000:6.1f} ms"
        )

    total = statistics.median(latency["total"])
    print(f"Approval decision latency, {len(latency['total'])} rounds (target <= 250 ms):")
    print(f"  `backstop approve` started -> first result byte  {ms(latency['total'])}")
    print(f"    CLI process: start -> decision committed     {ms(latency['cli'])}")
    print(f"    decision committed -> first result byte      {ms(latency['commit_to_result'])}")
    print(f"  verdict: {'OK' if total <= 0.25 else 'OVER TARGET'} ({total * 1000:.0f} ms)")
    base = statistics.median(tps["0 pending"])
    held = statistics.median(tps[f"{args.held} pending"])
    print(
        f"Allowed-statement throughput, pgbench -S -c {args.clients} -j 2, "
        f"{args.repeat}x{args.seconds}s per condition (target ratio ~1.0):"
    )
    for name, values in tps.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:>11}: {statistics.median(values):8.0f} tps  (runs: {runs})")
    print(f"  ratio {args.held} pending / 0 pending: {held / base:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
