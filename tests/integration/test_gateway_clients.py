"""Real clients through the gateway: psql, psycopg 3, asyncpg and pgbench, unchanged."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import MD5_ROLE, PASSWORD_ROLE, SCRAM_ROLE, PgServer, TlsFiles
from tests.gateway_harness import GatewayThread

pytestmark = pytest.mark.integration


def tool(pg: PgServer, name: str) -> str:
    if pg.bin_dir is not None and (pg.bin_dir / name).exists():
        return str(pg.bin_dir / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def psql(
    pg: PgServer, dsn: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(pg, "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", dsn, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def table(relay: GatewayThread) -> str:
    name = f"gw_{int(time.time() * 1e6)}"
    with psycopg.connect(relay.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    return name


# ----------------------------------------------------------------------------- psql


def test_psql_command(pg: PgServer, relay: GatewayThread) -> None:
    result = psql(pg, relay.dsn(), "-c", "SELECT 40 + 2, current_user")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42|postgres"


def test_psql_file_with_several_statements(
    pg: PgServer, relay: GatewayThread, tmp_path: Path, table: str
) -> None:
    script = tmp_path / "script.sql"
    script.write_text(
        f"INSERT INTO {table} VALUES (1, 'one');\n"
        f"INSERT INTO {table} VALUES (2, 'two'), (3, 'three');\n"
        f"UPDATE {table} SET note = upper(note) WHERE id = 2;\n"
        f"SELECT id, note FROM {table} ORDER BY id;\n"
    )
    result = psql(pg, relay.dsn(), "-f", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == ["1|one", "2|TWO", "3|three"]


def test_psql_copy_both_ways(
    pg: PgServer, relay: GatewayThread, tmp_path: Path, table: str
) -> None:
    source = tmp_path / "in.csv"
    source.write_text("".join(f"{i},row {i}\n" for i in range(1, 5001)))
    loaded = psql(pg, relay.dsn(), "-c", f"\\copy {table} FROM '{source}' WITH (FORMAT csv)")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "COPY 5000"
    target = tmp_path / "out.csv"
    dumped = psql(
        pg,
        relay.dsn(),
        "-c",
        f"\\copy (SELECT * FROM {table} ORDER BY id) TO '{target}' WITH (FORMAT csv)",
    )
    assert dumped.returncode == 0, dumped.stderr
    assert target.read_text() == source.read_text()


def test_psql_sees_server_errors_and_goes_on(pg: PgServer, relay: GatewayThread) -> None:
    result = subprocess.run(
        [tool(pg, "psql"), "-X", "-At", relay.dsn()],
        input="SELECT 1/0;\nSELECT 'still here';\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "division by zero" in result.stderr
    assert result.stdout.strip() == "still here"


# ----------------------------------------------------------------------------- psycopg 3


def test_psycopg_simple_and_extended(relay: GatewayThread, table: str) -> None:
    with psycopg.connect(relay.dsn()) as conn:
        with psycopg.ClientCursor(conn) as cur:  # simple query protocol
            cur.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "simple"))
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (2, "extended"))
        conn.commit()
        rows = conn.execute(
            f"SELECT id, note FROM {table} WHERE id >= %s ORDER BY id", (1,)
        ).fetchall()
    assert rows == [(1, "simple"), (2, "extended")]


def test_psycopg_pipeline(relay: GatewayThread, table: str) -> None:
    with psycopg.connect(relay.dsn()) as conn:
        with conn.pipeline():
            for i in range(200):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"p{i}"))
            cur = conn.execute(f"SELECT count(*), sum(id) FROM {table}")
        assert cur.fetchone() == (200, sum(range(200)))


def test_psycopg_copy(relay: GatewayThread, table: str) -> None:
    with psycopg.connect(relay.dsn()) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {table} (id, note) FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((i, f"c{i}"))
        with cur.copy(f"COPY (SELECT id, note FROM {table} ORDER BY id) TO STDOUT") as copy:
            rows = list(copy.rows())
    assert len(rows) == 1000
    assert rows[999] == ("999", "c999")


def test_psycopg_listen_notify(relay: GatewayThread) -> None:
    with (
        psycopg.connect(relay.dsn(), autocommit=True) as listener,
        psycopg.connect(relay.dsn(), autocommit=True) as sender,
    ):
        listener.execute("LISTEN backstop_test")
        sender.execute("NOTIFY backstop_test, 'hello through the gateway'")
        notes = []
        for note in listener.notifies(timeout=5):
            notes.append(note)
            break
    assert notes and notes[0].payload == "hello through the gateway"


def test_psycopg_cancel_long_query(relay: GatewayThread) -> None:
    with psycopg.connect(relay.dsn()) as conn:
        # cancel_safe: the blocking cancel() holds the GIL, and this gateway runs in-process
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 10
        conn.rollback()
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


# ----------------------------------------------------------------------------- asyncpg


def test_asyncpg_prepared_copy_and_timeout(relay: GatewayThread, table: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(relay.dsn())
        try:
            statement = await conn.prepare(f"SELECT note FROM {table} WHERE id = $1")
            await conn.copy_records_to_table(
                table, records=[(i, f"a{i}") for i in range(500)], columns=["id", "note"]
            )
            assert await statement.fetchval(42) == "a42"
            assert await statement.fetchval(499) == "a499"
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
            assert time.monotonic() - started < 10
            assert await conn.fetchval("SELECT count(*) FROM " + table) == 500
            await conn.execute("SET statement_timeout = '200ms'")
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute("SELECT pg_sleep(5)")
        finally:
            await conn.close()

    asyncio.run(run())


# ----------------------------------------------------------------------------- pgbench


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(pg: PgServer, relay: GatewayThread, fresh_db: str, mode: str) -> None:
    database = fresh_db.rsplit("/", 1)[1].split("?")[0]
    dsn = relay.dsn(database=database)
    init = subprocess.run(
        [tool(pg, "pgbench"), "-i", "-q", "-s", "1", dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    run = subprocess.run(
        [tool(pg, "pgbench"), "-n", "-S", "-c", "4", "-j", "2", "-t", "300", "-M", mode, dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "number of transactions actually processed: 1200/1200" in run.stdout
    assert "number of failed transactions: 0" in run.stdout


# ------------------------------------------------------------------ authentication, TLS


@pytest.mark.parametrize("role", [SCRAM_ROLE, MD5_ROLE, PASSWORD_ROLE], ids=lambda r: r.hba_method)
def test_password_logins_are_relayed(pg: PgServer, relay: GatewayThread, role) -> None:  # type: ignore[no-untyped-def]
    if not pg.managed:
        pytest.skip("needs the throwaway server's pg_hba.conf")
    with psycopg.connect(relay.dsn(user=role.name, password=role.password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role.name,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(relay.dsn(user=role.name, password="wrong"))


def test_client_tls(
    pg: PgServer, gateway_factory: Callable[..., GatewayThread], tls_files: TlsFiles
) -> None:
    gateway = gateway_factory(
        pass_through=True, tls_cert=tls_files.server_cert, tls_key=tls_files.server_key
    )
    dsn = gateway.dsn(sslmode="verify-full", sslrootcert=str(tls_files.ca_cert))
    dsn = dsn.replace("sslmode=disable&", "")
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 'over tls'").fetchone() == ("over tls",)
    result = psql(
        pg,
        gateway.dsn(user=SCRAM_ROLE.name, password=SCRAM_ROLE.password).replace(
            "sslmode=disable", "sslmode=require&channel_binding=disable"
        ),
        "-c",
        "SELECT current_user",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SCRAM_ROLE.name


def test_upstream_tls(
    pg: PgServer, gateway_factory: Callable[..., GatewayThread], tls_files: TlsFiles
) -> None:
    if not pg.ssl:
        pytest.skip("the server has no TLS")
    gateway = gateway_factory(
        pass_through=True, upstream_sslmode="verify-full", upstream_sslrootcert=tls_files.ca_cert
    )
    with psycopg.connect(gateway.dsn()) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)
    with psycopg.connect(gateway.dsn(user=SCRAM_ROLE.name, password=SCRAM_ROLE.password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (SCRAM_ROLE.name,)


# ----------------------------------------------------------------------------- failure


def test_unreachable_upstream_gives_a_clear_error(
    gateway_factory: Callable[..., GatewayThread],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    gateway = gateway_factory(
        pass_through=True, upstream=f"postgresql://postgres@127.0.0.1:{dead}/postgres"
    )
    with pytest.raises(psycopg.OperationalError, match="not reachable"):
        psycopg.connect(gateway.dsn(), connect_timeout=10)


def test_upstream_restart(private_pg, gateway_factory: Callable[..., GatewayThread]) -> None:  # type: ignore[no-untyped-def]
    info = private_pg.info
    gateway = gateway_factory(pass_through=True, upstream=info.dsn())
    conn = psycopg.connect(gateway.dsn(), autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    private_pg.stop_server_only()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match="not reachable"):
        psycopg.connect(gateway.dsn(), connect_timeout=10)
    private_pg.start_server_only()
    with psycopg.connect(gateway.dsn()) as again:
        assert again.execute("SELECT 'back'").fetchone() == ("back",)


def _raw_error(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_oversized_startup_packet_is_refused(relay: GatewayThread) -> None:
    reply = _raw_error(relay.port, struct.pack("!ii", 20000, 196608) + b"x" * 100)
    assert reply.startswith(b"E")
    assert b"invalid startup packet length" in reply
    with psycopg.connect(relay.dsn()) as conn:  # the gateway keeps serving
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_huge_declared_length_is_refused_without_buffering(relay: GatewayThread) -> None:
    startup = struct.pack("!i", 196608) + b"user\x00postgres\x00database\x00postgres\x00\x00"
    packet = struct.pack("!i", len(startup) + 4) + startup
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(packet)
        buffer = b""
        while not buffer.endswith(b"Z\x00\x00\x00\x05I"):
            buffer += sock.recv(65536)
        sock.sendall(b"Q" + struct.pack("!i", 0x7FFFFFF0) + b"SELECT")
        reply = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"E")
    assert b"outside" in reply


def test_unknown_message_type_is_refused(relay: GatewayThread) -> None:
    startup = struct.pack("!i", 196608) + b"user\x00postgres\x00database\x00postgres\x00\x00"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(struct.pack("!i", len(startup) + 4) + startup)
        buffer = b""
        while not buffer.endswith(b"Z\x00\x00\x00\x05I"):
            buffer += sock.recv(65536)
        sock.sendall(b"\x07\x00\x00\x00\x04")
        reply = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"E")
    assert b"invalid frontend message type" in reply
