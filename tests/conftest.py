"""Session fixtures every test builds on: a real PostgreSQL (with TLS and password roles) and,
on request, a real S3 server. Nothing here mocks PostgreSQL.

Set BACKSTOP_TEST_DSN=postgresql://user:pw@host:port/db to run against a server of your own
instead of a throwaway one; tests that must stop or restart the server, or that depend on
the throwaway server's pg_hba.conf, then skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from backstop_core.localpg import (
    LocalPostgres,
    LocalPostgresError,
    Preference,
    find_postgres_bin_dir,
    make_dsn,
    supports_ssl,
)
from backstop_core.native import status as native_status
from backstop_core.s3local import LocalS3, LocalS3Info

EXTERNAL_DSN_ENV = "BACKSTOP_TEST_DSN"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(native_status().describe())  # which build was tested


def pytest_sessionstart(session: pytest.Session) -> None:
    """A compiled module built from an older source would test the old code, not the tree."""
    stale = native_status().stale
    if stale:
        pytest.exit(
            f"compiled modules are older than their source: {', '.join(stale)}. Rebuild them "
            "with `make install` (or `pip install -e .`), or run on the plain sources with "
            "BACKSTOP_PURE=1.",
            returncode=4,
        )


@dataclass(frozen=True)
class LoginRole:
    name: str
    password: str | None
    hba_method: str
    password_encryption: str = "scram-sha-256"


SCRAM_ROLE = LoginRole("scram_user", "scram-secret", "scram-sha-256")
MD5_ROLE = LoginRole("md5_user", "md5-secret", "md5", password_encryption="md5")
PASSWORD_ROLE = LoginRole("pw_user", "pw-secret", "password")
AGENT_ROLE = LoginRole("agent_role", None, "trust")
TEST_ROLES = (SCRAM_ROLE, MD5_ROLE, PASSWORD_ROLE, AGENT_ROLE)


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a certificate signed by it for 127.0.0.1, ::1 and localhost.

    The certificate serves for both server and client authentication, so the gateway can
    present it to its clients as well.
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class PgServer:
    """The session's PostgreSQL: where it is, its superuser, and what it can do."""

    host: str
    port: int
    user: str
    password: str | None
    database: str
    version: str
    bin_dir: Path | None
    data_dir: Path | None
    managed: bool  # started by this session: its pg_hba.conf and restarts are ours
    ssl: bool

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        **params: str,
    ) -> str:
        """A libpq URL: the superuser (with its password) unless another user is named."""
        if user is None:
            user, password = self.user, password if password is not None else self.password
        return make_dsn(self.host, self.port, user, password, database or self.database, **params)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate a CA and a server certificate with the openssl CLI (EC keys: fast)."""
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
        "-subj", "/CN=Backstop Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-new", *curve, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "3650", "-extfile", "server.ext",
        cwd=directory,
    )  # fmt: skip
    for key in ("ca.key", "server.key"):
        (directory / key).chmod(0o600)
    return TlsFiles(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
    )


def _ensure_roles(superuser_dsn: str) -> None:
    """Create (or reset) the login roles the auth tests use."""
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        for role in TEST_ROLES:
            conn.execute(sql.SQL("SET password_encryption = {}").format(role.password_encryption))
            exists = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (role.name,)
            ).fetchone()
            verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
            password = (
                sql.SQL("PASSWORD {}").format(role.password)
                if role.password is not None
                else sql.SQL("PASSWORD NULL")
            )
            conn.execute(
                sql.SQL("{} {} LOGIN {}").format(verb, sql.Identifier(role.name), password)
            )
        conn.execute("RESET password_encryption")


def _hba_lines() -> list[str]:
    return [
        f"host all {role.name} 127.0.0.1/32 {role.hba_method}"
        for role in TEST_ROLES
        if role.hba_method != "trust"
    ]


def _external_server(dsn: str) -> PgServer:
    parts = conninfo_to_dict(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0]).split()[0]  # type: ignore[index]
        ssl = conn.execute("SHOW ssl").fetchone()[0] == "on"  # type: ignore[index]
    try:
        bin_dir: Path | None = find_postgres_bin_dir("auto")
    except LocalPostgresError:
        bin_dir = None
    return PgServer(
        host=str(parts.get("host") or "127.0.0.1"),
        port=int(parts.get("port") or 5432),
        user=str(parts.get("user") or "postgres"),
        password=str(parts["password"]) if parts.get("password") else None,
        database=str(parts.get("dbname") or "postgres"),
        version=version,
        bin_dir=bin_dir,
        data_dir=None,
        managed=False,
        ssl=ssl,
    )


def _session_server_binaries() -> Preference:
    try:
        find_postgres_bin_dir("system")
    except LocalPostgresError:
        return "embedded"
    return "system"


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, and a certificate + key for 127.0.0.1/localhost signed by it."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def _session_postgres(tls_files: TlsFiles) -> Iterator[LocalPostgres | None]:
    """The throwaway server of this session, or None when BACKSTOP_TEST_DSN names one."""
    if os.environ.get(EXTERNAL_DSN_ENV):
        yield None
        return
    prefer = _session_server_binaries()
    with_ssl = supports_ssl(find_postgres_bin_dir(prefer))
    server = LocalPostgres(
        prefer=prefer,
        hba=_hba_lines(),
        settings={"password_encryption": "scram-sha-256"},
        ssl_cert=tls_files.server_cert if with_ssl else None,
        ssl_key=tls_files.server_key if with_ssl else None,
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg(_session_postgres: LocalPostgres | None) -> PgServer:
    """The session's real PostgreSQL, with scram_user, md5_user, pw_user and agent_role."""
    external = os.environ.get(EXTERNAL_DSN_ENV)
    if _session_postgres is None:
        assert external
        server = _external_server(external)
    else:
        info = _session_postgres.info
        server = PgServer(
            host=info.host,
            port=info.port,
            user=info.user,
            password=None,
            database=info.database,
            version=info.version,
            bin_dir=info.bin_dir,
            data_dir=info.data_dir,
            managed=True,
            ssl=_session_postgres.ssl_enabled,
        )
    _ensure_roles(server.dsn())
    return server


@pytest.fixture(scope="session")
def pg_local(_session_postgres: LocalPostgres | None, pg: PgServer) -> LocalPostgres:
    """The controller of the session's server, to stop or restart it; skips on an external one.

    A test that stops the server must start it again before it returns.
    """
    if _session_postgres is None:
        pytest.skip(f"{EXTERNAL_DSN_ENV} names an external server: it cannot be restarted here")
    return _session_postgres


@pytest.fixture
def private_pg() -> Iterator[LocalPostgres]:
    """A started server of the test's own (trust auth), free to stop, restart or break."""
    try:
        find_postgres_bin_dir("auto")
    except LocalPostgresError as exc:
        pytest.skip(str(exc))
    with LocalPostgres(prefer="auto") as server:
        yield server


@pytest.fixture(scope="session")
def pg_dsn(pg: PgServer) -> str:
    """Superuser DSN to the `postgres` database."""
    return pg.dsn(database="postgres")


@pytest.fixture
def fresh_db(pg: PgServer, pg_dsn: str) -> Iterator[str]:
    """A new, empty database for one test; its superuser DSN. Dropped (FORCE) afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg.dsn(database=name)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3Info]:
    """A real S3 server (SeaweedFS) with an empty bucket, started on first use."""
    server = LocalS3()
    try:
        yield server.start()
    finally:
        server.stop()
