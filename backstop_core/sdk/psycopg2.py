"""psycopg2 with Backstop in front: every statement is judged before it leaves the process.

    from backstop_core.sdk.psycopg2 import connect

    conn = connect("dbname=shop user=app", agent="billing-bot")
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM carts WHERE id = %s", (cart_id,))

`connect()` returns a psycopg2 connection (a `connection_factory` subclass) whose cursors,
whatever `cursor_factory` is asked for (DictCursor, RealDictCursor, named cursors...),
judge `execute`, `executemany`, `callproc`, `copy_expert`, `copy_from` and `copy_to`
first. Refusals are Backstop's error classes that are also `psycopg2.Error`
(`psycopg2.errors.InsufficientPrivilege`, or `QueryCanceled` for a timed-out approval),
with `pgcode` set as the gateway would set it. Inside a transaction block a refusal fails
the transaction, as any error does in PostgreSQL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psycopg2  # type: ignore[import-untyped]
import psycopg2.errors  # type: ignore[import-untyped]
import psycopg2.extensions  # type: ignore[import-untyped]

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
    "Connection",
    "Cursor",
    "connect",
]


def _sqlstate_attributes(sqlstate: str) -> dict[str, Any]:
    # psycopg2 fills pgcode/pgerror only from a server's answer; these refusals never
    # reached one, so the class answers what the gateway's ErrorResponse would carry.
    return {
        "pgcode": property(lambda self: sqlstate),
        "pgerror": property(lambda self: str(self)),
    }


ERRORS = driver_errors(
    __name__,
    refused=psycopg2.errors.InsufficientPrivilege,
    timed_out=psycopg2.errors.QueryCanceled,
    namespace=_sqlstate_attributes,
)
BackstopBlocked = ERRORS.blocked
ApprovalRequired = ERRORS.required
ApprovalDenied = ERRORS.denied
ApprovalTimedOut = ERRORS.timed_out

_NOT_CONNINFO = frozenset(("connection_factory", "cursor_factory", "async", "async_"))


def _decode(conn: Any, data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    codec = psycopg2.extensions.encodings.get(conn.encoding, "utf-8")
    return data.decode(codec, "replace")


def statement_text(cursor: Any, query: Any, params: Any) -> str:
    """The statement exactly as psycopg2 sends it: parameters merged by its own mogrify."""
    try:
        return _decode(cursor.connection, cursor.mogrify(query, params))
    except Exception:
        text = _template(cursor, query)
        return pyformat_to_dollar(text) if params is not None else text


def _template(cursor: Any, query: Any) -> str:
    if hasattr(query, "as_string"):
        return str(query.as_string(cursor.connection))
    return _decode(cursor.connection, query)


def _error_text(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Backstop:
    """The guard of one connection: its LocalGuard and session."""

    def __init__(self, guard: LocalGuard, session: LocalSession, owns_guard: bool) -> None:
        self.guard = guard
        self.session = session
        self.owns_guard = owns_guard

    def check(self, conn: Any, sql: str, params: Any = None) -> Ticket:
        try:
            return self.guard.check(sql, params, session=self.session)
        except BackstopError as exc:
            _fail_transaction(conn)
            raise ERRORS.convert(exc) from None

    def observe(self, conn: Any) -> None:
        for name in UNSAFE_PARAMETERS:
            self.session.observe_parameter(name, conn.info.parameter_status(name))

    def close(self) -> None:
        self.session.close()
        if self.owns_guard:
            self.guard.close()


def _fail_transaction(conn: Any) -> None:
    """Inside a transaction block a refused statement fails the transaction, as it does
    through the gateway (and as any error does in PostgreSQL)."""
    if (
        conn.closed
        or conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    ):
        return
    with contextlib.suppress(psycopg2.Error):
        psycopg2.extensions.cursor(conn).execute(REFUSAL_SQL)


def _backstop_of(cursor: Any) -> _Backstop:
    backstop = getattr(cursor.connection, "_backstop", None)
    if not isinstance(backstop, _Backstop):
        raise ERRORS.blocked(
            "backstop: this cursor's connection was not opened with "
            "backstop_core.sdk.psycopg2.connect(), so nothing can be checked; refused"
        )
    return backstop


class Cursor(psycopg2.extensions.cursor):  # type: ignore[misc]
    """A psycopg2 cursor whose statements Backstop judges before they are sent."""

    def _guarded(self, sql: str, params: Any, run: Any) -> Any:
        backstop = _backstop_of(self)
        ticket = backstop.check(self.connection, sql, params)
        try:
            result = run()
        except BaseException as exc:
            ticket.finish(False, _error_text(exc))
            raise
        ticket.finish(True)
        backstop.observe(self.connection)
        return result

    def execute(self, query: Any, vars: Any = None) -> Any:
        text = statement_text(self, query, vars)
        return self._guarded(text, None, lambda: super(Cursor, self).execute(query, vars))

    def executemany(self, query: Any, vars_list: Iterable[Any]) -> Any:
        rows = list(vars_list)
        if not rows:
            return super().executemany(query, rows)
        # Judged as one unit: the statement with its placeholders, and an approval bound to
        # every parameter set.
        text = pyformat_to_dollar(_template(self, query))
        return self._guarded(text, rows, lambda: super(Cursor, self).executemany(query, rows))

    def callproc(self, procname: str, parameters: Any = None) -> Any:
        if isinstance(parameters, Mapping):
            args = ", ".join(f"{name} => %({name})s" for name in parameters)
        else:
            args = ", ".join(["%s"] * len(parameters or ()))
        text = statement_text(self, f"SELECT * FROM {procname}({args})", parameters or None)
        return self._guarded(text, None, lambda: super(Cursor, self).callproc(procname, parameters))

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> Any:
        text = statement_text(self, sql, None)
        return self._guarded(text, None, lambda: super(Cursor, self).copy_expert(sql, file, size))

    def copy_from(
        self,
        file: Any,
        table: str,
        sep: str = "\t",
        null: str = "\\N",
        size: int = 8192,
        columns: Iterable[str] | None = None,
    ) -> Any:
        cols = list(columns) if columns is not None else None
        text = f"COPY {table}{_columns(cols)} FROM stdin"
        return self._guarded(
            text,
            None,
            lambda: super(Cursor, self).copy_from(file, table, sep, null, size, cols),
        )

    def copy_to(
        self,
        file: Any,
        table: str,
        sep: str = "\t",
        null: str = "\\N",
        columns: Iterable[str] | None = None,
    ) -> Any:
        cols = list(columns) if columns is not None else None
        text = f"COPY {table}{_columns(cols)} TO stdout"
        return self._guarded(
            text, None, lambda: super(Cursor, self).copy_to(file, table, sep, null, cols)
        )


def _columns(columns: list[str] | None) -> str:
    return f" ({', '.join(columns)})" if columns else ""


_guarded_classes: dict[type[Any], type[Any]] = {}


def _guarded(factory: type[Any]) -> type[Any]:
    """`factory` itself if Backstop judges its statements, else a subclass that does."""
    if issubclass(factory, Cursor):
        return factory
    cls = _guarded_classes.get(factory)
    if cls is None:
        cls = type(f"Backstop{factory.__name__}", (Cursor, factory), {"__module__": __name__})
        _guarded_classes[factory] = cls
    return cls


class Connection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection whose cursors are always judged by Backstop."""

    _backstop: _Backstop | None = None

    def cursor(
        self,
        name: str | None = None,
        cursor_factory: type[Any] | None = None,
        withhold: bool = False,
        scrollable: bool | None = None,
    ) -> Any:
        factory = cursor_factory or self.cursor_factory or psycopg2.extensions.cursor
        return super().cursor(
            name, cursor_factory=_guarded(factory), withhold=withhold, scrollable=scrollable
        )

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
    dsn: str | None = None,
    *,
    agent: str,
    policy: Policy | Path | str | None = None,
    state_dir: Path | str | None = None,
    wait_for_approval: bool = True,
    approval_timeout: float | None = None,
    guard: LocalGuard | None = None,
    **kwargs: Any,
) -> Connection:
    """psycopg2.connect() with Backstop judging every statement as `agent`.

    `policy`, `state_dir`, `wait_for_approval` and `approval_timeout` configure a
    LocalGuard for this connection; pass `guard=` instead to share one. Other keyword
    arguments go to psycopg2.connect() (cursor_factory, user, password, host, ...).
    """
    if "connection_factory" in kwargs:
        raise TypeError("connection_factory is Backstop's own; subclass sdk.psycopg2.Connection")
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
        conn = psycopg2.connect(dsn, connection_factory=Connection, **kwargs)
    except BaseException:
        if owns:
            guard.close()
        raise
    assert isinstance(conn, Connection)
    params = {k: v for k, v in kwargs.items() if k not in _NOT_CONNINFO}
    estimator = DbapiEstimator(lambda: psycopg2.connect(dsn, **params))
    session = guard.session(user=conn.info.user, database=conn.info.dbname, estimator=estimator)
    backstop = _Backstop(guard, session, owns)
    backstop.observe(conn)
    conn._backstop = backstop
    return conn
