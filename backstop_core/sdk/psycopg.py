"""psycopg 3 with Backstop in front: every statement is judged before it leaves the process.

    from backstop_core.sdk.psycopg import connect

    with connect("postgresql://app@db/shop", agent="billing-bot") as conn:
        conn.execute("DELETE FROM carts WHERE id = %s", (cart_id,))

`connect()` returns a `psycopg.Connection` whose cursors (client-side, server-side and
named ones, `conn.execute`, `executemany`, `copy`, `stream`) ask the shared in-process
guard first. A refusal raises `BackstopBlocked`, `ApprovalRequired`, `ApprovalDenied` or
`ApprovalTimedOut`: Backstop's error classes that are also psycopg's own
(`psycopg.errors.InsufficientPrivilege`, SQLSTATE 42501, or `QueryCanceled`, 57014, for a
timed-out approval), exactly what the gateway would answer. Inside a transaction block a
refusal fails the transaction, as any error does in PostgreSQL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq
from psycopg import sql as pgsql

from backstop_core.classify import UNSAFE_PARAMETERS
from backstop_core.gateway.session import REFUSAL_SQL
from backstop_core.policy import Policy
from backstop_core.sdk.core import (
    BackstopError,
    DbapiEstimator,
    LocalGuard,
    LocalSession,
    Ticket,
    driver_errors,
    pyformat_to_dollar,
)

__all__ = [
    "ApprovalDenied",
    "ApprovalRequired",
    "ApprovalTimedOut",
    "BackstopBlocked",
    "ClientCursor",
    "Connection",
    "Cursor",
    "ServerCursor",
    "connect",
]

ERRORS = driver_errors(
    __name__,
    refused=psycopg.errors.InsufficientPrivilege,
    timed_out=psycopg.errors.QueryCanceled,
)
BackstopBlocked = ERRORS.blocked
ApprovalRequired = ERRORS.required
ApprovalDenied = ERRORS.denied
ApprovalTimedOut = ERRORS.timed_out

# Arguments of psycopg.connect() that are not connection parameters.
_NOT_CONNINFO = frozenset(
    ("autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory")
)


def _query_text(conn: psycopg.Connection[Any], query: Any) -> str:
    if isinstance(query, pgsql.Composable):
        return query.as_string(conn)
    if isinstance(query, bytes):
        return query.decode(conn.info.encoding, "replace")
    return str(query)


def statement_text(conn: psycopg.Connection[Any], query: Any, params: Any) -> str:
    """The statement as PostgreSQL will read it, parameters rendered as literals the way
    psycopg quotes them; `$n` placeholders when they cannot be rendered."""
    try:
        return psycopg.ClientCursor(conn).mogrify(query, params)
    except Exception:
        text = _query_text(conn, query)
        return pyformat_to_dollar(text) if params is not None else text


def _error_text(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Backstop:
    """The guard of one connection: its LocalGuard and session."""

    def __init__(self, guard: LocalGuard, session: LocalSession, owns_guard: bool) -> None:
        self.guard = guard
        self.session = session
        self.owns_guard = owns_guard

    def check(self, conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Ticket:
        try:
            return self.guard.check(sql, params, session=self.session)
        except BackstopError as exc:
            _fail_transaction(conn)
            raise ERRORS.convert(exc) from None

    def observe(self, conn: psycopg.Connection[Any]) -> None:
        for name in UNSAFE_PARAMETERS:
            self.session.observe_parameter(name, conn.info.parameter_status(name))

    def close(self) -> None:
        self.session.close()
        if self.owns_guard:
            self.guard.close()


def _fail_transaction(conn: psycopg.Connection[Any]) -> None:
    """Inside a transaction block a refused statement fails the transaction, as it does
    through the gateway (and as any error does in PostgreSQL)."""
    if conn.closed or conn.pgconn.pipeline_status:
        return
    if conn.info.transaction_status != pq.TransactionStatus.INTRANS:
        return
    with contextlib.suppress(psycopg.Error):
        psycopg.Cursor(conn).execute(REFUSAL_SQL)


def _backstop_of(cursor: psycopg.Cursor[Any]) -> _Backstop:
    backstop = getattr(cursor.connection, "_backstop", None)
    if not isinstance(backstop, _Backstop):
        raise ERRORS.blocked(
            "backstop: this cursor's connection was not opened with "
            "backstop_core.sdk.psycopg.connect(), so nothing can be checked; refused"
        )
    return backstop


def _run(backstop: _Backstop, conn: psycopg.Connection[Any], ticket: Ticket, call: Any) -> None:
    try:
        call()
    except BaseException as exc:
        ticket.finish(False, _error_text(exc))
        raise
    ticket.finish(True)
    backstop.observe(conn)


class Cursor(psycopg.Cursor[Any]):
    """A psycopg cursor whose statements Backstop judges before they are sent."""

    def execute(  # type: ignore[override]
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Cursor:
        backstop = _backstop_of(self)
        conn = self.connection
        ticket = backstop.check(conn, statement_text(conn, query, params))
        _run(
            backstop,
            conn,
            ticket,
            lambda: super(Cursor, self).execute(query, params, prepare=prepare, binary=binary),
        )
        return self

    def executemany(
        self, query: Any, params_seq: Iterable[Any], *, returning: bool = False
    ) -> None:
        backstop = _backstop_of(self)
        conn = self.connection
        rows = list(params_seq)
        if not rows:
            return super().executemany(query, rows, returning=returning)
        # Judged as one unit, like a pipelined batch at the gateway: the statement with its
        # placeholders, and an approval bound to every parameter set.
        text = pyformat_to_dollar(_query_text(conn, query))
        ticket = backstop.check(conn, text, rows)
        _run(
            backstop,
            conn,
            ticket,
            lambda: super(Cursor, self).executemany(query, rows, returning=returning),
        )
        return None

    @contextlib.contextmanager
    def copy(
        self, statement: Any, params: Any = None, *, writer: Any = None
    ) -> Iterator[psycopg.Copy]:
        backstop = _backstop_of(self)
        conn = self.connection
        ticket = backstop.check(conn, statement_text(conn, statement, params))
        try:
            with super().copy(statement, params, writer=writer) as copy:
                yield copy
        except BaseException as exc:
            ticket.finish(False, _error_text(exc))
            raise
        ticket.finish(True)
        backstop.observe(conn)

    def stream(
        self, query: Any, params: Any = None, *, binary: bool | None = None, size: int = 1
    ) -> Iterator[Any]:
        backstop = _backstop_of(self)
        conn = self.connection
        ticket = backstop.check(conn, statement_text(conn, query, params))
        try:
            yield from super().stream(query, params, binary=binary, size=size)
        except GeneratorExit:
            ticket.finish(True)  # the caller stopped reading; the statement did run
            raise
        except BaseException as exc:
            ticket.finish(False, _error_text(exc))
            raise
        ticket.finish(True)


class ClientCursor(Cursor, psycopg.ClientCursor[Any]):
    """psycopg's client-side-binding cursor, judged by Backstop."""


class ServerCursor(psycopg.ServerCursor[Any]):
    """A named (server-side) cursor; its query is judged before the cursor is declared."""

    def execute(  # type: ignore[override]
        self, query: Any, params: Any = None, *, binary: bool | None = None, **kwargs: Any
    ) -> ServerCursor:
        backstop = _backstop_of(self)
        conn = self.connection
        ticket = backstop.check(conn, statement_text(conn, query, params))
        _run(
            backstop,
            conn,
            ticket,
            lambda: super(ServerCursor, self).execute(query, params, binary=binary, **kwargs),
        )
        return self


_guarded_classes: dict[type[Any], type[Any]] = {}


def _guarded(factory: type[Any], guarded_base: type[Any]) -> type[Any]:
    """`factory` itself if Backstop judges its statements, else a subclass that does."""
    if issubclass(factory, guarded_base):
        return factory
    cls = _guarded_classes.get(factory)
    if cls is None:
        cls = type(f"Backstop{factory.__name__}", (guarded_base, factory), {"__module__": __name__})
        _guarded_classes[factory] = cls
    return cls


class Connection(psycopg.Connection[Any]):
    """A psycopg Connection whose cursor factories are always Backstop's."""

    _backstop: _Backstop | None = None

    @property  # type: ignore[override]
    def cursor_factory(self) -> type[Any]:
        return self.__dict__["_cursor_factory"]  # type: ignore[no-any-return]

    @cursor_factory.setter
    def cursor_factory(self, factory: type[Any]) -> None:
        if issubclass(factory, psycopg.ClientCursor) and not issubclass(factory, Cursor):
            self.__dict__["_cursor_factory"] = _guarded(factory, ClientCursor)
        else:
            self.__dict__["_cursor_factory"] = _guarded(factory, Cursor)

    @property  # type: ignore[override]
    def server_cursor_factory(self) -> type[Any]:
        return self.__dict__["_server_cursor_factory"]  # type: ignore[no-any-return]

    @server_cursor_factory.setter
    def server_cursor_factory(self, factory: type[Any]) -> None:
        self.__dict__["_server_cursor_factory"] = _guarded(factory, ServerCursor)

    @property
    def backstop_guard(self) -> LocalGuard:
        """The in-process guard judging this connection's statements."""
        if self._backstop is None:
            raise RuntimeError("this connection has no Backstop guard")
        return self._backstop.guard

    def close(self) -> None:
        try:
            super().close()
        finally:
            backstop, self._backstop = self._backstop, None
            if backstop is not None:
                backstop.close()


def connect(
    dsn: str = "",
    *,
    agent: str,
    policy: Policy | Path | str | None = None,
    state_dir: Path | str | None = None,
    wait_for_approval: bool = True,
    approval_timeout: float | None = None,
    guard: LocalGuard | None = None,
    **kwargs: Any,
) -> Connection:
    """psycopg.connect() with Backstop judging every statement as `agent`.

    `policy`, `state_dir`, `wait_for_approval` and `approval_timeout` configure a
    LocalGuard for this connection; pass `guard=` instead to share one. Other keyword
    arguments go to psycopg.connect() (autocommit, row_factory, cursor_factory, user, ...).
    """
    owns = guard is None
    if guard is None:
        guard = LocalGuard(
            agent=agent,
            policy=policy,
            state_dir=state_dir,
            wait_for_approval=wait_for_approval,
            approval_timeout=approval_timeout,
        )
    try:
        conn = Connection.connect(dsn, **kwargs)
    except BaseException:
        if owns:
            guard.close()
        raise
    params = {k: v for k, v in kwargs.items() if k not in _NOT_CONNINFO}
    estimator = DbapiEstimator(lambda: psycopg.connect(dsn, autocommit=True, **params))
    session = guard.session(user=conn.info.user, database=conn.info.dbname, estimator=estimator)
    backstop = _Backstop(guard, session, owns)
    backstop.observe(conn)
    conn._backstop = backstop
    return conn
