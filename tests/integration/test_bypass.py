"""Bypass detection against a real PostgreSQL: agents that connect around the gateway.

Each test watches a database of its own (`fresh_db`), so sessions of other tests never show.
`poll_once()` is driven directly, except where the poller's own loop is what is tested.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from backstop_core.events import AlertRaised, Event, EventBus
from backstop_core.localpg import LocalPostgres
from backstop_core.policy import ApprovalSettings, BypassSettings, Policy, default_policy
from backstop_core.sidecar.bypass import (
    ALERT_KIND,
    MONITOR_ALERT_KIND,
    BypassAlertClosed,
    BypassMonitor,
    GatewayBackends,
    gateway_backends_of,
)
from backstop_core.store import AlertRecord, Store
from tests.conftest import PgServer
from tests.gateway_harness import GatewayThread

pytestmark = pytest.mark.integration

AGENT = "agent_role"


class PolicyBox:
    """The policy getter the monitor calls before every poll; tests swap what it returns."""

    def __init__(self, **bypass: Any) -> None:
        self.policy = replace(default_policy(), bypass=BypassSettings(**bypass))

    def __call__(self) -> Policy:
        return self.policy


class Watch:
    """A monitor, its state store and every event it published."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.monitors: list[BypassMonitor] = []

    def monitor(
        self,
        dsn: str,
        policy: PolicyBox | None = None,
        gateway: Callable[[], GatewayBackends] = GatewayBackends,
        **options: Any,
    ) -> BypassMonitor:
        monitor = BypassMonitor(
            dsn,
            policy=policy or PolicyBox(),
            store=self.store,
            bus=self.bus,
            gateway_backends=gateway,
            **options,
        )
        self.monitors.append(monitor)
        return monitor

    async def alerts(self, kind: str = ALERT_KIND, status: str | None = None) -> list[AlertRecord]:
        found = await self.store.alerts_list(status=status, limit=1000)
        return [a for a in found if a.kind == kind]

    def raised(self, kind: str = ALERT_KIND) -> list[AlertRaised]:
        return [e for e in self.events if isinstance(e, AlertRaised) and e.kind_ == kind]


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[Watch]:
    store = await Store.open(tmp_path / "state")
    watch = Watch(store)
    try:
        yield watch
    finally:
        for monitor in watch.monitors:
            await monitor.close()
        await store.close()


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


async def connect_agent(
    dsn: str, application_name: str = "cursor-direct"
) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, application_name=application_name)


async def scalar(conn: psycopg.AsyncConnection[Any], sql: str) -> Any:
    row = await (await conn.execute(sql)).fetchone()
    assert row is not None
    return row[0]


async def eventually(check: Callable[[], Awaitable[Any]], seconds: float = 15.0) -> Any:
    """The first truthy result of `check`, polled every 0.1 s; TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.1)


def gateway_identity(
    gateway: GatewayThread, *, pids: bool = True, addresses: bool = True
) -> Callable[[], GatewayBackends]:
    """What the runtime will pass: the gateway's upstream pids and sockets, read on its loop."""

    def read() -> GatewayBackends:
        runtime = gateway.runtime
        assert runtime is not None and runtime.gateway is not None
        sessions = runtime.gateway.sessions
        found = gateway.call_soon(lambda: gateway_backends_of(list(sessions.values())))
        return GatewayBackends(
            pids=found.pids if pids else frozenset(),
            addresses=found.addresses if addresses else frozenset(),
        )

    return read


# --------------------------------------------------------------------------- alerts


async def test_direct_agent_session_raises_an_alert_with_its_details(
    pg: PgServer, fresh_db: str, watch: Watch
) -> None:
    database = dbname(fresh_db)
    monitor = watch.monitor(fresh_db)
    agent = await connect_agent(pg.dsn(user=AGENT, database=database))
    async with agent:
        pid = agent.info.backend_pid
        port = await scalar(agent, "SELECT inet_client_port()")
        await agent.execute("SELECT 'drop the orders table' AS plan")  # left idle in transaction
        first = await monitor.poll_once()
        second = await monitor.poll_once()

    assert first.ok and second.ok
    [alert] = await watch.alerts()
    assert [b.pid for b in first.bypasses] == [pid]
    assert alert.status == "open" and alert.severity == "critical"
    assert alert.key.startswith(f"{pid}:")
    assert f"role {AGENT} on database {database} from 127.0.0.1:{port}" in alert.title
    details = json.loads(alert.details_json)
    assert details["role"] == AGENT
    assert details["database"] == database
    assert (details["client_addr"], details["client_port"]) == ("127.0.0.1", port)
    assert details["application_name"] == "cursor-direct"
    assert details["state"] == "idle in transaction"
    assert details["query"] == "SELECT 'drop the orders table' AS plan"
    assert details["backend_start"] and details["action"] == "alert"
    [event] = watch.raised()
    assert event.alert_id == alert.id and event.details["role"] == AGENT


async def test_one_alert_per_session_closed_when_it_ends(
    pg: PgServer, fresh_db: str, watch: Watch
) -> None:
    monitor = watch.monitor(fresh_db)
    agent = await connect_agent(pg.dsn(user=AGENT, database=dbname(fresh_db)))
    async with agent:
        for _ in range(5):
            await monitor.poll_once()
        [alert] = await watch.alerts()
        assert alert.count == 5
        await watch.store.alert_ack(alert.id, "alice")  # acknowledged is still live
        await monitor.poll_once()
    assert len(watch.raised()) == 1

    async def closed() -> bool:
        result = await monitor.poll_once()
        return any(a.id == alert.id for a in result.closed)

    await eventually(closed)
    [after] = await watch.alerts()
    assert after.status == "closed" and after.acked_by == "alice"
    assert [e.alert_id for e in watch.events if isinstance(e, BypassAlertClosed)] == [alert.id]

    again = await connect_agent(pg.dsn(user=AGENT, database=dbname(fresh_db)))
    async with again:
        await monitor.poll_once()
        newest = await watch.alerts(status="open")
        assert len(newest) == 1 and newest[0].id != alert.id
        assert newest[0].key.startswith(f"{again.info.backend_pid}:")


@pytest.mark.parametrize(
    ("pids", "addresses"),
    [(True, True), (True, False), (False, True)],
    ids=["pids-and-sockets", "pids-only", "sockets-only"],
)
async def test_gateway_sessions_never_alert_even_when_a_direct_one_copies_their_name(
    pg: PgServer,
    fresh_db: str,
    watch: Watch,
    gateway_factory: Callable[..., GatewayThread],
    pids: bool,
    addresses: bool,
) -> None:
    database = dbname(fresh_db)
    gateway = gateway_factory(pass_through=True)
    monitor = watch.monitor(
        fresh_db, gateway=gateway_identity(gateway, pids=pids, addresses=addresses)
    )
    through = await psycopg.AsyncConnection.connect(
        gateway.dsn(user=AGENT, database=database, application_name="cursor")
    )
    direct = await connect_agent(pg.dsn(user=AGENT, database=database), "cursor")
    async with through, direct:
        direct_pid = direct.info.backend_pid
        await through.execute("SELECT 1")
        results = [await monitor.poll_once() for _ in range(3)]
        assert await scalar(through, "SELECT 'still served'") == "still served"

    assert all(r.gateway == 1 for r in results)
    [alert] = await watch.alerts()
    assert alert.key.startswith(f"{direct_pid}:")
    assert json.loads(alert.details_json)["application_name"] == "cursor"


@pytest.mark.parametrize(
    ("bypass", "application_name"),
    [
        ({"allowed_roles": ["agent_*"]}, "psql"),
        ({"allowed_applications": ["etl-*"]}, "etl-nightly"),
        ({"allowed_addresses": ["127.0.0.0/8"]}, "psql"),
        ({"agent_roles": ["cursor_*", "claude_*"]}, "psql"),
    ],
    ids=["allowed-role", "allowed-application", "allowed-address", "not-an-agent-role"],
)
async def test_allowed_sessions_never_alert_nor_get_terminated(
    pg: PgServer, fresh_db: str, watch: Watch, bypass: dict[str, Any], application_name: str
) -> None:
    monitor = watch.monitor(fresh_db, PolicyBox(action="terminate", **bypass))
    agent = await connect_agent(pg.dsn(user=AGENT, database=dbname(fresh_db)), application_name)
    async with agent:
        results = [await monitor.poll_once() for _ in range(2)]
        assert await scalar(agent, "SELECT 'alive'") == "alive"
    assert [r.excused for r in results] == [1, 1]
    assert not any(r.terminated for r in results)
    assert await watch.alerts() == []


async def test_terminate_ends_the_direct_session_and_audits_it(
    pg: PgServer, fresh_db: str, watch: Watch, gateway_factory: Callable[..., GatewayThread]
) -> None:
    database = dbname(fresh_db)
    gateway = gateway_factory(pass_through=True)
    monitor = watch.monitor(
        fresh_db, PolicyBox(action="terminate"), gateway=gateway_identity(gateway)
    )
    through = await psycopg.AsyncConnection.connect(gateway.dsn(user=AGENT, database=database))
    direct = await connect_agent(pg.dsn(user=AGENT, database=database), "sneaky-script")
    async with through, direct:
        pid = direct.info.backend_pid
        result = await monitor.poll_once()
        assert result.terminated == (pid,)
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            await direct.execute("SELECT 1")
        assert await scalar(through, "SELECT 'untouched'") == "untouched"

    [alert] = await watch.alerts()
    details = json.loads(alert.details_json)
    assert details["termination"]["terminated"] is True
    assert alert.title.endswith("(terminated)")

    await watch.store.ingest()
    [audit] = await watch.store.audit_query(decision="terminate")
    assert audit.operation == "TERMINATE_BACKEND" and audit.rule == "bypass"
    assert audit.outcome == "forwarded"
    assert AGENT in audit.reason and "sneaky-script" in audit.reason
    assert audit.sql == f"SELECT pg_terminate_backend({pid})"
    assert details["termination"]["audit_key"] == audit.key

    async def closed() -> bool:
        return (await watch.alerts())[0].status == "closed"

    await eventually(lambda: _poll_then(monitor, closed))


async def _poll_then(monitor: BypassMonitor, check: Callable[[], Awaitable[bool]]) -> bool:
    await monitor.poll_once()
    return await check()


async def test_watches_the_dsn_database_unless_told_to_watch_all(
    pg: PgServer, fresh_db: str, watch: Watch
) -> None:
    one = watch.monitor(fresh_db)
    every = watch.monitor(fresh_db, all_databases=True)
    elsewhere = await connect_agent(pg.dsn(user=AGENT, database="postgres"))
    async with elsewhere:
        pid = elsewhere.info.backend_pid
        narrow = await one.poll_once()
        wide = await every.poll_once()
    assert pid not in [b.pid for b in narrow.bypasses]
    assert pid in [b.pid for b in wide.bypasses]
    assert one.watched == (dbname(fresh_db),)


async def test_a_monitor_role_without_pg_read_all_stats_says_it_is_blind(
    pg: PgServer, fresh_db: str, watch: Watch
) -> None:
    database = dbname(fresh_db)
    monitor = watch.monitor(pg.dsn(user="pw_user", password="pw-secret", database=database))
    agent = await connect_agent(pg.dsn(user=AGENT, database=database))
    async with agent:
        result = await monitor.poll_once()
    assert result.ok and result.hidden == 1
    assert await watch.alerts() == []
    [blind] = await watch.alerts(MONITOR_ALERT_KIND)
    assert AGENT in blind.title and "pg_read_all_stats" in blind.title


# --------------------------------------------------------------------------- webhook


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Hook,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


async def test_each_new_alert_is_posted_to_the_webhook_once(
    pg: PgServer, fresh_db: str, watch: Watch, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    policy = PolicyBox()
    policy.policy = replace(policy.policy, approval=ApprovalSettings(webhook_url=url))
    monitor = watch.monitor(fresh_db, policy)
    agent = await connect_agent(pg.dsn(user=AGENT, database=dbname(fresh_db)))
    async with agent:
        for _ in range(3):
            await monitor.poll_once()

    async def posted() -> bool:
        return bool(received)

    await eventually(posted, seconds=5)
    await asyncio.sleep(0.3)  # a second POST would have arrived by now
    [alert] = await watch.alerts()
    [payload] = received
    assert payload["alert_id"] == alert.id
    assert f"role {AGENT}" in payload["text"] and "bypassing Backstop" in payload["text"]


@pytest.fixture
def silent_webhook() -> Iterator[str]:
    """A URL whose server accepts the connection and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        listener.close()


async def test_a_webhook_that_never_answers_does_not_hold_up_the_alert(
    pg: PgServer, fresh_db: str, watch: Watch, silent_webhook: str
) -> None:
    policy = PolicyBox()
    policy.policy = replace(policy.policy, approval=ApprovalSettings(webhook_url=silent_webhook))
    monitor = watch.monitor(fresh_db, policy)
    agent = await connect_agent(pg.dsn(user=AGENT, database=dbname(fresh_db)))
    async with agent:
        started = time.monotonic()
        result = await monitor.poll_once()
        took = time.monotonic() - started
    assert len(result.opened) == 1
    assert took < 2  # the POST waits up to 3 s for an answer, in a thread of its own


# --------------------------------------------------------------------------- policy changes


async def test_excusing_a_role_closes_its_alert_and_disabling_stops_alerts(
    pg: PgServer, fresh_db: str, watch: Watch
) -> None:
    policy = PolicyBox()
    monitor = watch.monitor(fresh_db, policy, interval=0.1)
    agent = await connect_agent(pg.dsn(user=AGENT, database=dbname(fresh_db)))
    async with agent:
        result = await monitor.poll_once()
        [opened] = result.opened
        policy.policy = replace(
            policy.policy, bypass=BypassSettings(allowed_roles=(AGENT,))
        )  # hot reload: the monitor asks for the policy on every poll
        result = await monitor.poll_once()
        assert [a.id for a in result.closed] == [opened.id]

        policy.policy = replace(policy.policy, bypass=BypassSettings(enabled=False))
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await watch.alerts(status="open") == []
    assert len(watch.raised()) == 1


# --------------------------------------------------------------------------- restarts


async def test_poller_survives_the_database_restarting(
    private_pg: LocalPostgres, tmp_path: Path, watch: Watch
) -> None:
    info = private_pg.info
    with psycopg.connect(info.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {AGENT} LOGIN")
    monitor = watch.monitor(info.dsn(), interval=0.2)
    task = asyncio.create_task(monitor.run())
    try:
        first = await connect_agent(info.dsn(user=AGENT))
        before = await eventually(lambda: watch.alerts(status="open"))

        await asyncio.to_thread(private_pg.stop_server_only)
        [down] = await eventually(lambda: watch.alerts(MONITOR_ALERT_KIND, status="open"))
        assert down.title.startswith("cannot watch pg_stat_activity: ")
        assert not task.done()
        await first.close()

        await asyncio.to_thread(private_pg.start_server_only)
        await eventually(lambda: _none(watch.alerts(MONITOR_ALERT_KIND, status="open")))
        second = await connect_agent(info.dsn(user=AGENT))
        async with second:
            [after] = await eventually(lambda: watch.alerts(status="open"))
            assert after.key.startswith(f"{second.info.backend_pid}:")
        assert [a.status for a in await watch.alerts() if a.id == before[0].id] == ["closed"]
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    kinds = [e.kind_ for e in watch.events if isinstance(e, AlertRaised)]
    assert kinds == [ALERT_KIND, MONITOR_ALERT_KIND, ALERT_KIND]


async def _none(found: Awaitable[list[AlertRecord]]) -> bool:
    return not await found
