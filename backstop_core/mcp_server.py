"""`backstop mcp`: database tools for MCP clients, every statement through the Backstop gateway.

The server connects to PostgreSQL only through the gateway (an asyncpg pool to `--gateway`,
application_name `backstop-mcp`), so each statement an agent runs is classified, decided,
held for approval and audited exactly as any other client's. What the gateway answers is
turned into text an agent can act on: rows as a bounded table, a refusal with its reason,
a wait for approval with its id and how it ended. No tool raises on a database answer.

Tools: query, list_tables, describe_table, explain (never ANALYZE), classify (offline:
what Backstop would decide under this server's policy) and approval_status (reads the
state directory). Transports: stdio (`serve_stdio`) and streamable HTTP (`serve_http`).

The `mcp` package (the `mcp` extra) is imported only when a server is built, so this
module, and the CLI that wires it, import without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from backstop_core.config import (
    Settings,
    SettingsError,
    add_settings_arguments,
    parse_dsn,
    parse_listen,
    settings_from_args,
)

if TYPE_CHECKING:  # the rest is imported on use, so `backstop` starts fast without it
    import asyncpg

    from backstop_core.policy import Policy

__all__ = [
    "APPLICATION_NAME",
    "BackstopTools",
    "McpSettings",
    "add_mcp_arguments",
    "build_server",
    "main",
    "run_from_cli",
    "serve_http",
    "serve_stdio",
]

APPLICATION_NAME = "backstop-mcp"
DEFAULT_ROW_LIMIT = 200
DEFAULT_HTTP = "127.0.0.1:8765"
_CELL_LIMIT = 200
_WAITING = re.compile(r"waiting for approval (\d+)")
_APPROVAL = re.compile(r"approval (\d+)")


@dataclass(frozen=True)
class McpSettings:
    """What the server needs: the gateway to reach and, for the offline tools, the policy
    and the state directory."""

    gateway_dsn: str
    row_limit: int = DEFAULT_ROW_LIMIT
    policy: Path | None = None
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        parse_dsn(self.gateway_dsn)  # raises SettingsError for anything but a postgresql:// URL
        if self.row_limit < 1:
            raise SettingsError("row_limit: must be at least 1")


def _redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    return dsn.replace(f":{parts.password}@", ":***@") if parts.password else dsn


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    text = str(value).replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= _CELL_LIMIT else text[: _CELL_LIMIT - 1] + "…"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines.extend("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)
    return "\n".join(lines)


def _approval_note(notices: Sequence[str], error: str | None) -> str | None:
    """How a wait for approval ended, from the gateway's notice and its answer."""
    approval_id = next((m.group(1) for n in notices if (m := _WAITING.search(n))), None)
    if approval_id is None:
        return None
    if error is None:
        outcome = "approved"
    elif "denied" in error:
        outcome = "denied"
    elif "timed out" in error:
        outcome = "timed out"
    else:
        outcome = "not approved"
    return f"Backstop: waited for approval {approval_id}, {outcome}."


def _postgres_error(exc: asyncpg.PostgresError) -> str:
    message = str(getattr(exc, "message", None) or exc)
    sqlstate = getattr(exc, "sqlstate", None) or "?"
    if message.startswith("backstop:"):
        text = f"Refused by Backstop (SQLSTATE {sqlstate}); nothing ran.\n{message}"
    else:
        text = f"PostgreSQL error (SQLSTATE {sqlstate}): {message}"
    for label, attr in (("Detail", "detail"), ("Hint", "hint")):
        value = getattr(exc, attr, None)
        if value:
            text += f"\n{label}: {value}"
    return text


class BackstopTools:
    """The tools, independent of the MCP transport (tests and other hosts can call them)."""

    def __init__(self, settings: McpSettings) -> None:
        from backstop_core.classify import Classifier
        from backstop_core.policy import default_policy, load_policy, resolve_agent

        self.settings = settings
        self.classifier = Classifier()
        self.policy: Policy = (
            load_policy(settings.policy) if settings.policy is not None else default_policy()
        )
        dsn = parse_dsn(settings.gateway_dsn)
        self.agent = resolve_agent(self.policy, dsn.user or "postgres", APPLICATION_NAME)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        import asyncpg

        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.settings.gateway_dsn,
                        min_size=0,
                        max_size=4,
                        server_settings={"application_name": APPLICATION_NAME},
                        # The session is the agent's: settings it makes stay, and the gateway's
                        # audit trail is not filled with a reset query after every call.
                        reset=_keep_session,
                    )
        return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, OSError):
                pool.terminate()

    async def _with_connection(
        self, work: Callable[[Any], Awaitable[str]], notices: list[str] | None = None
    ) -> str:
        """Run `work` on a pooled connection; database answers become text, never raises."""
        import asyncpg

        heard: list[str] = [] if notices is None else notices

        def listen(_conn: Any, message: Any) -> None:
            heard.append(str(getattr(message, "message", message)))

        try:
            pool = await self.pool()
            async with pool.acquire() as conn:
                conn.add_log_listener(listen)
                try:
                    return await work(conn)
                finally:
                    conn.remove_log_listener(listen)
        except asyncpg.PostgresError as exc:
            return _postgres_error(exc)
        except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
            return (
                "Could not reach PostgreSQL through the Backstop gateway at "
                f"{_redact(self.settings.gateway_dsn)}: {exc}. Is the gateway running?"
            )

    # ------------------------------------------------------------------ tools

    async def query(self, sql: str, params: list[Any] | None = None) -> str:
        notices: list[str] = []
        statements = self.classifier.classify(sql)
        limit = self.settings.row_limit

        async def run(conn: Any) -> str:
            if len(statements) > 1 and not params:
                status = await conn.execute(sql)
                return f"Ran {len(statements)} statements; the last one reported {status}."
            statement = await conn.prepare(sql)
            columns = [a.name for a in statement.get_attributes()]
            if not columns:
                await statement.fetch(*(params or ()))
                return f"OK: {statement.get_statusmsg()}"
            rows = await statement.fetch(*(params or ()))
            shown = rows[:limit]
            head = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
            if len(rows) > limit:
                head += f" (showing the first {limit}; the rest were cut by the row limit)"
            return head + "\n" + _table(columns, [tuple(r) for r in shown])

        result = await self._with_connection(run, notices)
        refused = result.startswith(("Refused by Backstop", "PostgreSQL error", "Could not"))
        note = _approval_note(notices, result if refused else None)
        other = [n for n in notices if not _WAITING.search(n)]
        if other:
            result += "\nNotices:\n" + "\n".join(f"- {n}" for n in other)
        return f"{note}\n{result}" if note else result

    async def list_tables(self, schema: str | None = None) -> str:
        async def run(conn: Any) -> str:
            rows = await conn.fetch(
                "SELECT n.nspname, c.relname, CASE c.relkind WHEN 'r' THEN 'table' "
                "WHEN 'p' THEN 'partitioned table' WHEN 'v' THEN 'view' "
                "WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table' END, "
                "CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END "
                "FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND CASE WHEN $1::text IS NULL "
                "THEN n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname NOT LIKE 'pg\\_toast%' ELSE n.nspname = $1::text END "
                "ORDER BY 1, 2",
                schema,
            )
            if not rows:
                where = f"in schema {schema}" if schema else "outside the system schemas"
                return f"No tables or views {where}."
            return _table(("schema", "name", "kind", "estimated rows"), [tuple(r) for r in rows])

        return await self._with_connection(run)

    async def describe_table(self, table: str) -> str:
        async def run(conn: Any) -> str:
            oid = await conn.fetchval("SELECT pg_catalog.to_regclass($1)::oid", table)
            if oid is None:
                return (
                    f"No table or view named {table} (schema-qualify it if it is not on the "
                    "search path; list_tables shows what exists)."
                )
            name, estimate = await conn.fetchrow(
                "SELECT $1::oid::regclass::text, "
                "CASE WHEN reltuples >= 0 THEN reltuples::bigint END "
                "FROM pg_catalog.pg_class WHERE oid = $1::oid",
                oid,
            )
            columns = await conn.fetch(
                "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), "
                "CASE WHEN a.attnotnull THEN 'not null' ELSE '' END, "
                "pg_catalog.pg_get_expr(d.adbin, d.adrelid) "
                "FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef d "
                "ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                "WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped "
                "ORDER BY a.attnum",
                oid,
            )
            constraints = await conn.fetch(
                "SELECT contype::text, conname, pg_catalog.pg_get_constraintdef(oid) "
                "FROM pg_catalog.pg_constraint WHERE conrelid = $1::oid "
                "ORDER BY contype, conname",
                oid,
            )
            indexes = await conn.fetch(
                "SELECT pg_catalog.pg_get_indexdef(indexrelid) FROM pg_catalog.pg_index "
                "WHERE indrelid = $1::oid ORDER BY indexrelid::regclass::text",
                oid,
            )
            referenced = await conn.fetch(
                "SELECT conrelid::regclass::text, conname, pg_catalog.pg_get_constraintdef(oid) "
                "FROM pg_catalog.pg_constraint WHERE confrelid = $1::oid AND contype = 'f' "
                "ORDER BY 1, 2",
                oid,
            )
            rows = f"~{estimate:,} rows" if estimate is not None else "rows unknown (not analyzed)"
            parts = [f"{name} ({rows})", "", "Columns:"]
            parts.append(_table(("column", "type", "null", "default"), [tuple(c) for c in columns]))
            kinds = {"p": "Primary key", "f": "Foreign key", "u": "Unique", "c": "Check"}
            for kind, label in kinds.items():
                for _, conname, definition in (c for c in constraints if c[0] == kind):
                    parts.append(f"{label} {conname}: {definition}")
            if not any(c[0] == "p" for c in constraints):
                parts.append("Primary key: none")
            parts.append("Indexes:" if indexes else "Indexes: none")
            parts.extend(f"- {i[0]}" for i in indexes)
            if referenced:
                parts.append("Referenced by:")
                parts.extend(f"- {r[0]}.{r[1]}: {r[2]}" for r in referenced)
            return "\n".join(parts)

        return await self._with_connection(run)

    async def explain(self, sql: str) -> str:
        statements = self.classifier.classify(sql)
        if len(statements) != 1:
            return f"explain takes exactly one statement; this text has {len(statements)}."
        if statements[0].operation == "EXPLAIN":
            return "Pass the statement itself; explain adds EXPLAIN (FORMAT TEXT), never ANALYZE."

        async def run(conn: Any) -> str:
            rows = await conn.fetch("EXPLAIN (FORMAT TEXT) " + sql)
            return "\n".join(str(r[0]) for r in rows)

        return await self._with_connection(run)

    def classify(self, sql: str) -> str:
        from backstop_core.sdk.core import judgement_of

        statements = self.classifier.classify(sql)
        judgement = judgement_of(statements, self.policy, self.agent)
        decision = judgement.decision
        source = str(self.settings.policy) if self.settings.policy else "the built-in policy"
        lines = [
            f"Decision: {decision.action} (rule {decision.rule}) for agent {self.agent} under "
            f"{source} (version {self.policy.version}).",
            decision.reason,
            "",
            "Statements:" if statements else "No statements.",
        ]
        for number, c in enumerate(statements, 1):
            flags = [
                name
                for name, on in (
                    ("has WHERE", c.has_where),
                    ("unbounded", c.unbounded),
                    ("table-destructive", c.table_destructive),
                )
                if on
            ]
            tables = ", ".join(c.tables) or "no table"
            extra = f"; {', '.join(flags)}" if flags else ""
            lines.append(f"{number}. {c.operation} ({c.category}), risk {c.risk}, {tables}{extra}")
            lines.extend(f"   - {reason}" for reason in c.reasons)
        if judgement.needs_database:
            lines.append(
                "\nThe gateway also asks PostgreSQL for a row estimate before deciding this "
                "statement; rules with rows_over can change the decision there."
            )
        lines.append("Nothing was run: this is what the gateway would decide.")
        return "\n".join(lines)

    async def approval_status(self, approval_id: int) -> str:
        state_dir = self.settings.state_dir
        if state_dir is None:
            return (
                "approval_status needs the gateway's state directory: start the MCP server "
                "with --state-dir DIR (the gateway's --state-dir)."
            )
        if not (state_dir / "backstop.db").is_file():
            return f"No Backstop state in {state_dir}: is it the gateway's --state-dir?"
        from backstop_core.store import Store, StoreError

        try:
            store = await Store.open(state_dir)
            try:
                record = await store.approval_get(approval_id)
            finally:
                await store.close()
        except (StoreError, OSError) as exc:
            return f"Could not read the state in {state_dir}: {exc}"
        if record is None:
            return f"There is no approval {approval_id}."
        lines = [
            f"Approval {record.id}: {record.describe_status()}",
            f"Agent: {record.agent}",
            f"Statement: {record.operation} on {', '.join(record.tables) or 'no table'}",
            f"SQL: {record.sql}",
            f"Why it needed approval: {record.reason}",
        ]
        if record.status == "pending":
            left = (record.expires_at - datetime.now(UTC)).total_seconds()
            lines.append(
                f"Waiting for an operator: {max(0, int(left))} s left "
                f"(backstop approve {record.id} / backstop deny {record.id} --reason TEXT)."
            )
        if record.decision_reason:
            lines.append(f"Reason given: {record.decision_reason}")
        return "\n".join(lines)


async def _keep_session(_conn: Any) -> None:
    """The pool's reset hook: keep the session as the agent left it."""


# ---------------------------------------------------------------------------- MCP


def _server_class() -> Any:
    try:
        from mcp.server.mcpserver import MCPServer

        return MCPServer
    except ImportError:  # mcp 1.x
        from mcp.server.fastmcp import FastMCP  # type: ignore[attr-defined,unused-ignore]

        return FastMCP


_INSTRUCTIONS = (
    "PostgreSQL through the Backstop safety gateway. Every statement you run is checked "
    "against the operator's policy: some are refused (the answer starts with 'Refused by "
    "Backstop' and says why and what would be allowed instead), some wait for a human to "
    "approve them (the answer then says 'waited for approval N' and how it ended). Use "
    "classify to learn what Backstop would decide before running a risky statement, and "
    "approval_status to look up an approval."
)


def build_server(tools: BackstopTools) -> Any:
    """An MCP server (FastMCP / MCPServer) exposing the six tools."""
    from mcp.types import ToolAnnotations

    server = _server_class()("backstop", instructions=_INSTRUCTIONS)
    # By their wire names: mcp 1 and mcp 2 spell the Python fields differently.
    read_only = ToolAnnotations.model_validate({"readOnlyHint": True, "openWorldHint": False})
    writes = ToolAnnotations.model_validate({"destructiveHint": True, "openWorldHint": False})

    async def query(sql: str, params: list[Any] | None = None) -> str:
        """Run SQL on PostgreSQL through the Backstop gateway and return the rows as a table
        (bounded by the server's row limit) or the command status. `params` binds $1, $2, ...
        A statement the policy refuses comes back as text starting 'Refused by Backstop' with
        the reason; one that needs a human's approval waits for it, and the answer says so.
        Each call is its own session use: do not split a transaction across calls."""
        return await tools.query(sql, params)

    async def list_tables(schema: str | None = None) -> str:
        """List tables and views (schema, name, kind, estimated rows), outside the system
        schemas, or in `schema` only."""
        return await tools.list_tables(schema)

    async def describe_table(table: str) -> str:
        """Describe a table: columns with types, nullability and defaults, the primary key,
        foreign keys, unique and check constraints, indexes, and what references it."""
        return await tools.describe_table(table)

    async def explain(sql: str) -> str:
        """Show PostgreSQL's plan for one statement (EXPLAIN, never ANALYZE: nothing runs)."""
        return await tools.explain(sql)

    async def classify(sql: str) -> str:
        """Say what Backstop would decide for this SQL without running it: each statement's
        operation, tables, risk and reasons, and the policy's decision (allow, approve,
        require_snapshot, approve_with_snapshot, block) with its reason."""
        return tools.classify(sql)

    async def approval_status(approval_id: int) -> str:
        """Look up an approval by id: pending, approved, denied, expired, used; who decided
        and why."""
        return await tools.approval_status(approval_id)

    server.add_tool(query, annotations=writes)
    for fn in (list_tables, describe_table, explain, classify, approval_status):
        server.add_tool(fn, annotations=read_only)
    return server


async def _serve(settings: McpSettings, run: Callable[[Any], Awaitable[None]]) -> None:
    tools = BackstopTools(settings)
    try:
        await run(build_server(tools))
    finally:
        await tools.close()


async def serve_stdio(
    gateway_dsn: str,
    *,
    row_limit: int = DEFAULT_ROW_LIMIT,
    policy: Path | None = None,
    state_dir: Path | None = None,
) -> None:
    """Serve the tools over stdio until the client closes the connection."""
    settings = McpSettings(gateway_dsn, row_limit, policy, state_dir)

    async def run(server: Any) -> None:
        await server.run_stdio_async()

    await _serve(settings, run)


async def serve_http(
    gateway_dsn: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    row_limit: int = DEFAULT_ROW_LIMIT,
    policy: Path | None = None,
    state_dir: Path | None = None,
) -> None:
    """Serve the tools over streamable HTTP at http://HOST:PORT/mcp until stopped."""
    settings = McpSettings(gateway_dsn, row_limit, policy, state_dir)

    async def run(server: Any) -> None:
        if "host" in inspect.signature(server.run_streamable_http_async).parameters:
            await server.run_streamable_http_async(host=host, port=port)
        else:  # mcp 1.x takes the address from its settings
            server.settings.host = host
            server.settings.port = port
            await server.run_streamable_http_async()

    await _serve(settings, run)


# ---------------------------------------------------------------------------- command line


def add_mcp_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `backstop mcp` (besides the common settings flags)."""
    parser.add_argument(
        "--gateway",
        metavar="DSN",
        default=os.environ.get("BACKSTOP_GATEWAY"),
        help="the Backstop gateway to connect through, as a postgresql:// URL "
        "(default: BACKSTOP_GATEWAY)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        nargs="?",
        const=DEFAULT_HTTP,
        help=f"serve streamable HTTP at http://HOST:PORT/mcp instead of stdio "
        f"(default address {DEFAULT_HTTP})",
    )
    parser.add_argument(
        "--row-limit",
        type=int,
        default=DEFAULT_ROW_LIMIT,
        metavar="N",
        help=f"most rows a query returns to the agent (default {DEFAULT_ROW_LIMIT})",
    )


def _explicit_state_dir(args: argparse.Namespace, settings: Settings) -> Path | None:
    """The state directory if the operator named one (flag, variable or config file)."""
    if getattr(args, "state_dir", None) or os.environ.get("BACKSTOP_STATE_DIR"):
        return settings.state_dir
    if settings.config_file is not None and settings.state_dir != Path(".backstop"):
        return settings.state_dir
    return settings.state_dir if (settings.state_dir / "backstop.db").is_file() else None


def run_from_cli(args: argparse.Namespace, settings: Settings) -> int:
    """`backstop mcp`: the handler for cli.py (arguments from add_mcp_arguments)."""
    from backstop_core.policy import PolicyError

    if not args.gateway:
        print(
            "backstop mcp: --gateway postgresql://USER@HOST:PORT/DB is required "
            "(the gateway's listen address), or set BACKSTOP_GATEWAY",
            file=sys.stderr,
        )
        return 2
    try:
        mcp_settings = McpSettings(
            args.gateway,
            args.row_limit,
            settings.policy,
            _explicit_state_dir(args, settings),
        )
        http = parse_listen(args.http) if args.http else None
        BackstopTools(mcp_settings)  # fail now on a bad policy, not on the first tool call
    except (SettingsError, PolicyError) as exc:
        print(f"backstop mcp: {str(exc).replace('upstream:', 'gateway:', 1)}", file=sys.stderr)
        return 2
    try:
        if http is None:
            asyncio.run(
                serve_stdio(
                    mcp_settings.gateway_dsn,
                    row_limit=mcp_settings.row_limit,
                    policy=mcp_settings.policy,
                    state_dir=mcp_settings.state_dir,
                )
            )
        else:
            asyncio.run(
                serve_http(
                    mcp_settings.gateway_dsn,
                    http[0],
                    http[1],
                    row_limit=mcp_settings.row_limit,
                    policy=mcp_settings.policy,
                    state_dir=mcp_settings.state_dir,
                )
            )
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backstop mcp",
        description="Serve Backstop's database tools to MCP clients, through the gateway.",
    )
    add_mcp_arguments(parser)
    add_settings_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -c 'from backstop_core.mcp_server import main; main()' ...`."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"backstop mcp: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(BrokenPipeError):
        return run_from_cli(args, settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
