"""SQLAlchemy with Backstop in front: every statement an Engine sends is judged first.

    from sqlalchemy import create_engine
    from backstop_core.sdk.sqlalchemy import protect

    engine = create_engine("postgresql+psycopg://app@db/shop")
    protect(engine, agent="billing-bot")

`protect()` listens to the engine's `before_cursor_execute` event (Core, ORM, and
`exec_driver_sql` alike), so nothing reaches the DBAPI cursor unjudged, and to
`after_cursor_execute` and `handle_error` for outcomes. A refusal surfaces as SQLAlchemy
surfaces any database error, as a `sqlalchemy.exc.DBAPIError` (`ProgrammingError`, or
`OperationalError` for a timed-out approval) whose `.orig` is the driver-level error;
the raised object is also Backstop's (`BackstopBlocked`, `ApprovalRequired`,
`ApprovalDenied`, `ApprovalTimedOut`), with `.reason`, `.decision` and `.approval_id`.

Any PostgreSQL dialect works. With psycopg and psycopg2 the judged text has the
parameters rendered exactly as the driver renders them, and row estimates come from a
connection of the guard's own; with other drivers (asyncpg, pg8000) the statement is
judged with `$n` placeholders and without row estimates. An AsyncEngine is protected
through its `sync_engine`; a wait for approval then blocks its event loop, so prefer
`wait_for_approval=False` there.
"""

from __future__ import annotations

import re
import weakref
from itertools import count
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.engine.interfaces import Dialect

from backstop_core.classify import UNSAFE_PARAMETERS
from backstop_core.policy import Policy
from backstop_core.sdk.core import (
    BackstopError,
    DbapiEstimator,
    ErrorClasses,
    Estimator,
    LocalGuard,
    LocalSession,
    Ticket,
    _filled,
    driver_errors,
    pyformat_to_dollar,
)

__all__ = [
    "ApprovalDenied",
    "ApprovalRequired",
    "ApprovalTimedOut",
    "BackstopBlocked",
    "protect",
]

# SQLAlchemy-level classes: what the application catches (each is a DBAPIError too).
ERRORS = driver_errors(
    __name__,
    refused=sqlalchemy.exc.ProgrammingError,
    timed_out=sqlalchemy.exc.OperationalError,
)
BackstopBlocked = ERRORS.blocked
ApprovalRequired = ERRORS.required
ApprovalDenied = ERRORS.denied
ApprovalTimedOut = ERRORS.timed_out

_protected: weakref.WeakKeyDictionary[Engine, LocalGuard] = weakref.WeakKeyDictionary()
_SESSION = "backstop.session"
_TICKET = "backstop.ticket"

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_NUMERIC = re.compile(r"(?<![:\w]):(\d+)")


def to_dollar(statement: str, paramstyle: str) -> str:
    """A DBAPI statement with its placeholders written as PostgreSQL's `$n`."""
    if paramstyle in ("pyformat", "format"):
        return pyformat_to_dollar(statement)
    if paramstyle == "numeric":
        return _NUMERIC.sub(r"$\1", statement)
    if paramstyle == "named":
        names: dict[str, int] = {}
        return _NAMED.sub(lambda m: f"${names.setdefault(m.group(1), len(names) + 1)}", statement)
    if paramstyle == "qmark":
        position = count(1)
        return re.sub(r"\?", lambda _m: f"${next(position)}", statement)
    return statement  # numeric_dollar: already PostgreSQL's own


def _raw_connection(conn: Connection) -> Any:
    try:
        return conn.connection.dbapi_connection
    except Exception:
        return None


def _driver_errors(dialect: Dialect) -> ErrorClasses:
    """Driver-level refusal classes: what `.orig` is, and what the DBAPI layer raises."""
    if dialect.driver == "psycopg2":
        from backstop_core.sdk import psycopg2 as sdk_psycopg2

        return sdk_psycopg2.ERRORS
    if dialect.driver == "psycopg" and not dialect.is_async:
        from backstop_core.sdk import psycopg as sdk_psycopg

        return sdk_psycopg.ERRORS
    dbapi = dialect.loaded_dbapi
    return driver_errors(
        __name__,
        refused=getattr(dbapi, "ProgrammingError", dbapi.Error),
        timed_out=getattr(dbapi, "OperationalError", dbapi.Error),
    )


class _Hooks:
    """The event listeners of one protected engine."""

    def __init__(self, engine: Engine, guard: LocalGuard, owns_guard: bool) -> None:
        self.guard = guard
        self.owns_guard = owns_guard
        self.dialect = engine.dialect
        self.errors = _driver_errors(engine.dialect)
        self.estimator: Estimator | None = None
        if engine.dialect.driver in ("psycopg2", "psycopg") and not engine.dialect.is_async:
            cargs, cparams = engine.dialect.create_connect_args(engine.url)
            self.estimator = DbapiEstimator(lambda: engine.dialect.connect(*cargs, **cparams))

    def session(self, conn: Connection) -> LocalSession:
        info = conn.info
        session = info.get(_SESSION)
        if not isinstance(session, LocalSession):
            url = conn.engine.url
            session = self.guard.session(
                user=url.username or "", database=url.database or "", estimator=self.estimator
            )
            info[_SESSION] = session
            self.observe(conn, session)
        return session

    def statement_text(
        self, conn: Connection, cursor: Any, statement: str, parameters: Any, executemany: bool
    ) -> tuple[str, Any]:
        """(SQL to judge, parameters to bind an approval to)."""
        if not executemany:
            driver = self.dialect.driver
            try:
                if driver == "psycopg2":
                    from backstop_core.sdk.psycopg2 import statement_text

                    return statement_text(cursor, statement, parameters), None
                raw = _raw_connection(conn)
                if driver == "psycopg" and not self.dialect.is_async and raw is not None:
                    from backstop_core.sdk.psycopg import statement_text as render

                    return render(raw, statement, parameters), None
            except Exception:  # fall back to judging the placeholders
                pass
        return to_dollar(statement, self.dialect.paramstyle), parameters or None

    def before(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        session = self.session(conn)
        sql, params = self.statement_text(conn, cursor, statement, parameters, executemany)
        try:
            ticket = self.guard.check(sql, params, session=session)
        except BackstopError as exc:
            self._fail_transaction(conn)
            raise self.errors.convert(exc) from None
        conn.info[_TICKET] = ticket

    def after(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        ticket = conn.info.pop(_TICKET, None)
        if isinstance(ticket, Ticket):
            ticket.finish(True)
        self.observe(conn, self.session(conn))

    def error(self, ctx: ExceptionContext) -> BaseException | None:
        original = ctx.original_exception
        if isinstance(original, BackstopError):
            cls = ERRORS.class_for(original)
            ismulti = ctx.execution_context.executemany if ctx.execution_context else None
            raised = cls(ctx.statement, ctx.parameters, original, ismulti=ismulti)  # type: ignore[call-arg]
            return _filled(
                raised,
                decision=original.decision,
                reason=original.reason,
                approval_id=original.approval_id,
            )
        if ctx.connection is not None:
            ticket = ctx.connection.info.pop(_TICKET, None)
            if isinstance(ticket, Ticket):
                text = str(original).strip().splitlines()
                ticket.finish(False, text[0] if text else type(original).__name__)
        return None

    def observe(self, conn: Connection, session: LocalSession) -> None:
        raw = _raw_connection(conn)
        info = getattr(raw, "info", None)
        status = getattr(info, "parameter_status", None)
        if status is None:
            return
        for name in UNSAFE_PARAMETERS:
            try:
                session.observe_parameter(name, status(name))
            except Exception:
                return

    def _fail_transaction(self, conn: Connection) -> None:
        raw = _raw_connection(conn)
        if raw is None:
            return
        if self.dialect.driver == "psycopg2":
            from backstop_core.sdk.psycopg2 import _fail_transaction

            _fail_transaction(raw)
        elif self.dialect.driver == "psycopg" and not self.dialect.is_async:
            from backstop_core.sdk.psycopg import _fail_transaction as fail

            fail(raw)

    def disposed(self, engine: Engine) -> None:
        if self.estimator is not None:
            self.estimator.close()


def protect(
    engine: Any,
    *,
    agent: str,
    policy: Policy | Path | str | None = None,
    state_dir: Path | str | None = None,
    wait_for_approval: bool = True,
    approval_timeout: float | None = None,
    guard: LocalGuard | None = None,
) -> LocalGuard:
    """Judge every statement `engine` sends as `agent`; returns the guard it uses.

    `engine` is an Engine or an AsyncEngine of a PostgreSQL dialect. `policy`, `state_dir`,
    `wait_for_approval` and `approval_timeout` configure a LocalGuard; pass `guard=`
    instead to share one.
    """
    target: Engine = getattr(engine, "sync_engine", engine)
    if target.dialect.name != "postgresql":
        raise ValueError(f"Backstop protects PostgreSQL engines, not {target.dialect.name}")
    if target in _protected:
        raise ValueError("this engine is already protected by Backstop")
    owns = guard is None
    if guard is None:
        guard = LocalGuard(
            agent=agent,
            policy=policy,
            state_dir=state_dir,
            wait_for_approval=wait_for_approval,
            approval_timeout=approval_timeout,
        )
    hooks = _Hooks(target, guard, owns)
    event.listen(target, "before_cursor_execute", hooks.before)
    event.listen(target, "after_cursor_execute", hooks.after)
    event.listen(target, "handle_error", hooks.error)
    event.listen(target, "engine_disposed", hooks.disposed)
    _protected[target] = guard
    return guard
