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
from typing import Any, Protocol, final

import orjson
from pglast.parser import parse_sql_json

from backstop_core.classify import (
    Classification,
    Classifier,
    Risk,
    _set_value,
    lexer_unsafe_setting,
)
from backstop_core.events import (
    EventBus,
    SessionClosed,
    SessionOpened,
    StatementDecided,
    StatementFinished,
)
from backstop_core.gateway.estimate import ControlConnections, with_estimate
from backstop_core.gateway.pgwire import StartupMessage, encode_error
from backstop_core.gateway.session import (
    Batch,
    Execution,
    Outcome,
    Session,
    StatementHook,
    Verdict,
    refuse,
)
from backstop_core.journal import AuditTemplate, JournalWriter
from backstop_core.policy import Action, Decision, Policy, evaluate, resolve_agent
from backstop_core.sqlform import statement_form
from backstop_core.store import AuditStart, Store

log = logging.getLogger("backstop.guard")

_ESTIMATED = frozenset(("UPDATE", "DELETE", "MERGE"))
_EFFECTS = frozenset(("SET", "RESET", "DEALLOCATE", "DISCARD"))


def _has_effects(c: Classification) -> bool:
    return c.prepared_name is not None or c.executes is not None or c.operation in _EFFECTS


def _needs_estimate(c: Classification) -> bool:
    """UPDATE/DELETE/MERGE always; INSERT when it copies rows from a query (not VALUES)."""
    if c.operation in _ESTIMATED:
        return True
    return c.operation == "INSERT" and (len(c.tables) > 1 or bool(c.functions))


_CACHE_LIMIT = 20000
# `Guard.judge`'s caller did not ask statement_form (which never answers with "").
_FORM_NOT_ASKED = ""


_DEFAULT_PATH = ("$user", "public")


@dataclass
class GuardSession:
    """What the guard remembers about one client session."""

    agent: str
    user: str
    database: str
    client: str
    application_name: str = ""
    policy_version: str = ""
    # search_path as the server will use it for the next statement: a SET inside a
    # transaction block is tentative until COMMIT, a SET LOCAL lasts until the block ends.
    search_path: tuple[str, ...] = _DEFAULT_PATH
    committed_path: tuple[str, ...] = _DEFAULT_PATH
    tentative_path: tuple[str, ...] | None = None
    local_path: tuple[str, ...] | None = None
    block_failed: bool = False
    path_reported: bool = False  # the server reports search_path itself (ParameterStatus)
    lexer_unsafe: str | None = None
    unsafe_settings: dict[str, str] = field(default_factory=dict)
    # SQL-level PREPAREs: name -> the PREPARE statement's classification
    prepared: dict[str, Classification] = field(default_factory=dict)
    checked_at: float = 0.0  # when the statement being decided arrived (perf_counter)
    # id(judgement) -> (judgement, redacting, the audit record but its SQL, encoded) for
    # statements this session forwarded as judged: the next statement judged alike is
    # journaled without encoding all that again. (A judgement is made for one agent, so a
    # session whose agent changes gets other judgements.)
    audit_templates: dict[int, tuple[Judgement, bool, AuditTemplate]] = field(default_factory=dict)
    # SQL text -> its lane: prepared statements this session runs again and again.
    lanes: dict[str, Lane] = field(default_factory=dict)
    # Form (statement_form) -> its lane: statements that differ only in literals.
    form_lanes: dict[str, Lane] = field(default_factory=dict)

    def settle_path(self) -> None:
        self.search_path = self.local_path or self.tentative_path or self.committed_path


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
    # PREPARE/DEALLOCATE/SET search_path/COMMIT…: session state to update on completion
    effects: bool = False


@dataclass(frozen=True, slots=True)
class Lane:
    """A statement text (or form) a session runs again and again, judged plain allowed:
    while the policy and the search_path it was judged under are in force, running it
    again takes a journal write and nothing else."""

    policy: Policy
    search_path: tuple[str, ...]
    judgement: Judgement
    template: AuditTemplate
    redacting: bool
    # The journal record but its key and time (`AuditTemplate.tail`), for a lane of one
    # text; "" for a form.
    record: str = ""


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
    # A pipelined batch: the fingerprint of every execution's SQL and parameters, and each
    # statement's own parameters by its position in the judgement.
    batch_fingerprint: str | None = None
    per_statement: dict[int, Bound] | None = field(default=None, compare=False)

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


@final
class CurrentPolicy:
    """The policy in force, which the guard reads on every statement and the owner of the
    policy file replaces on reload. Compiled, reading it is an attribute load, where a
    callback would be an interpreted call."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy


class Guard(StatementHook):
    """Implements the session's StatementHook with classification, policy and audit."""

    def __init__(
        self,
        *,
        classifier: Classifier,
        policy: CurrentPolicy,
        store: Store,
        bus: EventBus,
        control: ControlConnections | None = None,
        holds: HoldHandler | None = None,
    ) -> None:
        self.classifier = classifier
        self.current = policy
        self.store = store
        # The store's journal writer, compiled like this module: called directly per statement.
        self.journal: JournalWriter = store.journal
        self.bus = bus
        self.control = control
        self.holds = holds
        self._cache: dict[tuple[str, str, tuple[str, ...]], Judgement] = {}
        self._by_shape: dict[tuple[object, ...], Judgement] = {}
        # (form, agent, search_path) -> the judgement of every statement of that form, for
        # plain allowed ones whose classification no literal decided (Classifier.shares).
        self._by_form: dict[tuple[str, str, tuple[str, ...]], Judgement] = {}
        self._cache_version = ""

    def policy(self) -> Policy:
        return self.current.policy

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
            application_name=session.application_name,
            policy_version=policy.version,
        )
        session.context["guard"] = state
        for name, value in session.server_params.items():
            self.on_parameter_status(session, name, value)
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
        if name == "application_name":
            state.application_name = value
            state.agent = resolve_agent(self.policy(), state.user, value)
            state.lanes.clear()  # judged for the agent it was
            state.form_lanes.clear()
        elif name == "search_path":  # reported by PostgreSQL 18 and later: authoritative
            path = _parse_path(value)
            if path is not None:
                state.path_reported = True
                state.committed_path = path
                state.tentative_path = state.local_path = None
                state.settle_path()
        # Each lexer-relevant setting is tracked on its own: one becoming safe again does
        # not clear another that is still unsafe.
        reason = lexer_unsafe_setting(name, value)
        if reason is not None:
            state.unsafe_settings[name] = reason
            log.warning("session %s: %s", session.session_id, reason)
        else:
            state.unsafe_settings.pop(name, None)
        state.lexer_unsafe = next(iter(state.unsafe_settings.values()), None)

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

    def judge(
        self,
        sql: str,
        state: GuardSession,
        session: Session | None = None,
        *,
        form: str | None = _FORM_NOT_ASKED,
    ) -> Judgement:
        """`form`: what `statement_form` answered for `sql`, when the caller asked it."""
        policy = self.policy()
        if policy.version != self._cache_version:
            self._cache.clear()
            self._by_shape.clear()
            self._by_form.clear()
            self._cache_version = policy.version
        if state.policy_version != policy.version:
            # A new policy may map this session to another agent.
            state.agent = resolve_agent(policy, state.user, state.application_name)
            state.policy_version = policy.version
        key = (sql, state.agent, state.search_path)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # Simple-protocol clients send one statement with ever new literals in it; a plain
        # allowed statement of a form seen before is judged by the form.
        if form is _FORM_NOT_ASKED:
            form = statement_form(sql)
        if form is not None:
            shared = self._by_form.get((form, state.agent, state.search_path))
            if shared is not None:
                return shared
        statements = self.classifier.classify(sql, state.search_path, form=form)
        if any(_has_effects(c) for c in statements):
            # PREPARE/EXECUTE/DEALLOCATE/SET search_path depend on and change session
            # state: judged fresh every time, never cached.
            statements = self._resolve(statements, state, session)
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
        if (
            form is not None
            and _plain(judgement)
            and self.classifier.shares(form, state.search_path)
        ):
            # Its statements' text is never read again (see `forward`): any of the form do.
            if len(self._by_form) >= _CACHE_LIMIT:
                self._by_form.clear()
            self._by_form[(form, state.agent, state.search_path)] = judgement
            return judgement
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
            _needs_estimate(c) or c.table_destructive for c in statements
        )
        return Judgement(
            statements=statements,
            decision=decision,
            operation=lead.operation if lead else "EMPTY",
            risk=str(lead.risk) if lead else "LOW",
            tables=tables,
            classification_json=classification_json(statements),
            needs_database=needs_database,
            effects=any(_has_effects(c) or c.category == "TRANSACTION" for c in statements),
        )

    def _resolve(
        self,
        statements: tuple[Classification, ...],
        state: GuardSession,
        session: Session | None,
    ) -> tuple[Classification, ...]:
        """EXECUTEs replaced by what they run, including PREPAREs earlier in the same text."""
        earlier: dict[str, Classification] = {}
        out: list[Classification] = []
        for statement in statements:
            if statement.prepared_name is not None and statement.prepared is not None:
                earlier[statement.prepared_name] = statement
            if statement.executes is not None:
                statement = self._substitute(statement, state, session, earlier)
            out.append(statement)
        return tuple(out)

    def _substitute(
        self,
        statement: Classification,
        state: GuardSession,
        session: Session | None,
        earlier: dict[str, Classification] | None = None,
    ) -> Classification:
        """What `EXECUTE name` runs. SQL-level and protocol-level prepared statements share
        one namespace in PostgreSQL, so both are looked up; an unknown name is CRITICAL."""
        name = statement.executes
        if name is None:
            return statement
        prepare = (earlier or {}).get(name) or state.prepared.get(name)
        if prepare is not None and prepare.prepared is not None:
            inner = prepare.prepared
            return replace(
                inner,
                sql=statement.sql,  # the EXECUTE itself; its PREPARE is found by name
                executes=name,
                reasons=(f"EXECUTE runs prepared statement {name}", *inner.reasons),
            )
        protocol_sql = session.protocol_statement(name) if session is not None else None
        if protocol_sql is not None:
            inner_statements = self.classifier.classify(protocol_sql, state.search_path)
            if len(inner_statements) == 1:
                inner = inner_statements[0]
                return replace(
                    inner,
                    reasons=(f"EXECUTE runs prepared statement {name}", *inner.reasons),
                )
        return replace(
            statement,
            risk=Risk.CRITICAL,
            reasons=(
                *statement.reasons,
                f"prepared statement {name} was not prepared through Backstop in this "
                "session, so what it runs is unknown",
            ),
        )

    def check_query(self, session: Session, sql: str) -> Verdict | Awaitable[Verdict]:
        state = self._state(session)
        if state.lexer_unsafe is not None:
            return self._lexer_refusal(session, state, sql)
        lane = self._open_lane(state.lanes, sql, state)
        if lane is not None:
            return self._lane_hit(session, state, lane, sql)
        form = statement_form(sql)
        if form is not None:
            lane = self._open_lane(state.form_lanes, form, state)
            if lane is not None:
                return self._lane_hit(session, state, lane, sql)
        state.checked_at = time.perf_counter()
        judgement = self.judge(sql, state, session, form=form)
        if _plain(judgement):
            shared = form is not None and judgement is self._by_form.get(
                (form, state.agent, state.search_path)
            )
            return self._take_lane(session, state, sql, judgement, form if shared else None)
        return self._decide(session, state, sql, judgement, NO_PARAMETERS)

    def check_batch(self, session: Session, batch: Batch) -> Verdict | Awaitable[Verdict]:
        if not batch.executions:
            return _FORWARD_QUIET  # Parse/Describe/Close alone run nothing
        state = self._state(session)
        state.checked_at = time.perf_counter()
        if len(batch.executions) == 1:
            execution = batch.executions[0]
            sql = execution.sql or self._sql_prepared(state, execution.statement)
            if sql is None:
                return self._unresolved(session, state, execution.portal, execution.statement)
            if state.lexer_unsafe is not None:
                return self._lexer_refusal(session, state, sql)
            judgement = self.judge(sql, state, session)
            return self._decide_one(session, state, sql, judgement, execution)
        return self._check_many(session, state, batch)

    def _decide_one(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        execution: Execution,
    ) -> Verdict | Awaitable[Verdict]:
        """One execution: its parameters matter once the database is asked or a human
        decides."""
        if judgement.needs_database or judgement.decision.action is not Action.ALLOW:
            return self._decide(session, state, sql, judgement, _bound(execution))
        return self._decide(session, state, sql, judgement, NO_PARAMETERS)

    def check_prepared(
        self, session: Session, statement: bytes, sql: str, bind: bytes
    ) -> Verdict | Awaitable[Verdict]:
        state = self._state(session)
        if state.lexer_unsafe is not None:
            return self._lexer_refusal(session, state, sql)
        lane = self._open_lane(state.lanes, sql, state)
        if lane is not None:
            return self._lane_hit(session, state, lane, sql)
        state.checked_at = time.perf_counter()
        judgement = self.judge(sql, state, session)
        if _plain(judgement):
            return self._take_lane(session, state, sql, judgement)
        execution = Execution(statement, b"", sql, bind)
        return self._decide_one(session, state, sql, judgement, execution)

    def _open_lane(self, lanes: dict[str, Lane], key: str, state: GuardSession) -> Lane | None:
        """The session's lane for `key`, while the policy and search_path it was judged
        under are in force (a new agent clears the session's lanes)."""
        lane = lanes.get(key)
        if (
            lane is None
            or lane.policy is not self.policy()
            or lane.search_path is not state.search_path
        ):
            return None
        return lane

    def _take_lane(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        form: str | None = None,
    ) -> Verdict:
        """Forward `sql`, judged plain allowed, and keep a lane for its text, or with `form`
        for every statement of that form."""
        template, redacting = self._template(session, state, sql, judgement)
        lane = Lane(
            policy=self.policy(),
            search_path=state.search_path,
            judgement=judgement,
            template=template,
            redacting=redacting,
            record=template.tail(redact(sql) if redacting else sql)
            if form is None and template.ref
            else "",
        )
        lanes, key = (state.lanes, sql) if form is None else (state.form_lanes, form)
        if len(lanes) >= _LANES_PER_SESSION:
            lanes.clear()
        lanes[key] = lane
        return self._run_lane(session, state, lane, sql, self.bus.routine)

    def _lane_hit(self, session: Session, state: GuardSession, lane: Lane, sql: str) -> Verdict:
        """A statement its session's lane already judged. The clock is read only when an
        event will report how long the decision took."""
        routine = self.bus.routine
        if routine:
            state.checked_at = time.perf_counter()
        return self._run_lane(session, state, lane, sql, routine)

    def _run_lane(
        self, session: Session, state: GuardSession, lane: Lane, sql: str, routine: bool
    ) -> Verdict:
        """Forward `sql` as `lane` judged it: journal it, and report it when `routine`
        events have a listener."""
        if lane.record:
            key = self.journal.begin_tail(lane.template, lane.record)
        else:
            key = self.journal.begin_sql(lane.template, redact(sql) if lane.redacting else sql)
        if routine:
            judgement = lane.judgement
            self._decided(session, state, sql, judgement, judgement.decision, key)
        return Verdict(True, b"", self.completion(session, key, (), state, lane.redacting))

    def _check_many(
        self, session: Session, state: GuardSession, batch: Batch
    ) -> Verdict | Awaitable[Verdict]:
        """A pipelined batch: judged as one unit, so a refusal anywhere refuses all of it."""
        sqls: list[str] = []
        statements: list[Classification] = []
        digest = hashlib.sha256()
        bounds: dict[int, Bound] = {}
        for execution in batch.executions:
            text = execution.sql or self._sql_prepared(state, execution.statement)
            if text is None:
                return self._unresolved(session, state, execution.portal, execution.statement)
            sqls.append(text)
            classified = self._resolve(
                self.classifier.classify(text, state.search_path), state, session
            )
            if len(classified) == 1:
                bounds[len(statements)] = _bound(execution)
            statements.extend(classified)
            digest.update(statement_hash(text, execution.params()).encode())
        if state.lexer_unsafe is not None:
            return self._lexer_refusal(session, state, ";\n".join(sqls))
        judgement = self._judgement(tuple(statements), self.policy(), state.agent)
        # Each statement is estimated with its own parameters; the approval covers every
        # execution's SQL and parameters.
        bound = Bound(batch_fingerprint=digest.hexdigest(), per_statement=bounds)
        return self._decide(session, state, ";\n".join(sqls), judgement, bound)

    @staticmethod
    def _sql_prepared(state: GuardSession, statement: bytes) -> str | None:
        """SQL of a statement a Bind names that was made by SQL-level PREPARE."""
        if not statement:
            return None
        prepare = state.prepared.get(statement.decode("utf-8", "replace"))
        if prepare is None or prepare.prepared is None:
            return None
        return f"EXECUTE {_quote(statement.decode('utf-8', 'replace'))}"

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
        if self.policy().audit.redact_literals:
            sql = redact(sql)
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
        earlier: dict[str, Classification] = {}  # PREPAREs earlier in the same text
        for index, statement in enumerate(judgement.statements):
            if statement.prepared_name is not None and statement.prepared is not None:
                earlier[statement.prepared_name] = statement
            if not _needs_estimate(statement):
                if statement.table_destructive and statement.tables:
                    # TRUNCATE, DROP: what is at stake is the whole table.
                    size = await self.control.table_rows(state.database, statement.tables[0])
                    if size is not None:
                        statement = replace(statement, table_rows=size, row_estimate=size)
                        changed = True
                estimated.append(statement)
                continue
            own = bound.per_statement.get(index, NO_PARAMETERS) if bound.per_statement else bound
            sql, execute = statement.sql, None
            if statement.executes is not None:
                prepare = earlier.get(statement.executes) or state.prepared.get(statement.executes)
                if prepare is None:
                    estimated.append(statement)
                    continue
                sql, execute = prepare.sql, _constant_execute(statement.sql)
            elif statement.prepared_name is not None:
                earlier[statement.prepared_name] = statement
                estimated.append(statement)
                continue
            estimate = await self.control.estimate(
                state.database,
                sql,
                statement.targets or statement.tables,
                params=own.values or None,
                text_params=own.text,
                prepared_name=statement.executes,
                execute=execute,
                timeout_ms=policy.estimate.timeout_ms,
            )
            estimated.append(with_estimate(statement, estimate))
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
        key = self.store.audit_begin(
            self._audit_record(session, state, sql, judgement, decision, **extra)
        )
        self._decided(session, state, sql, judgement, decision, key)
        return key

    def _audit_record(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        **extra: object,
    ) -> AuditStart:
        policy = self.policy()
        return AuditStart(
            session_id=session.session_id,
            agent=state.agent,
            client=state.client,
            sql=redact(sql) if policy.audit.redact_literals else sql,
            operation=judgement.operation,
            risk=judgement.risk,
            tables=judgement.tables,
            classification_json=judgement.classification_json,
            decision=str(decision.action),
            rule=decision.rule,
            reason=decision.reason,
            row_estimate=_estimate(judgement),
            **extra,  # type: ignore[arg-type]
        )

    def _decided(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        key: str,
    ) -> None:
        bus = self.bus
        if not (bus.routine if decision.action is Action.ALLOW else bus.active):
            return
        bus.publish(
            StatementDecided(
                session_id=session.session_id,
                agent=state.agent,
                sql=redact(sql) if self.policy().audit.redact_literals else sql,
                operation=judgement.operation,
                tables=judgement.tables,
                risk=judgement.risk,
                action=str(decision.action),
                rule=decision.rule,
                reason=decision.reason,
                row_estimate=_estimate(judgement),
                audit_key=key,
                decision_ms=(time.perf_counter() - state.checked_at) * 1000,
            )
        )

    def forward(
        self,
        session: Session,
        state: GuardSession,
        sql: str,
        judgement: Judgement,
        decision: Decision,
        **extra: object,
    ) -> Verdict:
        if extra or decision is not judgement.decision:
            key = self.audit_start(session, state, sql, judgement, decision, **extra)
        else:
            template, redacting = self._template(session, state, sql, judgement)
            key = self.journal.begin_sql(template, redact(sql) if redacting else sql)
            self._decided(session, state, sql, judgement, decision, key)
        statements = judgement.statements if judgement.effects else ()
        return Verdict(True, b"", self.completion(session, key, statements, state))

    def _template(
        self, session: Session, state: GuardSession, sql: str, judgement: Judgement
    ) -> tuple[AuditTemplate, bool]:
        """The audit record of a statement forwarded as judged, but its SQL (all of it comes
        from the judgement and the session, so it is encoded once per session), and whether
        the SQL is to be redacted."""
        templates = state.audit_templates
        entry = templates.get(id(judgement))
        if entry is not None and entry[0] is judgement:
            return entry[2], entry[1]
        record = self._audit_record(session, state, sql, judgement, judgement.decision)
        redacting = self.policy().audit.redact_literals
        template = self.store.audit_template(record)
        if len(templates) >= _TEMPLATES_PER_SESSION:
            templates.clear()
        templates[id(judgement)] = (judgement, redacting, template)
        return template, redacting

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

    def completion(
        self,
        session: Session,
        key: str,
        statements: tuple[Classification, ...] = (),
        state: GuardSession | None = None,
        redacting: bool | None = None,
    ) -> Callable[[Outcome], None]:
        started = time.perf_counter_ns()
        store = self.store
        journal = self.journal
        bus = self.bus
        if state is None:
            state = self._state(session)
        effects = bool(statements)  # given only when the unit changes session state
        if redacting is None:
            redacting = self.policy().audit.redact_literals

        def complete(outcome: Outcome) -> None:
            elapsed = time.perf_counter_ns() - started
            ok = outcome.ok
            if ok:
                result = "forwarded"
                journal.forwarded(key, elapsed)
            else:
                result = "error"
                error = outcome.error
                if error is not None and redacting:
                    error = f"error {outcome.sqlstate or ''} (text withheld: literals are redacted)"
                store.audit_finish(key, result, elapsed / 1_000_000, error)
            if effects:
                _apply_effects(session, state, statements, outcome)
            elif state.tentative_path is not None or state.local_path is not None:
                _settle_block(state, statements, outcome)
            if bus.routine if ok else bus.active:
                bus.publish(
                    StatementFinished(
                        session_id=session.session_id,
                        audit_key=key,
                        outcome=result,
                        duration_ms=elapsed / 1_000_000,
                        error=outcome.error,
                    )
                )

        return complete


_FORWARD_QUIET = Verdict(True)
_TEMPLATES_PER_SESSION = 256
_LANES_PER_SESSION = 256


def _plain(judgement: Judgement) -> bool:
    """Allowed as judged: no estimate to fetch, no session state to update."""
    return (
        judgement.decision.action is Action.ALLOW
        and not judgement.needs_database
        and not judgement.effects
    )


def _estimate(judgement: Judgement) -> int | None:
    return max(
        (c.row_estimate for c in judgement.statements if c.row_estimate is not None),
        default=None,
    )


def _apply_effects(
    session: Session,
    state: GuardSession,
    statements: tuple[Classification, ...],
    outcome: Outcome,
) -> None:
    """What a finished unit changed in the session: prepared names and search_path."""
    if not outcome.ok:
        # Nothing is recorded. A PREPARE of a name that exists fails, so a known name keeps
        # its meaning; a name a failed unit may have created stays unknown to Backstop, and
        # EXECUTE of an unknown name is CRITICAL.
        _settle_block(state, statements, outcome)
        return
    in_block = outcome.txn_status != "I"
    for c in statements:
        if c.prepared_name is not None and c.prepared is not None:
            state.prepared[c.prepared_name] = c
            continue
        if c.operation not in _EFFECTS:
            continue
        node = _statement_node(c.sql)
        if node is None:
            continue
        kind, body = node
        if kind == "DeallocateStmt":
            name = body.get("name")
            if name is None:
                state.prepared.clear()
                session.forget_statements(None)
            else:
                state.prepared.pop(name, None)
                session.forget_statements([name])
        elif kind == "DiscardStmt" and body.get("target") == "DISCARD_ALL":
            state.prepared.clear()
            session.forget_statements(None)
            _set_path(state, _DEFAULT_PATH, local=False, in_block=in_block)
        elif kind == "VariableSetStmt" and not state.path_reported:
            setting = body.get("kind")
            if setting == "VAR_RESET_ALL" or (
                body.get("name") == "search_path" and setting in ("VAR_RESET", "VAR_SET_DEFAULT")
            ):
                _set_path(state, _DEFAULT_PATH, local=bool(body.get("is_local")), in_block=in_block)
            elif body.get("name") == "search_path" and setting == "VAR_SET_VALUE":
                path = tuple(_set_value(arg) for arg in body.get("args") or ())
                _set_path(state, path, local=bool(body.get("is_local")), in_block=in_block)
    _settle_block(state, statements, outcome)


def _set_path(state: GuardSession, path: tuple[str, ...], *, local: bool, in_block: bool) -> None:
    if local:
        if in_block:  # SET LOCAL outside a block has no effect
            state.local_path = path
    elif in_block:
        state.tentative_path = path  # kept only if the block commits
    else:
        state.committed_path = path
        state.tentative_path = state.local_path = None
    state.settle_path()


def _settle_block(
    state: GuardSession, statements: tuple[Classification, ...], outcome: Outcome
) -> None:
    """At the end of a transaction block, settings made inside it stay only on COMMIT."""
    if state.tentative_path is None and state.local_path is None:
        return
    if outcome.txn_status == "E":
        state.block_failed = True
    if outcome.txn_status != "I":
        return
    committed = (
        outcome.ok and not state.block_failed and any(c.operation == "COMMIT" for c in statements)
    )
    if committed and state.tentative_path is not None:
        state.committed_path = state.tentative_path
    state.tentative_path = state.local_path = None
    state.block_failed = False
    state.settle_path()


def _statement_node(sql: str) -> tuple[str, dict[str, Any]] | None:
    try:
        stmts = orjson.loads(parse_sql_json(sql))["stmts"]
        ((kind, body),) = stmts[0]["stmt"].items()
    except Exception:
        return None
    return str(kind), body


def _parse_path(value: str) -> tuple[str, ...] | None:
    node = _statement_node(f"SET search_path = {value}") if value.strip() else None
    if node is None or node[0] != "VariableSetStmt":
        return None
    return tuple(_set_value(arg) for arg in node[1].get("args") or ())


def _constant_execute(sql: str) -> str | None:
    """The EXECUTE text when its arguments are all constants, so EXPLAIN can use them;
    None when an argument is an expression (EXPLAIN EXECUTE would evaluate it)."""
    node = _statement_node(sql)
    if node is None or node[0] != "ExecuteStmt":
        return None
    for param in node[1].get("params") or ():
        if "TypeCast" in param:
            param = param["TypeCast"].get("arg", {})
        if "A_Const" not in param:
            return None
    return sql


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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


# PostgreSQL reads dashes in option names as underscores (--standard-conforming-strings=off).
_OPTION = re.compile(r"^(?:-c|--)\s*([A-Za-z0-9_.-]+)=(.*)$")


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
