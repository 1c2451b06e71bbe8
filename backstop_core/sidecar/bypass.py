"""Bypass detection: notice sessions that reach PostgreSQL directly instead of through Backstop.

`BypassMonitor` polls `pg_stat_activity` on a control connection every
`policy.bypass.interval_seconds` and raises one alert (kind `bypass`, key
`"<pid>:<backend_start>"`) per direct session, closed again when the session ends. With
`bypass.action = "terminate"` it also ends the session with `pg_terminate_backend` and
records that in the audit trail.

Which sessions count
--------------------
Only client backends, and walsenders opened with `replication=database` (they run SQL too),
in the watched databases. Then, in this order:

1. **Backstop's own connections never count.** A backend is the gateway's when its pid is
   one the gateway learnt from BackendKeyData, or when its client address and port are
   exactly the local address and port of one of the gateway's upstream sockets; a backend
   is Backstop's when its pid is one of the control connections' (and the monitor's own
   connection is left out by `pg_backend_pid()`). `application_name` is chosen by the
   client, so it never identifies Backstop. A backend seen once as the gateway's stays the
   gateway's until it ends (keyed by pid and start time), so a session whose client just
   left is not reported while PostgreSQL finishes it.
2. **Only agent roles count**: the session's role must match one of `agent_roles`
   (default `["*"]`: every role).
3. **Any one excuse is enough**: the role matches `allowed_roles`, *or* the application
   name matches `allowed_applications`, *or* the client address lies in one of
   `allowed_addresses`. This is how docs/policy.md and `backstop policy check` describe them
   (each list "excused" on its own). The role is authenticated and the address is the TCP
   peer PostgreSQL saw, but the application name is whatever the client sends: an agent
   that knows an allowed application name can claim it. Prefer roles and addresses;
   excuse an application name only where that risk is acceptable.

Role and application globs are case-sensitive (`fnmatchcase`), like role names. A session
over a Unix socket has no address, so only its role or application name can excuse it.

A session is reported once it is ready for queries (`state` is set): a backend still
starting up may belong to a gateway session whose BackendKeyData is in flight.

Failures
--------
When `pg_stat_activity` cannot be read (the server is down, restarting, refuses the
monitor's role) `poll_once` returns a failed `PollResult` and raises one alert (kind
`bypass-monitor`, key `pg_stat_activity`), closed when a poll succeeds again; `run()` logs,
reconnects with a backoff that starts at the interval and doubles up to 30 s, and keeps
going until cancelled. A monitor role without `pg_read_all_stats` sees other roles'
sessions without address, start time or query: those are counted as `hidden` and raise the
`bypass-monitor` alert with key `privileges`, since the monitor cannot judge them.
`pg_terminate_backend` needs `pg_signal_backend` (and superuser to end a superuser's
session); a refused termination is written to the alert's details and the audit trail.

Every new alert is published as `AlertRaised` and, when `approval.webhook_url` is set, POSTed
there as JSON with a Slack-compatible `text` field (from a thread, 3 s timeout, failures
logged). Closing one publishes `BypassAlertClosed`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import asyncpg

from backstop_core.events import AlertRaised, Event, EventBus
from backstop_core.policy import BypassSettings, Policy, resolve_agent
from backstop_core.store import AlertRecord, AuditStart, StateStore

if TYPE_CHECKING:
    from backstop_core.gateway.session import Session

__all__ = [
    "ALERT_KIND",
    "MONITOR_ALERT_KIND",
    "Backend",
    "BypassAlertClosed",
    "BypassMonitor",
    "GatewayBackends",
    "PollResult",
    "Verdict",
    "address_allowed",
    "gateway_backends_of",
    "judge",
]

log = logging.getLogger("backstop.bypass")

ALERT_KIND = "bypass"
MONITOR_ALERT_KIND = "bypass-monitor"
MONITOR_KEY = "pg_stat_activity"
PRIVILEGES_KEY = "privileges"
QUERY_LIMIT = 500
APPLICATION_NAME = "backstop-bypass"
WEBHOOK_TIMEOUT_SECONDS = 3.0
MAX_BACKOFF_SECONDS = 30.0
HIDDEN_QUERY = "<insufficient privilege>"

_ACTIVITY_SQL = """\
SELECT pid, datname, usename, application_name, host(client_addr) AS client_addr, client_port,
       backend_start, xact_start, query_start, state, query, backend_type
FROM pg_catalog.pg_stat_activity
WHERE pid <> pg_catalog.pg_backend_pid()
  AND datname IS NOT NULL
  AND usename IS NOT NULL
  AND (backend_type IN ('client backend', 'walsender') OR backend_type IS NULL)
  AND ($1::text[] IS NULL OR datname = ANY($1::text[]))"""

# The start time is checked again so a pid reused since the poll is never signalled.
_TERMINATE_SQL = """\
SELECT pg_catalog.pg_terminate_backend(pid)
FROM pg_catalog.pg_stat_activity
WHERE pid = $1 AND backend_start = $2"""


# --------------------------------------------------------------------------- values


def _normalize_ip(host: str) -> str | None:
    """`host` as PostgreSQL's host() would print it, or None when it is no IP address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@dataclass(frozen=True, slots=True)
class GatewayBackends:
    """The upstream connections that are Backstop's own, as the gateway knows them now.

    `pids`: backend pids from BackendKeyData, plus the pids of Backstop's control
    connections. `addresses`: the local (address, port) of each upstream TCP socket, which
    PostgreSQL reports as that backend's client_addr and client_port.
    """

    pids: frozenset[int] = frozenset()
    addresses: frozenset[tuple[str, int]] = frozenset()
    _normalized: frozenset[tuple[str, int]] = field(
        init=False, repr=False, compare=False, default=frozenset()
    )

    def __post_init__(self) -> None:
        normalized = set()
        for host, port in self.addresses:
            ip = _normalize_ip(host)
            if ip is not None:
                normalized.add((ip, int(port)))
        object.__setattr__(self, "_normalized", frozenset(normalized))

    def owns(self, pid: int, client_addr: str | None, client_port: int | None) -> bool:
        """Whether this backend is one of the gateway's (an exact pid or socket match)."""
        if pid in self.pids:
            return True
        if client_addr is None or client_port is None:
            return False
        ip = _normalize_ip(client_addr)
        return ip is not None and (ip, client_port) in self._normalized


@dataclass(frozen=True, slots=True)
class Backend:
    """One session of pg_stat_activity, as far as the monitor's role may see it."""

    pid: int
    database: str
    role: str
    application_name: str
    client_addr: str | None  # None: a Unix socket, or hidden from the monitor's role
    client_port: int | None
    backend_start: datetime | None
    xact_start: datetime | None
    query_start: datetime | None
    state: str | None
    query: str
    backend_type: str | None

    @property
    def key(self) -> str:
        """The alert key: a pid alone is reused, a pid and its start time are not."""
        return f"{self.pid}:{self.backend_start}"

    @property
    def hidden(self) -> bool:
        """The monitor's role may not see this session's details (no pg_read_all_stats)."""
        return self.backend_type is None and self.query == HIDDEN_QUERY

    @property
    def client(self) -> str:
        if self.client_addr is None:
            return "a local socket"
        host = f"[{self.client_addr}]" if ":" in self.client_addr else self.client_addr
        return f"{host}:{self.client_port}"

    def details(self) -> dict[str, Any]:
        query = self.query
        truncated = len(query) > QUERY_LIMIT
        return {
            "pid": self.pid,
            "role": self.role,
            "database": self.database,
            "client_addr": self.client_addr,
            "client_port": self.client_port,
            "application_name": self.application_name,
            "backend_start": _iso(self.backend_start),
            "backend_type": self.backend_type,
            "state": self.state,
            "xact_start": _iso(self.xact_start),
            "query_start": _iso(self.query_start),
            "query": query[:QUERY_LIMIT] + ("…" if truncated else ""),
            "query_truncated": truncated,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a (non-Backstop) session is a bypass, and why, in words for the operator."""

    bypass: bool
    reason: str


@dataclass(frozen=True, slots=True)
class PollResult:
    """What one look at pg_stat_activity found."""

    ok: bool
    error: str | None = None
    sessions: int = 0  # sessions in the watched databases, the monitor's own left out
    gateway: int = 0  # of which Backstop's own
    excused: int = 0  # of which not agent roles, or excused by an allowed_* setting
    hidden: int = 0  # of which the monitor's role cannot see enough to judge
    bypasses: tuple[Backend, ...] = ()
    opened: tuple[AlertRecord, ...] = ()  # alerts raised for the first time by this poll
    closed: tuple[AlertRecord, ...] = ()  # alerts closed: their session ended or was excused
    terminated: tuple[int, ...] = ()  # pids signalled by this poll


@dataclass(frozen=True, slots=True)
class BypassAlertClosed(Event):
    """A bypass (or bypass-monitor) alert closed: the session ended, or the monitor recovered."""

    alert_id: int
    kind_: str
    key: str
    title: str


# --------------------------------------------------------------------------- pure rules


@lru_cache(maxsize=64)
def _networks(
    addresses: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for address in addresses:
        try:
            networks.append(ipaddress.ip_network(address, strict=False))
        except ValueError:
            log.warning("bypass.allowed_addresses: %r is not an IP address or network", address)
    return tuple(networks)


def address_allowed(allowed: Sequence[str], client_addr: str | None) -> str | None:
    """The entry of `allowed` (addresses or CIDR networks) that holds `client_addr`, if any."""
    if client_addr is None:
        return None
    ip = _normalize_ip(client_addr)
    if ip is None:
        return None
    address = ipaddress.ip_address(ip)
    for entry, network in zip(allowed, _networks(tuple(allowed)), strict=False):
        if address.version == network.version and address in network:
            return entry
    return None


def _first_match(globs: Iterable[str], value: str) -> str | None:
    return next((glob for glob in globs if fnmatchcase(value, glob)), None)


def judge(
    settings: BypassSettings, role: str, application_name: str, client_addr: str | None
) -> Verdict:
    """Is a session that did not come through Backstop a bypass? See the module docstring."""
    agent_glob = _first_match(settings.agent_roles, role)
    if agent_glob is None:
        return Verdict(False, f"role {role!r} matches no bypass.agent_roles entry")
    glob = _first_match(settings.allowed_roles, role)
    if glob is not None:
        return Verdict(False, f"role {role!r} is excused by bypass.allowed_roles {glob!r}")
    glob = _first_match(settings.allowed_applications, application_name)
    if glob is not None:
        return Verdict(
            False,
            f"application {application_name!r} is excused by bypass.allowed_applications {glob!r}",
        )
    network = address_allowed(settings.allowed_addresses, client_addr)
    if network is not None:
        return Verdict(
            False, f"address {client_addr} is excused by bypass.allowed_addresses {network!r}"
        )
    return Verdict(
        True,
        f"role {role!r} matches bypass.agent_roles {agent_glob!r} and no allowed_* entry"
        " excuses the session",
    )


def gateway_backends_of(
    sessions: Iterable[Session], extra_pids: Iterable[int] = ()
) -> GatewayBackends:
    """The gateway's upstream connections, read from its live sessions.

    Call it on the gateway's event loop. `extra_pids`: Backstop's control connections and
    sessions closed a moment ago whose backends may still be finishing.
    """
    pids = set(extra_pids)
    addresses: set[tuple[str, int]] = set()
    for session in sessions:
        if session.backend_pid is not None:
            pids.add(session.backend_pid)
        transport = getattr(session.upstream, "transport", None)
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            addresses.add((str(sockname[0]), int(sockname[1])))
    return GatewayBackends(pids=frozenset(pids), addresses=frozenset(addresses))


# --------------------------------------------------------------------------- the monitor


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text.splitlines()[0]


class BypassMonitor:
    """Polls pg_stat_activity for direct sessions; see the module docstring for the rules."""

    def __init__(
        self,
        dsn: str,
        *,
        policy: Callable[[], Policy],
        store: StateStore,
        bus: EventBus,
        gateway_backends: Callable[[], GatewayBackends] = GatewayBackends,
        databases: Sequence[str] | None = None,
        all_databases: bool = False,
        interval: float | None = None,
        connect_timeout: float = 5.0,
        query_timeout: float = 10.0,
        ssl: Any = None,
    ) -> None:
        """`dsn`: a libpq URL for the control connection (a role with pg_read_all_stats, and
        pg_signal_backend for `terminate`). `databases`: which to watch (default: the DSN's
        own); `all_databases` watches every one. `interval` overrides the policy's."""
        self._dsn = dsn
        self._policy = policy
        self._store = store
        self._bus = bus
        self._gateway_backends = gateway_backends
        self._databases: tuple[str, ...] | None = tuple(databases) if databases else None
        self._all_databases = all_databases
        self._interval = interval
        self._connect_timeout = connect_timeout
        self._query_timeout = query_timeout
        self._ssl = ssl
        self._conn: Any = None  # asyncpg.Connection
        self._lock = asyncio.Lock()
        # (pid, backend_start) of backends once seen as Backstop's, kept while they live.
        self._ours: set[tuple[int, datetime | None]] = set()
        # Alert key -> what terminating that session did; a session is signalled once.
        self._terminations: dict[str, dict[str, Any]] = {}
        self._background: set[asyncio.Future[None]] = set()

    # ---------------------------------------------------------------- running

    @property
    def watched(self) -> tuple[str, ...] | None:
        """The databases watched (None: all); known once connected when defaulted."""
        return None if self._all_databases else self._databases

    def interval(self) -> float:
        return float(self._interval or self._policy().bypass.interval_seconds)

    async def run(self) -> None:
        """Poll until cancelled; never ends on a database or state store failure."""
        backoff = 0.0
        try:
            while True:
                interval = self.interval()
                delay = interval
                try:
                    if self._policy().bypass.enabled:
                        result = await self.poll_once()
                        if result.ok:
                            backoff = 0.0
                        else:
                            backoff = min(
                                max(MAX_BACKOFF_SECONDS, interval),
                                backoff * 2 if backoff else interval,
                            )
                            delay = backoff
                    else:
                        await self._disabled()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("bypass monitor: poll failed; trying again")
                    await self._disconnect()
                await asyncio.sleep(delay)
        finally:
            await self._disconnect()

    async def close(self) -> None:
        """Close the control connection (run() does this itself when cancelled)."""
        await self._disconnect()

    async def _disabled(self) -> None:
        await self._disconnect()
        for key in (MONITOR_KEY, PRIVILEGES_KEY):
            await self._close_alert(MONITOR_ALERT_KIND, key)

    # ---------------------------------------------------------------- one poll

    async def poll_once(self) -> PollResult:
        """Look at pg_stat_activity once, raise, refresh and close alerts, terminate if told.

        A database failure is reported in the result (and as an alert), not raised; a state
        store failure is raised.
        """
        async with self._lock:
            policy = self._policy()
            try:
                backends = await self._fetch()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                return await self._failed(exc)
            recovered = await self._close_alert(MONITOR_ALERT_KIND, MONITOR_KEY)
            if recovered is not None:
                log.info("bypass monitor: watching pg_stat_activity again")
            result = await self._judge_all(policy, backends)
            if recovered is None:
                return result
            return dataclasses.replace(result, closed=(recovered, *result.closed))

    async def _fetch(self) -> list[Backend]:
        if self._conn is None or self._conn.is_closed():
            await self._connect()
        watched = None if self._all_databases else list(self._databases or ())
        rows = await self._conn.fetch(_ACTIVITY_SQL, watched, timeout=self._query_timeout)
        return [
            Backend(
                pid=int(row["pid"]),
                database=str(row["datname"]),
                role=str(row["usename"]),
                application_name=str(row["application_name"] or ""),
                client_addr=row["client_addr"],
                client_port=row["client_port"],
                backend_start=row["backend_start"],
                xact_start=row["xact_start"],
                query_start=row["query_start"],
                state=row["state"],
                query=str(row["query"] or ""),
                backend_type=row["backend_type"],
            )
            for row in rows
        ]

    async def _connect(self) -> None:
        await self._disconnect()
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            ssl=self._ssl,
            server_settings={"application_name": APPLICATION_NAME},
        )
        try:
            if not self._all_databases and not self._databases:
                database = await conn.fetchval("SELECT pg_catalog.current_database()")
                self._databases = (str(database),)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), 2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

    async def _failed(self, exc: BaseException) -> PollResult:
        error = _describe_error(exc)
        await self._disconnect()
        record = await self._raise(
            MONITOR_ALERT_KIND,
            MONITOR_KEY,
            severity="warning",
            title=f"cannot watch pg_stat_activity: {error}",
            details={
                "error": error,
                "databases": list(self._databases) if self._databases else None,
                "note": "direct connections to PostgreSQL go unnoticed until this is fixed",
            },
        )
        # Loud once per outage; the retries that follow are routine.
        log.log(
            logging.WARNING if record else logging.DEBUG,
            "bypass monitor: cannot watch pg_stat_activity: %s",
            error,
        )
        return PollResult(ok=False, error=error, opened=(record,) if record else ())

    async def _judge_all(self, policy: Policy, backends: list[Backend]) -> PollResult:
        settings = policy.bypass
        # Read after the poll: every gateway backend in it already had its socket.
        gateway = self._gateway_backends()
        alive = {(b.pid, b.backend_start) for b in backends}
        self._ours &= alive
        ours = excused = 0
        hidden: list[Backend] = []
        bypasses: list[tuple[Backend, Verdict]] = []
        for backend in backends:
            identity = (backend.pid, backend.backend_start)
            if identity in self._ours or gateway.owns(
                backend.pid, backend.client_addr, backend.client_port
            ):
                self._ours.add(identity)
                ours += 1
                continue
            if backend.hidden:
                hidden.append(backend)
                continue
            if backend.state is None:
                continue  # still starting: it may be a gateway session not yet registered
            verdict = judge(settings, backend.role, backend.application_name, backend.client_addr)
            if verdict.bypass:
                bypasses.append((backend, verdict))
            else:
                excused += 1

        opened: list[AlertRecord] = []
        terminated: list[int] = []
        live_keys = {backend.key for backend, _ in bypasses}
        self._terminations = {k: v for k, v in self._terminations.items() if k in live_keys}
        for backend, verdict in bypasses:
            if (
                settings.action == "terminate"
                and backend.key not in self._terminations
                and not self._gateway_backends().owns(
                    backend.pid, backend.client_addr, backend.client_port
                )
            ):
                outcome = await self._terminate(policy, backend)
                self._terminations[backend.key] = outcome
                if outcome["terminated"]:
                    terminated.append(backend.pid)
            record = await self._raise_bypass(settings, backend, verdict)
            if record is not None:
                opened.append(record)

        record = await self._report_hidden(hidden)
        if record is not None:
            opened.append(record)
        closed = await self._close_ended(live_keys)
        return PollResult(
            ok=True,
            sessions=len(backends),
            gateway=ours,
            excused=excused,
            hidden=len(hidden),
            bypasses=tuple(backend for backend, _ in bypasses),
            opened=tuple(opened),
            closed=tuple(closed),
            terminated=tuple(terminated),
        )

    # ---------------------------------------------------------------- alerts

    async def _raise_bypass(
        self, settings: BypassSettings, backend: Backend, verdict: Verdict
    ) -> AlertRecord | None:
        details = backend.details()
        details["client"] = backend.client
        details["why"] = verdict.reason
        details["action"] = settings.action
        termination = self._terminations.get(backend.key)
        if termination is not None:
            details["termination"] = termination
        app = f", application {backend.application_name!r}" if backend.application_name else ""
        title = (
            f"direct connection to PostgreSQL, bypassing Backstop: role {backend.role} on"
            f" database {backend.database} from {backend.client}{app}"
        )
        if termination is not None and termination["terminated"]:
            title += " (terminated)"
        return await self._raise(
            ALERT_KIND, backend.key, severity="critical", title=title, details=details
        )

    async def _report_hidden(self, hidden: list[Backend]) -> AlertRecord | None:
        if not hidden:
            await self._close_alert(MONITOR_ALERT_KIND, PRIVILEGES_KEY)
            return None
        roles = sorted({b.role for b in hidden})
        return await self._raise(
            MONITOR_ALERT_KIND,
            PRIVILEGES_KEY,
            severity="warning",
            title=(
                f"cannot judge {len(hidden)} session(s) of role(s) {', '.join(roles)}: the"
                " monitor's role lacks pg_read_all_stats"
            ),
            details={
                "sessions": [
                    {"pid": b.pid, "role": b.role, "database": b.database,
                     "application_name": b.application_name}
                    for b in hidden[:50]
                ],
                "fix": "GRANT pg_read_all_stats TO <the monitor's role>",
            },
        )  # fmt: skip

    async def _raise(
        self, kind: str, key: str, *, severity: str, title: str, details: dict[str, Any]
    ) -> AlertRecord | None:
        """Open or refresh the alert; the record when it was newly opened."""
        record, created = await self._store.alert_open(
            kind, key, severity=severity, title=title, details_json=json.dumps(details, default=str)
        )
        if not created:
            return None
        if kind == ALERT_KIND:
            log.warning("bypass: %s", title)
        self._bus.publish(AlertRaised(alert_id=record.id, kind_=kind, title=title, details=details))
        self._notify_webhook(record, details)
        return record

    async def _close_alert(self, kind: str, key: str) -> AlertRecord | None:
        record = await self._store.alert_close(kind, key)
        if record is not None:
            self._bus.publish(
                BypassAlertClosed(alert_id=record.id, kind_=kind, key=key, title=record.title)
            )
        return record

    async def _close_ended(self, live_keys: set[str]) -> list[AlertRecord]:
        closed: list[AlertRecord] = []
        for status in ("open", "acked"):
            for alert in await self._store.alerts_list(status=status, limit=10000):
                if alert.kind == ALERT_KIND and alert.key not in live_keys:
                    record = await self._close_alert(ALERT_KIND, alert.key)
                    if record is not None:
                        closed.append(record)
        return closed

    # ---------------------------------------------------------------- terminate

    async def _terminate(self, policy: Policy, backend: Backend) -> dict[str, Any]:
        agent = resolve_agent(policy, backend.role, backend.application_name)
        app = backend.application_name or "(none)"
        start = AuditStart(
            session_id=f"backend:{backend.pid}",
            agent=agent,
            client=backend.client,
            sql=f"SELECT pg_terminate_backend({backend.pid})",
            operation="TERMINATE_BACKEND",
            risk="HIGH",
            tables=(),
            classification_json="[]",
            decision="terminate",
            rule="bypass",
            reason=(
                f"backstop: role {backend.role} (application {app}) connected to database"
                f" {backend.database} directly from {backend.client}, bypassing Backstop;"
                " bypass.action is terminate"
            ),
        )
        key = self._store.audit_begin(start)
        began = time.monotonic()
        error: str | None = None
        signalled = False
        try:
            value = await self._conn.fetchval(
                _TERMINATE_SQL, backend.pid, backend.backend_start, timeout=self._query_timeout
            )
            signalled = bool(value)
            if value is None:
                error = "the session had already ended"
            elif not signalled:
                error = "PostgreSQL could not signal the backend"
        except asyncpg.PostgresError as exc:
            error = _describe_error(exc)
        finally:
            duration = (time.monotonic() - began) * 1000
        self._store.audit_finish(key, "forwarded" if signalled else "error", duration, error)
        if signalled:
            log.warning(
                "bypass: terminated backend %d (role %s, %s)",
                backend.pid,
                backend.role,
                backend.client,
            )
        else:
            log.warning("bypass: could not terminate backend %d: %s", backend.pid, error)
        return {"terminated": signalled, "error": error, "audit_key": key}

    # ---------------------------------------------------------------- webhook

    def _notify_webhook(self, record: AlertRecord, details: dict[str, Any]) -> None:
        url = self._policy().approval.webhook_url
        if not url:
            return
        payload = {
            "text": f"Backstop alert {record.id} ({record.severity}): {record.title}",
            "alert_id": record.id,
            "kind": record.kind,
            "key": record.key,
            "severity": record.severity,
            "title": record.title,
            "details": details,
        }
        task = asyncio.ensure_future(asyncio.to_thread(_post_json, url, payload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _post_json(url: str, payload: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, default=str).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
            response.read()
    except Exception as exc:  # a webhook failure never stops the monitor
        log.warning("bypass alert webhook %s failed: %s", url, exc)
