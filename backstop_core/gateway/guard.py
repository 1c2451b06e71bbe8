"""The statement hook that makes the gateway a guard: classify, decide, audit, then forward,
refuse, or hold for a human or a snapshot.

The hot path (a statement seen before, allowed) costs two dict lookups and one journal
write. Anything that needs the database first (a row estimate, the WAL position, a
snapshot) or a person (an approval) returns an awaitable, and the session holds the
statement until it resolves, without blocking any other session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from backstop_core.classify import Classification, Classifier, lexer_unsafe_setting
from backstop_core.events import (
    EventBus,
    SessionClosed,
    SessionOpened,
    StatementDecided,
    StatementFinished,
)
from backstop_core.gateway.estimate import ControlConnections
from backstop_core.gateway.pgwire import StartupMessage, encode_error
from backstop_core.gateway.session import (
    Batch,
    Execution,
    Outcome,
    Session,
    Verdict,
    refuse,
)
from backstop_core.policy import Action, Decision, Policy, evaluate, resolve_agent
from backstop_core.store import AuditStart, Store

log = logging.getLogger("backstop.guard")

_ESTIMATED = frozenset(("UPDATE", "DELETE", "MERGE"))
_CACHE_LIMIT = 20000


@dataclass
class GuardSession:
    """What the guard remembers about one client session."""

    agent: str
    user: str
    database: str
    client: str
    search_path: tuple[str, ...] = ("public",)
    lexer_unsafe: str | None = None
    prepared: dict[str, Classification] = field(default_factory=dict)
    checked_at: float = 0.0  # when the statement being decided arrived (perf_counter)


@dataclass(frozen=True, slots=True)
class Judgement:
    """Classifications and decision for one SQL text by one agent, cacheable."""

    statements: tuple[Classification, ...]
    decision: Decision
    operation: str
    risk: str
    tables: tuple[str, ...]
    classification_json: str
    needs_database: bool  # an estimate or a WAL position must be fetched first


def _shape(c: Classification) -> tuple[object, ...]:
    """Everything of a classification that a policy decision can depend on."""
    return (
        c.operation,
        c.category,
        c.tables,
        c.has_where,
        c.unbounded,
        c.table_destructive,
        c.risk,
        c.reasons,
        c.functions,
        c.lexer_unsafe,
        c.prepared_name,
        _shape(c.prepared) if c.prepared is not None else None,
        c.executes,
        c.row_estimate,
        c.table_rows,
    )


def classification_json(statements: Sequence[Classification]) -> str:
    return json.dumps(
        [
            {
                "operation": c.operation,
                "category": str(c.category),
                "tables": list(c.tables),
                "has_where": c.has_where,
                "unbounded": c.unbounded,
                "table_destructive": c.table_destructive,
                "risk": str(c.risk),
                "reasons": list(c.reasons),
                "row_estimate": c.row_estimate,
                "table_rows": c.table_rows,
            }
            for c in statements
        ],
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class Bound:
    """The parameters a statement runs with (extended protocol), for estimates and the
    approval's fingerprint."""

    values: tuple[bytes | None, ...] = ()
    formats: tuple[int, ...] = ()
    # A pipelined batch: the fingerprint of every execution's SQL and parameters.
    batch_fingerprint: str | None = None

    @property
    def text(self) -> bool:
        """True when every value is in text format (0), as EXPLAIN needs them."""
        if not self.formats:
            return True
        if len(self.formats) == 1:
            return self.formats[0] == 0
        return all(f == 0 for f in self.formats)

    def fingerprint(self, sql: str) -> str:
        return self.batch_fingerprint or statement_hash(sql, self.values)


NO_PARAMETERS = Bound()


def statement_hash(sql: str, params: Sequence[bytes | None] = ()) -> str:
    digest = hashlib.sha256(sql.encode())
    for value in params:
        digest.update(b"\x00N" if value is None else b"\x00V" + len(value).to_bytes(4, "big"))
        if value is not None:
            digest.update(value)
    return digest.hexdigest()


class Guard:
    """Implements the session's StatementHook with classification, policy and audit."""

    def __init__(
        self,
        *,
        classifier: Classifier,
        policy: Callable[[], Policy],
        store: Store,
        bus: EventBus,
        control: ControlConnections | None = None,
        holds: HoldHandler | None = None,
    ) -> None:
        self.classifier = classifier
        self.policy = policy
        self.store = store
        self.bus = bus
        self.control = control
        self.holds = holds
        self._cache: dict[tuple[str, str], Judgement] = {}
        self._by_shape: dict[tuple[object, ...], Judgement] = {}
        self._cache_version = ""

    # ------------------------------------------------------------------ session life

    def check_startup(self, session: Session, startup: StartupMessage) -> bytes | None:
        for name, value in _startup_settings(startup):
            reason = lexer_unsafe_setting(name, value)
            if reason is not None:
                return encode_error(
                    f"backstop: connection refused: {reason}",
                    "42501",
                    severity="FATAL",
                    hint=f"Connect without setting {name}.",
                )
        return None

    def session_ready(self, session: Session) -> None:
        policy = self.policy()
        state = GuardSession(
            agent=resolve_agent(policy, session.user, session.application_name),
            user=session.user,
            database=session.database,
            client=session.client_address,
        )
        for name, value in session.server_params.items():
            reason = lexer_unsafe_setting(name, value)
            if reason is not None:
                state.lexer_unsafe = reason
        session.context["guard"] = state
        if self.bus.active:
            self.bus.publish(
                SessionOpened(
                    session_id=session.session_id,
                    client=session.client_address,
                    user=session.user,
                    database=session.database,
                    agent=state.agent,
                )
            )

    def session_ended(self, session: Session) -> None:
        state = session.context.get("guard")
        if isinstance(state, GuardSession) and self.bus.active:
            self.bus.publish(SessionClosed(session_id=session.session_id, agent=state.agent))

    def on_parameter_status(self, session: Session, name: str, value: str) -> None:
        state = session.context.get("guard")
        if not isinstance(state, GuardSession):
            return
        reason = lexer_unsafe_setting(name, value)
        if reason is not None:
            state.lexer_unsafe = reason
            log.warning("session %s: %s", session.session_id, reason)
        elif name in ("standard_conforming_strings", "client_encoding"):
            state.lexer_unsafe = None

    # ------------------------------------------------------------------ statements

    def _state(self, session: Session) -> GuardSession:
        state = session.context.get("guard")
        if not isinstance(state, GuardSession):
            state = GuardSession(
                agent=session.user,
                user=session.user,
                database=session.database,
                client=session.client_address,
            )
            session.context["guard"] = state
        return state

    def judge(self, sql: str, state: GuardSession) -> Judgement:
        policy = self.policy()
        if policy.version != self._cache_version:
            self._cache.clear()
            self._by_shape.clear()
            self._cache_version = policy.version
        key = (sql, state.agent)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        statements = self.classifier.classify(sql, state.search_path)
        substituted = any(c.executes is not None for c in statements)
        if substituted:
            statements = tuple(self._substitute(c, state) for c in statements)
            return self._judgement(statements, policy, state.agent)
        # Statements that differ only in literals (simple-protocol clients) classify alike:
        # the decision depends on the classification, not on the text, so share it.
        shape = (state.agent, *(_shape(c) for c in statements))
        judgement = self._by_shape.get(shape)
        if judgement is None:
            judgement = self._judgement(statements, policy, state.agent)
            if len(self._by_shape) >= _CACHE_LIMIT:
                self._by_shape.clear()
            self._by_shape[shape] = judgement
        elif judgement.needs_database or judgement.decision.action is not Action.ALLOW:
            # These read the statements' own text (EXPLAIN, approvals): give them theirs.
            judgement = replace(judgement, statements=statements)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = judgement
        return judgement

    def _judgement(
        self, statements: tuple[Classification, ...], policy: Policy, agent: str
    ) -> Judgement:
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

    def _substitute(self, statement: Classification, state: GuardSession) -> Classification:
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

    def check_query(self, session: Session, sql: str) -> Verdict | Awaitable[Verdict]:
        state = self._state(session)
        state.checked_at = time.perf_counter()
        if state.lexer_unsafe is not None:
            return self._lexer_refusal(session, state, sql)
        judgement = self.judge(sql, state)
        for statement in judgement.statements:
            if statement.prepared_name is not None and statement.prepared is not None:
                state.prepared[statement.prepared_name] = statement.prepared
        return self._decide(session, state, sql, judgement, NO_PARAMETERS)

    def check_batch(self, session: Session, batch: Batch) -> Verdict | Awaitable[Verdict]:
        if not batch.executions:
            return _FORWARD_QUIET  # Parse/Describe/Close alone run nothing
        state = self._state(session)
        state.checked_at = time.perf_counter()
        if len(batch.executions) == 1:
            execution = batch.executions[0]
            sql = execution.sql
            if sql is None:
                return self._unresolved(session, state, execution.portal, execution.statement)
            if state.lexer_unsafe is not None:
                return self._lexer_refusal(session, state, sql)
            judgement = self.judge(sql, state)
            if judgement.needs_database or judgement.decision.action is not Action.ALLOW:
                return self._decide(session, state, sql, judgement, _bound(execution))
            return self._decide(session, state, sql, judgement, NO_PARAMETERS)
        return self._check_many(session, state, batch)

    def _check_many(
        self, session: Session, state: GuardSession, batch: Batch
    ) -> Verdict | Awaitable[Verdict]:
        """A pipelined batch: judged as one unit, so a refusal anywhere refuses all of it."""
        sqls: list[str] = []
        statements: list[Classification] = []
        digest = hashlib.sha256()
        for execution in batch.executions:
            if execution.sql is None:
                return self._unresolved(session, state, execution.portal, execution.statement)
            sqls.append(execution.sql)
            classified = self.classifier.classify(execution.sql, state.search_path)
            statements.extend(self._substitute(c, state) for c in classified)
            digest.update(statement_hash(execution.sql, execution.params()).encode())
        if state.lexer_unsafe is not None:
            return self._lexer_refusal(session, state, ";\n".join(sqls))
        judgement = self._judgement(tuple(statements), self.policy(), state.agent)
        # Each statement is estimated on its own (no parameters); the approval covers every
        # execution's SQL and parameters.
        bound = Bound(batch_fingerprint=digest.hexdigest())
        return self._decide(session, state, ";\n".join(sqls), judgement, bound)

    def _unresolved(
        self, session: Session, state: GuardSession, portal: bytes, statement: bytes
    ) -> Verdict:
        name = statement.decode("utf-8", "replace") or portal.decode("utf-8", "replace")
        message = (
            f"backstop: cannot tell what portal or statement {name!r} runs: it was not "
            "prepared through the gateway. Prepare it again in this session."
        )
        self._audit_refusal(session, state, f"-- execute {name}", "UNKNOWN", message)
        return refuse(message, "26000")

    def _lexer_refusal(self, session: Session, state: GuardSession, sql: str) -> Verdict:
        message = (
            f"backstop: refused: {state.lexer_unsafe}. Every statement is refused until "
            "the setting is restored; reconnect to start a clean session."
        )
        self._audit_refusal(session, state, sql, "UNPARSEABLE", message)
        return refuse(message, "42501")

    def _audit_refusal(
        self, session: Session, state: GuardSession, sql: str, operation: str, message: str
    ) -> None:
        key = self.store.audit_begin(
            AuditStart(
                session_id=session.session_id,
                agent=state.agent,
                client=state.client,
                sql=sql,
                operation=operation,
                risk="CRITICAL",
                tables=(),
                classification_json="[]",
                decision="block",
                rule="lexer-safety" if operation == "UNPARSEABLE" else "unresolved",
                reason=message,
            )
        )
        self.store.audit_finish(key, "blocked", 0.0, None)

    def _decide(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        bound: Bound,
    ) -> Verdict | Awaitable[Verdict]:
        decision = judgement.decision
        if decision.action is Action.ALLOW and not judgement.needs_database:
            return self.forward(session, state, sql, judgement, decision)
        if decision.action is Action.BLOCK:
            return self.refuse_statement(session, state, sql, judgement, decision, "blocked")
        return self._decide_slowly(session, state, sql, judgement, bound)

    async def _decide_slowly(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        bound: Bound,
    ) -> Verdict:
        judgement = await self._with_estimates(state, judgement, bound)
        decision = judgement.decision
        if decision.action is Action.BLOCK:
            return self.refuse_statement(session, state, sql, judgement, decision, "blocked")
        wal_lsn = None
        if any(c.table_destructive for c in judgement.statements) and self.control is not None:
            try:
                wal_lsn = await self.control.current_lsn(state.database)
            except Exception as exc:
                log.warning("could not read the WAL position: %s", exc)
        if decision.action is Action.ALLOW:
            return self.forward(session, state, sql, judgement, decision, wal_lsn=wal_lsn)
        if self.holds is None:
            missing = (
                "approvals and snapshots are"
                if decision.action is Action.APPROVE_WITH_SNAPSHOT
                else "approvals are"
                if decision.action is Action.APPROVE
                else "snapshots are"
            )
            refusal = replace(
                decision,
                reason=f"{decision.reason} This gateway refuses it because {missing} not "
                "set up here.",
            )
            return self.refuse_statement(session, state, sql, judgement, refusal, "blocked")
        return await self.holds.hold(self, session, state, sql, judgement, bound, wal_lsn)

    async def _with_estimates(
        self, state: GuardSession, judgement: Judgement, bound: Bound
    ) -> Judgement:
        policy = self.policy()
        if self.control is None or policy.estimate.timeout_ms <= 0:
            return judgement
        estimated: list[Classification] = []
        changed = False
        for statement in judgement.statements:
            if statement.operation not in _ESTIMATED:
                estimated.append(statement)
                continue
            estimate = await self.control.estimate(
                state.database,
                statement.sql,
                statement.tables,
                params=bound.values or None,
                text_params=bound.text,
                timeout_ms=policy.estimate.timeout_ms,
            )
            reasons = statement.reasons
            if estimate.note:
                reasons = (*reasons, estimate.note)
            elif estimate.rows is not None:
                reasons = (*reasons, f"PostgreSQL estimates {estimate.rows:,} rows")
            estimated.append(
                replace(
                    statement,
                    row_estimate=estimate.rows,
                    table_rows=estimate.table_rows,
                    reasons=reasons,
                )
            )
            changed = True
        if not changed:
            return judgement
        return self._judgement(tuple(estimated), policy, state.agent)

    # ------------------------------------------------------------------ outcomes

    def audit_start(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        **extra: object,
    ) -> str:
        policy = self.policy()
        text = redact(sql) if policy.audit.redact_literals else sql
        estimate = max(
            (c.row_estimate for c in judgement.statements if c.row_estimate is not None),
            default=None,
        )
        key = self.store.audit_begin(
            AuditStart(
                session_id=session.session_id,
                agent=state.agent,
                client=state.client,
                sql=text,
                operation=judgement.operation,
                risk=judgement.risk,
                tables=judgement.tables,
                classification_json=judgement.classification_json,
                decision=str(decision.action),
                rule=decision.rule,
                reason=decision.reason,
                row_estimate=estimate,
                **extra,  # type: ignore[arg-type]
            )
        )
        if self.bus.active:
            self.bus.publish(
                StatementDecided(
                    session_id=session.session_id,
                    agent=state.agent,
                    sql=text,
                    operation=judgement.operation,
                    tables=judgement.tables,
                    risk=judgement.risk,
                    action=str(decision.action),
                    rule=decision.rule,
                    reason=decision.reason,
                    row_estimate=estimate,
                    audit_key=key,
                    decision_ms=(time.perf_counter() - state.checked_at) * 1000,
                )
            )
        return key

    def forward(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        **extra: object,
    ) -> Verdict:
        key = self.audit_start(session, state, sql, judgement, decision, **extra)
        return Verdict(True, on_complete=self.completion(session, key))

    def refuse_statement(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        outcome: str,
        **extra: object,
    ) -> Verdict:
        key = self.audit_start(session, state, sql, judgement, decision, **extra)
        self.store.audit_finish(key, outcome, 0.0, decision.reason)
        if self.bus.active:
            self.bus.publish(
                StatementFinished(
                    session_id=session.session_id, audit_key=key, outcome=outcome, duration_ms=0.0
                )
            )
        return refuse(decision.reason, "42501")

    def completion(self, session: Session, key: str) -> Callable[[Outcome], None]:
        started = time.perf_counter()
        store = self.store
        bus = self.bus

        def complete(outcome: Outcome) -> None:
            duration = (time.perf_counter() - started) * 1000
            result = "forwarded" if outcome.ok else "error"
            store.audit_finish(key, result, duration, outcome.error)
            if bus.active:
                bus.publish(
                    StatementFinished(
                        session_id=session.session_id,
                        audit_key=key,
                        outcome=result,
                        duration_ms=duration,
                        error=outcome.error,
                    )
                )

        return complete


_FORWARD_QUIET = Verdict(True)


def _bound(execution: Execution) -> Bound:
    bind = execution.bind_message()
    if bind is None:
        return NO_PARAMETERS
    return Bound(values=bind.params, formats=bind.param_formats)


class HoldHandler(Protocol):
    """What holds a statement for a person or a snapshot (approvals.ApprovalQueue)."""

    async def hold(
        self,
        guard: Guard,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        bound: Bound,
        wal_lsn: str | None,
    ) -> Verdict: ...


def redact(sql: str) -> str:
    """SQL with its literals replaced by placeholders (pglast's normalize)."""
    try:
        from pglast.parser import normalize

        return str(normalize(sql))
    except Exception:
        return "-- statement could not be normalized; literals redacted"


_OPTION = re.compile(r"^(?:-c|--)\s*([A-Za-z_.]+)=(.*)$")


def _startup_settings(startup: StartupMessage) -> list[tuple[str, str]]:
    """Settings a client asks for at startup: plain parameters and `options` (-c name=value)."""
    settings: list[tuple[str, str]] = []
    for name, value in startup.params:
        if name in ("user", "database", "replication"):
            continue
        if name != "options":
            settings.append((name, value))
            continue
        try:
            words = shlex.split(value.replace("\\ ", "\x00"))
        except ValueError:
            words = value.split()
        words = [w.replace("\x00", " ") for w in words]
        index = 0
        while index < len(words):
            word = words[index]
            if word == "-c" and index + 1 < len(words):
                word = "-c" + words[index + 1]
                index += 1
            match = _OPTION.match(word)
            if match:
                settings.append((match.group(1).replace("-", "_"), match.group(2)))
            index += 1
    return settings
