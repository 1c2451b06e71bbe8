"""The in-process guard the driver SDKs share: the gateway's classifier, policy and audit,
run inside the application before a statement leaves it.

`LocalGuard.check(sql)` classifies the SQL, decides under the policy and journals the
statement before it may run; it raises a `BackstopError` instead when the statement is
blocked, needs a snapshot (the SDK has no snapshot store), needs an approval that is not
waited for, or is denied or times out. Approvals live in the same state store the gateway
and `backstop approve` use, so an operator decides them the same way.

The state store is asynchronous (aiosqlite) while drivers such as psycopg2 are not: one
private event loop on a daemon thread per state directory owns the Store, and synchronous
callers hand it work with `run_coroutine_threadsafe`. Classification and policy evaluation
run in the caller's thread; they do no I/O.

This is a guard rail for code that means well, not a security boundary: code in the same
process can always reach the socket. The gateway is the boundary.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any, ClassVar, NoReturn, Protocol, TypeVar

from backstop_core.approvals import describe
from backstop_core.classify import Classification, Classifier, lexer_unsafe_setting
from backstop_core.gateway.estimate import Estimate, with_estimate
from backstop_core.gateway.guard import (
    GuardSession,
    Judgement,
    classification_json,
    redact,
    statement_hash,
)
from backstop_core.policy import (
    Action,
    Decision,
    Policy,
    PolicyError,
    default_policy,
    evaluate,
    load_policy,
)
from backstop_core.store import ApprovalRecord, AuditStart, Store, StoreError

__all__ = [
    "ApprovalDenied",
    "ApprovalRequired",
    "ApprovalTimedOut",
    "BackstopBlocked",
    "BackstopError",
    "ErrorClasses",
    "Estimator",
    "LocalGuard",
    "LocalSession",
    "Ticket",
    "default_state_dir",
    "driver_errors",
    "judgement_of",
    "pyformat_to_dollar",
]

log = logging.getLogger("backstop.sdk")

T = TypeVar("T")

_ESTIMATED = frozenset(("UPDATE", "DELETE", "MERGE"))
POLL_INTERVAL = 0.05
# An approval granted while nobody waited stays usable for a retry this long at least.
_MIN_RETRY_WINDOW = 60.0


# ------------------------------------------------------------------------------ errors


class BackstopError(Exception):
    """What every Backstop refusal is, whatever driver error class it also is.

    `decision` is the policy action (`block`, `approve`, ...), `reason` the text written for
    the agent (it starts with ``backstop:``), `approval_id` the approval involved, if any.
    """

    decision: str = "block"
    reason: str = ""
    approval_id: int | None = None


class BackstopBlocked(BackstopError):
    """The policy blocks the statement, or it needs a snapshot the SDK cannot take."""


class ApprovalRequired(BackstopError):
    """The statement needs an operator's approval and the guard does not wait for one.

    The pending approval exists (`approval_id`); once an operator approves it, running the
    identical statement again goes through."""


class ApprovalDenied(BackstopError):
    """An operator denied the approval (or it was cancelled or already used)."""


class ApprovalTimedOut(BackstopError):
    """No operator decided within the approval timeout."""


E = TypeVar("E", bound=BackstopError)


def _filled(exc: E, *, decision: str, reason: str, approval_id: int | None) -> E:
    exc.decision = decision
    exc.reason = reason
    exc.approval_id = approval_id
    return exc


@dataclass(frozen=True, slots=True)
class ErrorClasses:
    """The four refusal classes one driver raises; each is also a `BackstopError`."""

    blocked: type[BackstopBlocked]
    required: type[ApprovalRequired]
    denied: type[ApprovalDenied]
    timed_out: type[ApprovalTimedOut]

    def class_for(self, exc: BackstopError) -> type[BackstopError]:
        if isinstance(exc, ApprovalRequired):
            return self.required
        if isinstance(exc, ApprovalDenied):
            return self.denied
        if isinstance(exc, ApprovalTimedOut):
            return self.timed_out
        return self.blocked

    def convert(self, exc: BackstopError) -> BackstopError:
        """The same refusal as this driver's class (built with the message as sole argument)."""
        cls = self.class_for(exc)
        if isinstance(exc, cls):
            return exc
        return _filled(
            cls(exc.reason), decision=exc.decision, reason=exc.reason, approval_id=exc.approval_id
        )


CORE_ERRORS = ErrorClasses(BackstopBlocked, ApprovalRequired, ApprovalDenied, ApprovalTimedOut)


def driver_errors(
    module: str,
    *,
    refused: type[Exception],
    timed_out: type[Exception],
    namespace: Callable[[str], dict[str, Any]] | None = None,
) -> ErrorClasses:
    """Refusal classes that are both Backstop's and a driver's own error classes.

    `refused` is the driver's class for SQLSTATE 42501 (insufficient_privilege, what the
    gateway answers for a refusal), `timed_out` the one for 57014 (query_canceled, what it
    answers for an approval that timed out). `namespace(sqlstate)` adds class attributes,
    for drivers whose SQLSTATE attribute is filled only from a server's answer.
    """

    def make(core: type[BackstopError], base: type[Exception], sqlstate: str) -> Any:
        body: dict[str, Any] = {"__module__": module, "__doc__": core.__doc__}
        if namespace is not None:
            body.update(namespace(sqlstate))
        return type(core.__name__, (core, base), body)

    return ErrorClasses(
        blocked=make(BackstopBlocked, refused, "42501"),
        required=make(ApprovalRequired, refused, "42501"),
        denied=make(ApprovalDenied, refused, "42501"),
        timed_out=make(ApprovalTimedOut, timed_out, "57014"),
    )


# ------------------------------------------------------------------------------ helpers

_PYFORMAT = re.compile(r"%(?:\((?P<name>[^)]+)\))?(?P<fmt>[sbt%])")


def pyformat_to_dollar(query: str) -> str:
    """`%s`, `%b`, `%t` and `%(name)s` placeholders as PostgreSQL's `$1`, `$2`, ...

    What psycopg sends for server-side binding; `%%` becomes `%`. Used to classify a
    statement whose parameters cannot be rendered as literals (executemany, binary ones).
    """
    names: dict[str, int] = {}
    position = count(1)

    def placeholder(match: re.Match[str]) -> str:
        if match.group("fmt") == "%":
            return "%"
        name = match.group("name")
        if name is None:
            return f"${next(position)}"
        if name not in names:
            names[name] = next(position)
        return f"${names[name]}"

    return _PYFORMAT.sub(placeholder, query)


def _param_bytes(params: object) -> tuple[bytes | None, ...]:
    """Parameters as the bytes the approval fingerprint hashes (strings of the values)."""
    if params is None:
        return ()
    if isinstance(params, Mapping):
        items: list[object] = [f"{k}={v!r}" for k, v in sorted(params.items(), key=str)]
    elif isinstance(params, (str, bytes)):
        items = [params]
    elif isinstance(params, Sequence):
        items = list(params)
    else:
        items = [params]
    out: list[bytes | None] = []
    for item in items:
        if item is None:
            out.append(None)
        elif isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, (Mapping, Sequence)) and not isinstance(item, str):
            out.append(b"\x00".join(v or b"\x01" for v in _param_bytes(item)))
        else:
            out.append(str(item).encode())
    return tuple(out)


def default_state_dir() -> Path:
    """BACKSTOP_STATE_DIR, else ./.backstop: the gateway's and the CLI's default."""
    return Path(os.environ.get("BACKSTOP_STATE_DIR") or ".backstop")


def _plan_rows(plan: Any) -> int | None:
    data = json.loads(plan) if isinstance(plan, (str, bytes)) else plan
    node = data[0]["Plan"]
    # A ModifyTable node plans 0 rows out; the rows it changes come from its input.
    if node.get("Node Type") == "ModifyTable" and node.get("Plans"):
        node = node["Plans"][0]
    rows = node.get("Plan Rows")
    return int(rows) if rows is not None else None


# ------------------------------------------------------------------------------ estimates


class Estimator(Protocol):
    """Asks PostgreSQL, on a connection of its own, what the gateway's control connection
    asks: row estimates (EXPLAIN, never ANALYZE) and the WAL position."""

    def estimate(self, sql: str, tables: tuple[str, ...], timeout_ms: int) -> Estimate: ...

    def wal_lsn(self) -> str | None: ...

    def close(self) -> None: ...


class DbapiEstimator:
    """An Estimator over a DB-API connection (psycopg, psycopg2, ...) opened on first use
    with `connect()`, in autocommit mode, and never guarded or audited itself."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._conn: Any = None
        self._lock = threading.Lock()

    def _cursor(self) -> Any:
        if self._conn is None or getattr(self._conn, "closed", False):
            self._conn = self._connect()
            self._conn.autocommit = True
        return self._conn.cursor()

    def estimate(self, sql: str, tables: tuple[str, ...], timeout_ms: int) -> Estimate:
        with self._lock:
            try:
                cur = self._cursor()
                try:
                    cur.execute("BEGIN READ ONLY")
                    cur.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
                    table_rows = None
                    if tables:
                        cur.execute(
                            "SELECT c.reltuples::bigint FROM pg_catalog.pg_class c "
                            "WHERE c.oid = pg_catalog.to_regclass(%s)",
                            (tables[0],),
                        )
                        row = cur.fetchone()
                        if row is not None and row[0] is not None and row[0] >= 0:
                            table_rows = int(row[0])
                    cur.execute("EXPLAIN (FORMAT JSON) " + sql)
                    row = cur.fetchone()
                    return Estimate(_plan_rows(row[0]) if row else None, table_rows)
                finally:
                    with contextlib.suppress(Exception):
                        cur.execute("ROLLBACK")
                        cur.close()
            except Exception as exc:
                return Estimate(None, None, f"no row estimate: {str(exc).strip()}")

    def wal_lsn(self) -> str | None:
        with self._lock:
            try:
                cur = self._cursor()
                cur.execute("SELECT pg_catalog.pg_current_wal_lsn()::text")
                row = cur.fetchone()
                cur.close()
                return str(row[0]) if row else None
            except Exception as exc:
                log.warning("could not read the WAL position: %s", exc)
                return None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None


# ------------------------------------------------------------------------------ the store


class _StoreHost:
    """One Store on a private event loop thread, shared by every guard of a state dir."""

    _hosts: ClassVar[dict[Path, _StoreHost]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.users = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"backstop-sdk-store:{state_dir}", daemon=True
        )
        self._thread.start()
        try:
            self.store: Store = self.call(self._open())
        except BaseException:
            self._stop_loop()
            raise
        self.approval_version = 0

    @classmethod
    def acquire(cls, state_dir: Path) -> _StoreHost:
        key = state_dir.expanduser().resolve()
        with cls._lock:
            host = cls._hosts.get(key)
            if host is None:
                host = cls(key)
                cls._hosts[key] = host
            host.users += 1
            return host

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            self._hosts.pop(self.state_dir, None)
        self.close()

    @classmethod
    def close_all(cls) -> None:
        with cls._lock:
            hosts = list(cls._hosts.values())
            cls._hosts.clear()
        for host in hosts:
            host.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _open(self) -> Store:
        store = await Store.open(self.state_dir)
        store.start_ingest()
        self.approval_version, _ = await store.approval_changes_since(0)
        return store

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the store's loop and wait; cancels it if the caller is interrupted."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            if not future.done():
                future.cancel()
                # Let the coroutine record the cancellation before the caller moves on.
                with contextlib.suppress(BaseException):
                    concurrent.futures.wait([future], timeout=5)
            raise

    def run(self, fn: Callable[[], T]) -> T:
        """Call `fn` on the store's loop thread (the Store's audit methods demand it)."""

        async def on_loop() -> T:
            return fn()

        return self.call(on_loop())

    def soon(self, fn: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.store.close(), timeout=30)
        except Exception as exc:
            log.warning("closing the state store %s failed: %s", self.state_dir, exc)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


atexit.register(_StoreHost.close_all)


# ------------------------------------------------------------------------------ the guard

_session_numbers = count(1)


@dataclass
class LocalSession:
    """What the guard remembers about one driver connection (the gateway's GuardSession)."""

    session_id: str
    state: GuardSession
    estimator: Estimator | None = None

    def observe_parameter(self, name: str, value: str | None) -> None:
        """A server setting as the connection reports it; settings that make PostgreSQL's
        lexer disagree with Backstop's refuse every later statement, as at the gateway."""
        if value is None:
            return
        reason = lexer_unsafe_setting(name, value)
        if reason is not None:
            self.state.lexer_unsafe = reason
        elif name in ("standard_conforming_strings", "client_encoding"):
            self.state.lexer_unsafe = None

    def close(self) -> None:
        if self.estimator is not None:
            self.estimator.close()


@dataclass
class Ticket:
    """Permission for one statement to run; `finish` records how it ended."""

    guard: LocalGuard
    key: str
    decision: Decision
    approval_id: int | None = None
    started: float = field(default_factory=time.perf_counter)
    _done: bool = False

    def finish(self, ok: bool, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        duration = (time.perf_counter() - self.started) * 1000
        self.guard._finish(self.key, "forwarded" if ok else "error", duration, error)


class LocalGuard:
    """The gateway's judgement, in-process, for synchronous code.

    `policy` is a Policy, a policy file (reloaded when it changes; an invalid edit keeps the
    last good policy) or None for the built-in default. `state_dir` is the state directory
    shared with the gateway and the `backstop` CLI (default: BACKSTOP_STATE_DIR, else
    ./.backstop). `approval_timeout` shortens the policy's approval timeout (seconds).
    `on_notice` receives what the gateway would send as a NoticeResponse (the wait for an
    approval); by default it is logged as a warning on the ``backstop.sdk`` logger.
    """

    def __init__(
        self,
        *,
        agent: str,
        policy: Policy | Path | str | None = None,
        state_dir: Path | str | None = None,
        wait_for_approval: bool = True,
        approval_timeout: float | None = None,
        on_notice: Callable[[str], None] | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        if not agent:
            raise ValueError("agent must name the agent whose statements these are")
        self.agent = agent
        self.wait_for_approval = wait_for_approval
        self.approval_timeout = approval_timeout
        self.poll_interval = poll_interval
        self.on_notice = on_notice
        self._policy_path: Path | None = None
        self._policy_stamp: tuple[int, int] | None = None
        if isinstance(policy, (str, Path)):
            self._policy_path = Path(policy)
            self._policy_stamp = self._stamp()
            self._policy = load_policy(self._policy_path)
        else:
            self._policy = policy if policy is not None else default_policy()
        self._classifier = Classifier()
        self._host: _StoreHost | None = _StoreHost.acquire(
            Path(state_dir) if state_dir is not None else default_state_dir()
        )
        self._default = self.session()

    # ---------------------------------------------------------------- life

    @property
    def store(self) -> Store:
        return self._live().store

    @property
    def state_dir(self) -> Path:
        return self._live().state_dir

    def _live(self) -> _StoreHost:
        if self._host is None:
            raise RuntimeError("this Backstop guard is closed")
        return self._host

    def close(self) -> None:
        """Release the state store (closed when its last guard closes, or at exit)."""
        host, self._host = self._host, None
        if host is not None:
            self._default.close()
            host.release()

    def __enter__(self) -> LocalGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def session(
        self,
        *,
        user: str = "",
        database: str = "",
        client: str | None = None,
        estimator: Estimator | None = None,
    ) -> LocalSession:
        """State for one driver connection: prepared statements, lexer safety, estimates."""
        number = next(_session_numbers)
        return LocalSession(
            session_id=f"sdk-{os.getpid()}-{number}",
            state=GuardSession(
                agent=self.agent,
                user=user,
                database=database,
                client=client or f"in-process pid {os.getpid()}",
            ),
            estimator=estimator,
        )

    # ---------------------------------------------------------------- policy

    def _stamp(self) -> tuple[int, int] | None:
        assert self._policy_path is not None
        try:
            st = os.stat(self._policy_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    @property
    def policy(self) -> Policy:
        """The policy in force, reloaded first if its file changed."""
        if self._policy_path is not None:
            stamp = self._stamp()
            if stamp is not None and stamp != self._policy_stamp:
                self._policy_stamp = stamp
                try:
                    self._policy = load_policy(self._policy_path)
                except (PolicyError, OSError) as exc:
                    log.error(
                        "policy file is invalid, keeping version %s: %s", self._policy.version, exc
                    )
        return self._policy

    # ---------------------------------------------------------------- judging

    def judge(self, sql: str, session: LocalSession | None = None) -> Judgement:
        """Classification and decision for `sql`, without estimates and without audit."""
        state = (session or self._default).state
        statements = self._classifier.classify(sql, state.search_path)
        statements = tuple(_substitute(c, state) for c in statements)
        return judgement_of(statements, self.policy, state.agent)

    def check(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        session: LocalSession | None = None,
    ) -> Ticket:
        """Decide `sql` and journal it; the returned Ticket lets it run.

        `sql` is the text PostgreSQL will parse: parameters either rendered into it as
        literals or written `$1`, `$2` (then `params` binds the approval to their values).
        Raises BackstopBlocked, ApprovalRequired, ApprovalDenied or ApprovalTimedOut.
        """
        host = self._live()
        session = session or self._default
        state = session.state
        policy = self.policy
        if state.lexer_unsafe is not None:
            message = (
                f"backstop: refused: {state.lexer_unsafe}. Every statement is refused until "
                "the setting is restored; reconnect to start a clean session."
            )
            self._refuse_unjudged(session, sql, message)
        statements = self._classifier.classify(sql, state.search_path)
        statements = tuple(_substitute(c, state) for c in statements)
        for statement in statements:
            if statement.prepared_name is not None and statement.prepared is not None:
                state.prepared[statement.prepared_name] = statement.prepared
        judgement = judgement_of(statements, policy, state.agent)
        if judgement.decision.action is Action.BLOCK:
            self._refuse(session, sql, judgement, judgement.decision)
        wal_lsn = None
        if judgement.needs_database and session.estimator is not None:
            judgement = self._with_estimates(session.estimator, judgement, policy, state.agent)
            if judgement.decision.action is Action.BLOCK:
                self._refuse(session, sql, judgement, judgement.decision)
            if any(c.table_destructive for c in judgement.statements):
                wal_lsn = session.estimator.wal_lsn()
        decision = judgement.decision
        if decision.action is Action.ALLOW:
            key = self._begin(session, sql, judgement, decision, wal_lsn=wal_lsn)
            return Ticket(self, key, decision)
        if decision.action.needs_snapshot:
            refusal = replace(
                decision,
                reason=f"{decision.reason} No snapshot store is configured for the in-process "
                "guard, so no restore path can be verified; the statement is refused. Run it "
                "through the Backstop gateway with a snapshot store (--store).",
            )
            self._refuse(session, sql, judgement, refusal)
        fingerprint = statement_hash(sql, _param_bytes(params))
        return host.call(self._hold(session, sql, params, judgement, fingerprint, wal_lsn, policy))

    def _with_estimates(
        self, estimator: Estimator, judgement: Judgement, policy: Policy, agent: str
    ) -> Judgement:
        if policy.estimate.timeout_ms <= 0:
            return judgement
        estimated: list[Classification] = []
        for statement in judgement.statements:
            if statement.operation not in _ESTIMATED:
                estimated.append(statement)
                continue
            estimate = estimator.estimate(
                statement.sql, statement.tables, policy.estimate.timeout_ms
            )
            estimated.append(with_estimate(statement, estimate))
        return judgement_of(tuple(estimated), policy, agent)

    # ---------------------------------------------------------------- audit

    def _audit_start(
        self,
        session: LocalSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        approval_id: int | None = None,
        wal_lsn: str | None = None,
    ) -> AuditStart:
        text = redact(sql) if self.policy.audit.redact_literals else sql
        estimate = max(
            (c.row_estimate for c in judgement.statements if c.row_estimate is not None),
            default=None,
        )
        return AuditStart(
            session_id=session.session_id,
            agent=session.state.agent,
            client=session.state.client,
            sql=text,
            operation=judgement.operation,
            risk=judgement.risk,
            tables=judgement.tables,
            classification_json=judgement.classification_json,
            decision=str(decision.action),
            rule=decision.rule,
            reason=decision.reason,
            row_estimate=estimate,
            approval_id=approval_id,
            wal_lsn=wal_lsn,
        )

    def _begin(
        self,
        session: LocalSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        *,
        approval_id: int | None = None,
        wal_lsn: str | None = None,
    ) -> str:
        """Journal the statement (durable on return) before it may run."""
        start = self._audit_start(session, sql, judgement, decision, approval_id, wal_lsn)
        store = self.store
        return self._live().run(lambda: store.audit_begin(start))

    def _finish(self, key: str, outcome: str, duration_ms: float, error: str | None) -> None:
        host = self._host
        if host is not None:
            store = host.store
            host.soon(lambda: store.audit_finish(key, outcome, duration_ms, error))

    def _refuse(
        self, session: LocalSession, sql: str, judgement: Judgement, decision: Decision
    ) -> NoReturn:
        """Audit a refusal and raise it."""
        start = self._audit_start(session, sql, judgement, decision)
        store = self.store

        def record() -> None:
            key = store.audit_begin(start)
            store.audit_finish(key, "blocked", 0.0, decision.reason)

        self._live().run(record)
        raise _filled(
            BackstopBlocked(decision.reason),
            decision=str(decision.action),
            reason=decision.reason,
            approval_id=None,
        )

    def _refuse_unjudged(self, session: LocalSession, sql: str, message: str) -> NoReturn:
        judgement = Judgement(
            statements=(),
            decision=Decision(Action.BLOCK, "lexer-safety", message),
            operation="UNPARSEABLE",
            risk="CRITICAL",
            tables=(),
            classification_json="[]",
            needs_database=False,
        )
        self._refuse(session, sql, judgement, judgement.decision)

    # ---------------------------------------------------------------- approvals

    def _notice(self, text: str) -> None:
        if self.on_notice is not None:
            try:
                self.on_notice(text)
            except Exception:
                log.exception("the on_notice callback failed")
        else:
            log.warning("%s", text)

    async def _hold(
        self,
        session: LocalSession,
        sql: str,
        params: object,
        judgement: Judgement,
        fingerprint: str,
        wal_lsn: str | None,
        policy: Policy,
    ) -> Ticket:
        """On the store's loop: reuse an approval, wait for a new one, or ask for one."""
        host = self._live()
        store = host.store
        decision = judgement.decision
        agent = session.state.agent
        timeout = float(policy.approval.timeout_seconds)
        if self.approval_timeout is not None:
            timeout = min(timeout, self.approval_timeout)
        # An approval granted for this very statement while nobody waited (ApprovalRequired).
        since = datetime.now(UTC) - timedelta(seconds=max(timeout, _MIN_RETRY_WINDOW))
        recent = await store.approval_find_recent(fingerprint=fingerprint, agent=agent, since=since)
        if (
            recent is not None
            and recent.status == "approved"
            and recent.session_id.startswith("sdk-")
            and await store.approval_mark_used(recent.id)
        ):
            key = store.audit_begin(
                self._audit_start(session, sql, judgement, decision, recent.id, wal_lsn)
            )
            return Ticket(self, key, decision, approval_id=recent.id)
        window = policy.approval.auto_approve_window_seconds
        if window > 0:
            since = datetime.now(UTC) - timedelta(seconds=window)
            recent = await store.approval_find_recent(
                fingerprint=fingerprint, agent=agent, since=since
            )
            if recent is not None:
                auto = Decision(
                    Action.ALLOW,
                    f"auto-approved:{recent.id}",
                    f"backstop: approved again automatically: approval {recent.id} by "
                    f"{recent.decided_by} covers the identical statement within {window} s",
                )
                key = store.audit_begin(self._audit_start(session, sql, judgement, auto))
                return Ticket(self, key, auto)
        if not self.wait_for_approval:
            for pending in await store.approvals_list(status="pending", limit=1000):
                if pending.fingerprint == fingerprint and pending.agent == agent:
                    start = self._audit_start(session, sql, judgement, decision, pending.id)
                    key = store.audit_begin(start)
                    store.audit_finish(key, "blocked", 0.0, f"approval {pending.id} pending")
                    self._ask(judgement, pending.id, timeout)
        version, _ = await store.approval_changes_since(host.approval_version)
        host.approval_version = max(host.approval_version, version)
        key = store.audit_begin(self._audit_start(session, sql, judgement, decision, None, wal_lsn))
        record = await store.approval_create(
            agent=agent,
            client=session.state.client,
            session_id=session.session_id,
            sql=sql,
            sql_hash=statement_hash(sql),
            params_hash=statement_hash("", _param_bytes(params)) if params else None,
            operation=judgement.operation,
            tables=judgement.tables,
            risk=judgement.risk,
            classification_json=judgement.classification_json,
            rule=decision.rule,
            reason=decision.reason,
            expires_at=datetime.now(UTC) + timedelta(seconds=timeout),
            row_estimate=_rows(judgement),
            table_rows=_table_rows(judgement),
            audit_key=key,
            fingerprint=fingerprint,
        )
        store.audit_attach(key, approval_id=record.id)
        if not self.wait_for_approval:
            store.audit_finish(key, "blocked", 0.0, f"approval {record.id} requested; not waiting")
            self._ask(judgement, record.id, timeout)
        self._notice(
            f"backstop: waiting for approval {record.id} — {describe(judgement)}; "
            f"an operator must approve within {timeout:g} s "
            f"(backstop approve {record.id}  or  backstop deny {record.id} --reason TEXT)"
        )
        try:
            decided = await self._wait(store, record.id, version, timeout)
        except asyncio.CancelledError:
            # The caller gave up (Ctrl-C): the statement must never run later.
            with contextlib.suppress(StoreError):
                await store.approval_set_status(
                    record.id, "cancelled", "the client stopped waiting"
                )
            store.audit_finish(key, "cancelled", 0.0, "the client stopped waiting")
            raise
        what = describe(judgement)
        if decided.status == "approved":
            if not await store.approval_mark_used(decided.id):
                message = f"backstop: approval {decided.id} was already used; ask again"
                store.audit_finish(key, "denied", 0.0, message)
                raise _filled(
                    ApprovalDenied(message),
                    decision="approve",
                    reason=message,
                    approval_id=decided.id,
                )
            return Ticket(self, key, decision, approval_id=decided.id)
        if decided.status in ("denied", "cancelled", "used"):
            why = decided.decision_reason or "no reason given"
            by = decided.decided_by or "Backstop"
            message = (
                f"backstop: approval {decided.id} for {what} was {decided.status} by {by}: {why}"
            )
            store.audit_finish(key, "denied", 0.0, why)
            raise _filled(
                ApprovalDenied(message), decision="approve", reason=message, approval_id=decided.id
            )
        message = (
            f"backstop: approval {decided.id} for {what} timed out: no operator decided within "
            f"{timeout:g} s. The statement did not run; ask an operator and retry."
        )
        store.audit_finish(key, "timed_out", 0.0, "approval timed out")
        raise _filled(
            ApprovalTimedOut(message), decision="approve", reason=message, approval_id=decided.id
        )

    @staticmethod
    def _ask(judgement: Judgement, approval_id: int, timeout: float) -> NoReturn:
        message = (
            f"backstop: approval {approval_id} is needed — {describe(judgement)}. "
            f"{judgement.decision.reason} An operator approves it with `backstop approve "
            f"{approval_id}` within {timeout:g} s; then run the identical statement again."
        )
        raise _filled(
            ApprovalRequired(message), decision="approve", reason=message, approval_id=approval_id
        )

    async def _wait(
        self, store: Store, approval_id: int, version: int, seconds: float
    ) -> ApprovalRecord:
        deadline = time.monotonic() + seconds
        while True:
            version, changed = await store.approval_changes_since(version)
            for record in changed:
                if record.id == approval_id and record.status != "pending":
                    return record
            if time.monotonic() >= deadline:
                try:
                    return await store.approval_set_status(
                        approval_id, "expired", "no decision within the approval timeout"
                    )
                except StoreError:
                    # Decided in the very last moment: that decision stands.
                    final = await store.approval_get(approval_id)
                    assert final is not None
                    return final
            await asyncio.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))


def _substitute(statement: Classification, state: GuardSession) -> Classification:
    if statement.executes is None:
        return statement
    prepared = state.prepared.get(statement.executes)
    if prepared is None:
        return statement
    return replace(
        prepared,
        sql=statement.sql,
        reasons=(f"runs prepared statement {statement.executes}", *prepared.reasons),
    )


def judgement_of(statements: tuple[Classification, ...], policy: Policy, agent: str) -> Judgement:
    decision = evaluate(policy, statements, agent)
    lead = max(statements, key=lambda c: c.risk) if statements else None
    tables = tuple(dict.fromkeys(t for c in statements for t in c.tables))
    needs_database = decision.action is not Action.BLOCK and any(
        c.operation in _ESTIMATED or c.table_destructive for c in statements
    )
    return Judgement(
        statements=statements,
        decision=decision,
        operation=lead.operation if lead else "EMPTY",
        risk=str(lead.risk) if lead else "LOW",
        tables=tables,
        classification_json=classification_json(statements),
        needs_database=needs_database,
    )


def _rows(judgement: Judgement) -> int | None:
    known = [c.row_estimate for c in judgement.statements if c.row_estimate is not None]
    return max(known) if known else None


def _table_rows(judgement: Judgement) -> int | None:
    known = [c.table_rows for c in judgement.statements if c.table_rows is not None]
    return max(known) if known else None
