"""The MCP server driven by the MCP SDK's own stdio client, in front of a real gateway and
PostgreSQL: tools are listed, queries return rows, refusals and approval waits come back as
text an agent can act on, and an approval decided from the CLI lets the statement run."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.gateway_harness import GatewayThread
from tests.integration.test_sdk_psycopg import (
    cli,
    decide_from_cli,
    direct,
    wait_for_pending,
    write_policy,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MCP_AGENT = "postgres/backstop-mcp"  # the gateway's name for the server's connections
TOOLS = {"query", "list_tables", "describe_table", "explain", "classify", "approval_status"}


def text_of(result: Any) -> str:
    assert not getattr(result, "is_error", getattr(result, "isError", False)), result
    return "\n".join(block.text for block in result.content if block.type == "text")


@pytest.fixture
def shop(fresh_db: str) -> str:
    """Two related tables in a fresh database; returns its DSN (PostgreSQL itself)."""
    direct(
        fresh_db,
        "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);"
        "CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers(id),"
        " total numeric(10, 2) DEFAULT 0);"
        "CREATE INDEX orders_customer ON orders (customer_id);"
        "INSERT INTO customers SELECT i, 'customer ' || i FROM generate_series(1, 5) i;"
        "INSERT INTO orders SELECT i, 1 + i % 5, i * 10 FROM generate_series(1, 20) i;",
    )
    return fresh_db


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "gateway-state"


@pytest.fixture
def gateway(
    gateway_factory: Callable[..., GatewayThread], tmp_path: Path, state_dir: Path
) -> GatewayThread:
    return gateway_factory(policy=write_policy(tmp_path / "policy.json"), state_dir=state_dir)


@pytest.fixture
def connect_mcp(
    gateway: GatewayThread, shop: str, state_dir: Path, tmp_path: Path
) -> Callable[..., Any]:
    @asynccontextmanager
    async def session(*extra: str) -> AsyncIterator[ClientSession]:
        params = StdioServerParameters(
            command=sys.executable,
            args=[
                "-c",
                "from backstop_core.mcp_server import main; main()",
                "--gateway",
                gateway.dsn(database=database_of(shop)),
                "--state-dir",
                str(state_dir),
                "--policy",
                str(tmp_path / "policy.json"),
                *extra,
            ],
            env={"PYTHONPATH": str(ROOT)},
            cwd=str(tmp_path),
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            yield client

    return session


async def test_tools_answer_through_the_gateway(connect_mcp: Callable[..., Any], shop: str) -> None:
    async with connect_mcp("--row-limit", "5") as client:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == TOOLS

        rows = text_of(
            await client.call_tool(
                "query",
                {"sql": "SELECT id, name FROM customers WHERE id <= $1 ORDER BY id", "params": [2]},
            )
        )
        assert rows.splitlines() == [
            "2 rows",
            "| id | name |",
            "|---|---|",
            "| 1 | customer 1 |",
            "| 2 | customer 2 |",
        ]
        many = text_of(await client.call_tool("query", {"sql": "SELECT id FROM orders"}))
        assert many.startswith("20 rows (showing the first 5;")
        assert len([line for line in many.splitlines() if line.startswith("| ")]) == 6

        inserted = text_of(
            await client.call_tool(
                "query", {"sql": "INSERT INTO customers VALUES (6, 'customer 6')"}
            )
        )
        assert inserted == "OK: INSERT 0 1"

        tables = text_of(await client.call_tool("list_tables", {}))
        assert "| public | customers | table |" in tables and "| public | orders |" in tables

        described = text_of(await client.call_tool("describe_table", {"table": "orders"}))
        assert "| customer_id | integer |" in described
        assert "| total | numeric(10,2) |  | 0 |" in described
        assert "Primary key orders_pkey: PRIMARY KEY (id)" in described
        assert "Foreign key orders_customer_id_fkey: FOREIGN KEY (customer_id) REFERENCES" in (
            described
        )
        assert "CREATE INDEX orders_customer ON public.orders USING btree (customer_id)" in (
            described
        )
        missing = text_of(await client.call_tool("describe_table", {"table": "nope"}))
        assert missing.startswith("No table or view named nope")

        plan = text_of(
            await client.call_tool("explain", {"sql": "DELETE FROM orders WHERE id = 1"})
        )
        assert "Delete on orders" in plan
        assert direct_count(shop, "orders") == 20  # explained, never run

        decided = text_of(await client.call_tool("classify", {"sql": "DROP TABLE orders"}))
        assert decided.startswith("Decision: block (rule no-drop-table)")
        assert "DROP_TABLE (DDL), risk CRITICAL, public.orders" in decided


async def test_a_refusal_comes_back_with_its_reason_and_nothing_runs(
    connect_mcp: Callable[..., Any], shop: str
) -> None:
    async with connect_mcp() as client:
        refused = text_of(await client.call_tool("query", {"sql": "DROP TABLE orders"}))
        assert refused.startswith("Refused by Backstop (SQLSTATE 42501); nothing ran.")
        assert "Tables are never dropped by agents." in refused
        error = text_of(await client.call_tool("query", {"sql": "SELECT * FROM no_such_table"}))
        assert error.startswith("PostgreSQL error (SQLSTATE 42P01)")
        # The session is still fine after both.
        assert text_of(await client.call_tool("query", {"sql": "SELECT 1 AS one"})).startswith(
            "1 row"
        )
    assert direct_count(shop, "orders") == 20


async def test_an_approval_decided_from_the_cli_lets_the_query_finish(
    connect_mcp: Callable[..., Any], shop: str, state_dir: Path
) -> None:
    async with connect_mcp() as client:
        deleting = asyncio.ensure_future(
            client.call_tool("query", {"sql": "DELETE FROM orders WHERE id = $1", "params": [7]})
        )
        pending = await asyncio.to_thread(wait_for_pending, state_dir, MCP_AGENT)
        assert pending["operation"] == "DELETE"
        assert not deleting.done()
        status = text_of(await client.call_tool("approval_status", {"approval_id": pending["id"]}))
        assert status.startswith(f"Approval {pending['id']}: pending")
        await asyncio.to_thread(decide_from_cli, state_dir, pending["id"], "approve")
        answer = text_of(await asyncio.wait_for(deleting, 30))
        assert answer.splitlines() == [
            f"Backstop: waited for approval {pending['id']}, approved.",
            "OK: DELETE 1",
        ]
        status = text_of(await client.call_tool("approval_status", {"approval_id": pending["id"]}))
        assert status.startswith(f"Approval {pending['id']}: used")

        denying = asyncio.ensure_future(
            client.call_tool("query", {"sql": "DELETE FROM orders WHERE id = 8"})
        )
        pending = await asyncio.to_thread(wait_for_pending, state_dir, MCP_AGENT)
        await asyncio.to_thread(
            decide_from_cli, state_dir, pending["id"], "deny", "--reason", "order 8 stays"
        )
        denied = text_of(await asyncio.wait_for(denying, 30))
        assert denied.startswith(f"Backstop: waited for approval {pending['id']}, denied.")
        assert "order 8 stays" in denied
    assert direct_count(shop, "orders") == 19
    assert cli(state_dir, "pending", "--json").stdout.strip() == "[]"


async def test_approval_status_needs_a_state_directory(gateway: GatewayThread, shop: str) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=[
            "-c",
            "from backstop_core.mcp_server import main; main()",
            "--gateway",
            gateway.dsn(database=database_of(shop)),
        ],
        env={"PYTHONPATH": str(ROOT)},
        cwd=str(ROOT / "tests"),
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        answer = text_of(await client.call_tool("approval_status", {"approval_id": 1}))
    assert "--state-dir" in answer


def direct_count(dsn: str, table: str) -> int:
    return int(direct(dsn, f"SELECT count(*) FROM {table}")[0][0])


async def test_streamable_http_serves_the_same_tools(gateway: GatewayThread, shop: str) -> None:
    from mcp.client.streamable_http import streamable_http_client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from backstop_core.mcp_server import main; main()",
        "--gateway",
        gateway.dsn(database=database_of(shop)),
        "--http",
        f"127.0.0.1:{port}",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert server.returncode is None, "the MCP server exited"
                assert time.monotonic() < deadline, "the MCP server did not listen"
                await asyncio.sleep(0.1)
        async with (
            streamable_http_client(f"http://127.0.0.1:{port}/mcp") as streams,
            ClientSession(streams[0], streams[1]) as client,
        ):
            await client.initialize()
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
            answer = text_of(
                await client.call_tool("query", {"sql": "SELECT count(*) AS n FROM customers"})
            )
            assert answer.splitlines()[-1] == "| 5 |"
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
