"""The gateway's own questions to PostgreSQL, on control connections beside the sessions:
row estimates (EXPLAIN, never ANALYZE), table sizes, and the WAL position.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from backstop_core.classify import Classification
from backstop_core.config import UpstreamDSN

log = logging.getLogger("backstop.estimate")


@dataclass(frozen=True, slots=True)
class Estimate:
    rows: int | None
    table_rows: int | None
    note: str | None = None  # why there is no estimate, when there is none


def with_estimate(statement: Classification, estimate: Estimate) -> Classification:
    """The statement's classification with the planner's estimate and why, for the policy."""
    reasons = statement.reasons
    if estimate.note:
        reasons = (*reasons, estimate.note)
    elif estimate.rows is not None:
        reasons = (*reasons, f"PostgreSQL estimates {estimate.rows:,} rows")
    return replace(
        statement, row_estimate=estimate.rows, table_rows=estimate.table_rows, reasons=reasons
    )


class ControlConnections:
    """One small asyncpg pool per database, opened on first use."""

    def __init__(self, dsn: UpstreamDSN, *, sslmode: str = "prefer", max_size: int = 4) -> None:
        self.dsn = dsn
        self.sslmode = sslmode
        self.max_size = max_size
        self._pools: dict[str, asyncpg.Pool] = {}
        self._lock = asyncio.Lock()
        self._pids: set[int] = set()

    async def pool(self, database: str | None = None) -> asyncpg.Pool:
        name = database or self.dsn.database or "postgres"
        pool = self._pools.get(name)
        if pool is not None:
            return pool
        async with self._lock:
            pool = self._pools.get(name)
            if pool is None:
                pool = await asyncpg.create_pool(
                    host=self.dsn.host,
                    port=self.dsn.port,
                    user=self.dsn.user or "postgres",
                    password=self.dsn.password,
                    database=name,
                    ssl=self.ssl,
                    min_size=0,
                    max_size=self.max_size,
                    server_settings={"application_name": "backstop-control"},
                    init=self._register,
                )
                self._pools[name] = pool
            return pool

    @property
    def ssl(self) -> Any:
        """asyncpg's `ssl` argument for the configured sslmode."""
        return _ssl_arg(self.sslmode)

    async def _register(self, conn: Any) -> None:
        pid = int(conn.get_server_pid())
        self._pids.add(pid)
        conn.add_termination_listener(lambda _conn: self._pids.discard(pid))

    def pids(self) -> frozenset[int]:
        """Backend pids of Backstop's own control connections (never bypasses)."""
        return frozenset(self._pids)

    async def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, OSError):
                pool.terminate()

    async def table_rows(self, database: str | None, table: str) -> int | None:
        """The planner's idea of a table's size (reltuples), or None."""
        try:
            pool = await self.pool(database)
            value = await pool.fetchval(
                "SELECT c.reltuples::bigint FROM pg_catalog.pg_class c "
                "WHERE c.oid = pg_catalog.to_regclass($1)",
                table,
            )
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            return None
        return int(value) if value is not None and value >= 0 else None

    async def current_lsn(self, database: str | None = None) -> str:
        pool = await self.pool(database)
        value = await pool.fetchval("SELECT pg_catalog.pg_current_wal_lsn()::text")
        return str(value)

    async def estimate(
        self,
        database: str | None,
        sql: str,
        tables: tuple[str, ...],
        *,
        params: tuple[bytes | None, ...] | None = None,
        text_params: bool = True,
        prepared_name: str | None = None,
        execute: str | None = None,
        timeout_ms: int = 200,
    ) -> Estimate:
        """Rows the statement's plan expects to touch, and the first target table's size.

        `sql` is one statement, possibly with $n parameters; or, with `prepared_name`, the
        text of a `PREPARE name AS ...` whose generic plan is estimated.
        """
        try:
            async with asyncio.timeout(timeout_ms / 1000 + 0.5):
                pool = await self.pool(database)
                async with pool.acquire() as conn:
                    return await self._estimate(
                        conn, sql, tables, params, text_params, prepared_name, execute, timeout_ms
                    )
        except TimeoutError:
            return Estimate(None, None, f"no row estimate: EXPLAIN took over {timeout_ms} ms")
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            return Estimate(None, None, f"no row estimate: {exc}")

    async def _estimate(
        self,
        conn: Any,
        sql: str,
        tables: tuple[str, ...],
        params: tuple[bytes | None, ...] | None,
        text_params: bool,
        prepared_name: str | None,
        execute: str | None,
        timeout_ms: int,
    ) -> Estimate:
        table_rows = None
        if tables:
            value = await conn.fetchval(
                "SELECT c.reltuples::bigint FROM pg_catalog.pg_class c "
                "WHERE c.oid = pg_catalog.to_regclass($1)",
                tables[0],
            )
            if value is not None and value >= 0:
                table_rows = int(value)
        name = prepared_name or "backstop_estimate"
        prepare = sql if prepared_name else f"PREPARE backstop_estimate AS {sql}"
        prepared = False
        try:
            async with conn.transaction(readonly=True):
                await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
                await conn.execute(prepare)
                prepared = True
                count = await conn.fetchval(
                    "SELECT pg_catalog.cardinality(parameter_types) "
                    "FROM pg_catalog.pg_prepared_statements WHERE name = $1",
                    name,
                )
                arguments = ""
                if execute is not None:
                    # The client's own EXECUTE with constant arguments: its real plan.
                    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {execute}")
                    count = None
                if count:
                    if params and text_params and len(params) == count:
                        arguments = "(" + ", ".join(_literal(p) for p in params) + ")"
                    else:
                        # No usable values (binary, or none at all): a generic plan does not
                        # look at them, which is what EXPLAIN (GENERIC_PLAN) does in 16+.
                        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                        arguments = "(" + ", ".join("NULL" for _ in range(count)) + ")"
                if execute is None:
                    plan = await conn.fetchval(
                        f"EXPLAIN (FORMAT JSON) EXECUTE {_identifier(name)}{arguments}"
                    )
        except asyncpg.PostgresError as exc:
            return Estimate(None, table_rows, f"no row estimate: {exc}")
        finally:
            if prepared:
                # PREPARE is not transactional: drop it after the transaction, even a failed one.
                with contextlib.suppress(asyncpg.PostgresError):
                    await conn.execute(f"DEALLOCATE {_identifier(name)}")
        return Estimate(_plan_rows(plan), table_rows)


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: bytes | None) -> str:
    if value is None:
        return "NULL"
    text = value.decode("utf-8", "replace").replace("'", "''")
    return f"'{text}'"


def _plan_rows(plan: Any) -> int | None:
    """Rows the statement changes: the input of every ModifyTable node in the plan (a
    data-modifying CTE hides one under a SELECT), else what the top node returns."""
    data = json.loads(plan) if isinstance(plan, str) else plan
    top = data[0]["Plan"]
    changed: int | None = None
    stack = [top]
    while stack:
        node = stack.pop()
        children = node.get("Plans") or []
        if node.get("Node Type") == "ModifyTable":
            source = children[0] if children else node
            changed = (changed or 0) + int(source.get("Plan Rows") or 0)
        stack.extend(children)
    if changed is not None:
        return changed
    rows = top.get("Plan Rows")
    return int(rows) if rows is not None else None


def _ssl_arg(sslmode: str) -> Any:
    if sslmode in ("disable", "allow"):
        return False
    if sslmode == "prefer":
        return "prefer"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
