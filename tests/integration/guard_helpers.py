"""Shared by the guard, audit and CLI tests: policy files, tables made beside the gateway,
psql, a bare protocol client, and audit look-ups."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from backstop_core.events import Event
from backstop_core.store import AuditRecord
from tests.conftest import PgServer
from tests.gateway_harness import GatewayThread

REPO = Path(__file__).resolve().parents[2]
ALLOW_ALL = {"LOW": "allow", "MEDIUM": "allow", "HIGH": "allow", "CRITICAL": "allow"}


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def write_policy(path: Path, doc: Mapping[str, Any] | str) -> Path:
    """Write a policy file the way an editor saves one: a new file renamed over the old."""
    text = doc if isinstance(doc, str) else json.dumps(doc, indent=2)
    temporary = path.with_name(path.name + f".{uuid.uuid4().hex[:6]}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def policy_file(
    directory: Path,
    rules: Sequence[Mapping[str, Any]] = (),
    *,
    defaults: Mapping[str, str] = ALLOW_ALL,
    **sections: Any,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_policy(
        directory / "policy.json", {"defaults": dict(defaults), "rules": list(rules), **sections}
    )


def upstream(pg: PgServer, sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
    """Run SQL on PostgreSQL directly, not through any gateway."""
    with psycopg.connect(pg.dsn(database=database), autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def count(pg: PgServer, table: str, database: str | None = None) -> int:
    return int(upstream(pg, f"SELECT count(*) FROM {table}", database)[0][0])


def table_exists(pg: PgServer, table: str, database: str | None = None) -> bool:
    rows = upstream(pg, f"SELECT to_regclass('{table}') IS NOT NULL", database)
    return bool(rows[0][0])


@contextlib.contextmanager
def role_reading_backslashes(pg: PgServer) -> Iterator[str]:
    """A login role whose own default turns standard_conforming_strings off, as a DBA
    might set it directly on the server."""
    role = unique("lax")
    upstream(pg, f"CREATE ROLE {role} LOGIN")
    upstream(pg, f"ALTER ROLE {role} SET standard_conforming_strings = off")
    try:
        yield role
    finally:
        upstream(pg, f"DROP OWNED BY {role}; DROP ROLE {role}")


def tool(pg: PgServer, name: str) -> str:
    if pg.bin_dir is not None and (pg.bin_dir / name).exists():
        return str(pg.bin_dir / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def psql(
    pg: PgServer,
    dsn: str,
    *args: str,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """psql without ~/.psqlrc, unaligned and tuples only; does not stop at errors."""
    return subprocess.run(
        [tool(pg, "psql"), "-X", "-At", dsn, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def audit(gateway: GatewayThread, **filters: Any) -> list[AuditRecord]:
    """The gateway's audit trail, newest first, with everything journalled so far."""
    runtime = gateway.runtime
    assert runtime is not None and runtime.store is not None
    filters.setdefault("limit", 1000)
    return gateway.call(runtime.store.audit_query(**filters))


def audit_where(
    gateway: GatewayThread,
    accept: Callable[[AuditRecord], bool],
    *,
    finished: bool = True,
    timeout: float = 5.0,
    **filters: Any,
) -> list[AuditRecord]:
    """Audit rows that satisfy `accept`, once they have an outcome (outcomes are buffered)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in audit(gateway, **filters) if accept(r)]
        if rows and (not finished or all(r.outcome is not None for r in rows)):
            return rows
        if time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


E = TypeVar("E", bound=Event)


def wait_for_event(
    gateway: GatewayThread, kind: type[E], after: int = 0, timeout: float = 10.0
) -> E | None:
    """The first event of `kind` published after the first `after` ones."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in gateway.events[after:]:
            if isinstance(event, kind):
                return event
        time.sleep(0.05)
    return None


# ------------------------------------------------------------------ a bare protocol client


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


class RawClient:
    """The v3 protocol by hand, for what no driver sends: several Query messages written
    at once, without waiting for the first answer (the protocol allows it)."""

    def __init__(self, port: int, user: str = "postgres", database: str = "postgres") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        params = f"user\x00{user}\x00database\x00{database}\x00\x00".encode()
        startup = struct.pack("!i", 196608) + params
        self.sock.sendall(struct.pack("!i", len(startup) + 4) + startup)
        self.read_until_ready(1)

    def read_until_ready(self, count: int) -> list[tuple[str, bytes]]:
        messages: list[tuple[str, bytes]] = []
        buffer = b""
        ready = 0
        while ready < count:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            buffer += data
            while len(buffer) >= 5:
                (length,) = struct.unpack("!i", buffer[1:5])
                if len(buffer) < 1 + length:
                    break
                kind, body = chr(buffer[0]), buffer[5 : 1 + length]
                buffer = buffer[1 + length :]
                messages.append((kind, body))
                if kind == "Z":
                    ready += 1
                elif kind == "R" and body[:4] != b"\x00\x00\x00\x00":
                    raise ConnectionError("the test role needs trust authentication")
        return messages

    def queries_at_once(self, *sql: str) -> list[tuple[str, bytes]]:
        self.sock.sendall(b"".join(_message(b"Q", s.encode() + b"\x00") for s in sql))
        return self.read_until_ready(len(sql))

    def close(self) -> None:
        try:
            self.sock.sendall(_message(b"X", b""))
        finally:
            self.sock.close()


def error_messages(messages: Sequence[tuple[str, bytes]]) -> list[str]:
    out = []
    for kind, body in messages:
        if kind == "E":
            fields = dict(
                (part[:1].decode(), part[1:].decode("utf-8", "replace"))
                for part in body.split(b"\x00")
                if part
            )
            out.append(fields.get("M", ""))
    return out


# ------------------------------------------------------------------ subprocesses


def backstop_cli(
    *args: str,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """`backstop ARGS` as an operator runs it, with only the given BACKSTOP_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTOP_")}
    return subprocess.run(
        [sys.executable, "-m", "backstop_core.cli", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
    )
