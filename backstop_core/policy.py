"""The operator's policy: policy.json validated into frozen values, evaluate() -> Decision.

Pure apart from `load_policy` (reads a file) and `PolicyWatcher` (watches one).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from fnmatch import fnmatchcase
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from jsonschema import Draft202012Validator

from backstop_core.classify import Category, Classification, Risk

__all__ = [
    "Action",
    "AgentMapping",
    "ApprovalSettings",
    "AuditSettings",
    "BypassSettings",
    "Decision",
    "DrillSettings",
    "EstimateSettings",
    "Policy",
    "PolicyError",
    "PolicyWatcher",
    "ProtectedTable",
    "RecoveryGroup",
    "Rule",
    "SnapshotSettings",
    "default_policy",
    "evaluate",
    "explain",
    "load_policy",
    "parse_policy",
    "policy_schema",
    "resolve_agent",
    "strictest",
]

LEXER_SAFETY_RULE = "lexer-safety"


class Action(StrEnum):
    ALLOW = "allow"
    APPROVE = "approve"
    REQUIRE_SNAPSHOT = "require_snapshot"
    APPROVE_WITH_SNAPSHOT = "approve_with_snapshot"
    BLOCK = "block"

    @property
    def strictness(self) -> int:
        """allow < require_snapshot < approve < approve_with_snapshot < block."""
        return _STRICTNESS.index(self)

    @property
    def needs_approval(self) -> bool:
        return self in (Action.APPROVE, Action.APPROVE_WITH_SNAPSHOT)

    @property
    def needs_snapshot(self) -> bool:
        return self in (Action.REQUIRE_SNAPSHOT, Action.APPROVE_WITH_SNAPSHOT)


_STRICTNESS = (
    Action.ALLOW,
    Action.REQUIRE_SNAPSHOT,
    Action.APPROVE,
    Action.APPROVE_WITH_SNAPSHOT,
    Action.BLOCK,
)


def strictest(actions: Iterable[Action]) -> Action:
    """Combine actions so that no requirement is lost.

    `block` beats everything. Otherwise approval and snapshot requirements add up:
    `approve` together with `require_snapshot` gives `approve_with_snapshot`, which is
    what the strictness order alone would lose.
    """
    approval = snapshot = False
    for action in actions:
        if action is Action.BLOCK:
            return Action.BLOCK
        approval = approval or action.needs_approval
        snapshot = snapshot or action.needs_snapshot
    if approval and snapshot:
        return Action.APPROVE_WITH_SNAPSHOT
    if approval:
        return Action.APPROVE
    if snapshot:
        return Action.REQUIRE_SNAPSHOT
    return Action.ALLOW


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str
    reason: str
    # Tables whose snapshot must be fresh before the statement may run.
    needs_snapshot_tables: tuple[str, ...] = ()


class _Match(Enum):
    NO = 0
    YES = 1
    ROWS_UNKNOWN = 2  # everything matched except rows_over, and no row count is known


def _rows(statement: Classification) -> int | None:
    if statement.row_estimate is not None:
        return statement.row_estimate
    return statement.table_rows


def _table_matches(pattern: str, table: str) -> bool:
    pattern, table = pattern.lower(), table.lower()
    bare = table.rsplit(".", 1)[-1]
    if fnmatchcase(table, pattern) or fnmatchcase(bare, pattern):
        return True
    # An unqualified name could live in any schema on the search path: match the pattern's
    # table part, so a rule about public.orders also sees a plain "orders".
    return "." not in table and "." in pattern and fnmatchcase(table, pattern.rsplit(".", 1)[-1])


@dataclass(frozen=True)
class Rule:
    """One entry of "rules". Every match key that is set must match; unset keys match all."""

    name: str
    action: Action
    reason: str | None = None
    operations: tuple[str, ...] = ()
    categories: tuple[Category, ...] = ()
    min_risk: Risk | None = None
    tables: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    rows_over: int | None = None
    table_destructive: bool | None = None
    unbounded: bool | None = None

    def matches(self, statement: Classification, agent: str) -> bool:
        return self._match(statement, agent) is _Match.YES

    def _match(self, statement: Classification, agent: str) -> _Match:
        if self.operations and _normalize_operation(statement.operation) not in self.operations:
            return _Match.NO
        if self.categories and statement.category not in self.categories:
            return _Match.NO
        if self.min_risk is not None and statement.risk < self.min_risk:
            return _Match.NO
        if self.tables and not any(
            _table_matches(p, t) for p in self.tables for t in statement.tables
        ):
            return _Match.NO
        if self.agents and not any(fnmatchcase(agent, g) for g in self.agents):
            return _Match.NO
        if self.table_destructive is not None and (
            statement.table_destructive != self.table_destructive
        ):
            return _Match.NO
        if self.unbounded is not None and statement.unbounded != self.unbounded:
            return _Match.NO
        if self.rows_over is not None:
            rows = _rows(statement)
            if rows is None:
                return _Match.ROWS_UNKNOWN
            if rows <= self.rows_over:
                return _Match.NO
        return _Match.YES


@dataclass(frozen=True)
class AgentMapping:
    """Names the agent behind a connection. Globs are case-sensitive, like role names."""

    agent: str
    user: str | None = None
    application_name: str | None = None

    def matches(self, user: str, application_name: str) -> bool:
        if self.user is not None and not fnmatchcase(user, self.user):
            return False
        return self.application_name is None or fnmatchcase(application_name, self.application_name)


@dataclass(frozen=True)
class ApprovalSettings:
    timeout_seconds: int = 300
    auto_approve_window_seconds: int = 0
    webhook_url: str | None = None


@dataclass(frozen=True)
class SnapshotSettings:
    max_age_seconds: int = 3600
    on_demand: bool = True
    store: str | None = None


@dataclass(frozen=True)
class ProtectedTable:
    table: str  # glob, matched like rule "tables"
    interval_seconds: int = 3600
    retention_count: int = 24
    retention_max_age_seconds: int | None = None

    def covers(self, table: str) -> bool:
        return _table_matches(self.table, table)


@dataclass(frozen=True)
class RecoveryGroup:
    """Tables snapshotted together in one transaction, so they restore consistently."""

    name: str
    tables: tuple[str, ...]
    interval_seconds: int = 3600
    retention_count: int = 24
    retention_max_age_seconds: int | None = None


@dataclass(frozen=True)
class DrillSettings:
    """Restore drills run by the sidecar (recovery/drill.py). The interval is read again
    before each wait, so a reloaded policy changes it, or turns drills on or off, without
    a restart."""

    interval_seconds: int = 86400  # 0: no drills

    @property
    def enabled(self) -> bool:
        return self.interval_seconds > 0


@dataclass(frozen=True)
class BypassSettings:
    enabled: bool = True
    interval_seconds: int = 5
    agent_roles: tuple[str, ...] = ("*",)
    allowed_roles: tuple[str, ...] = ()
    allowed_applications: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()
    action: Literal["alert", "terminate"] = "alert"


@dataclass(frozen=True)
class AuditSettings:
    redact_literals: bool = False


@dataclass(frozen=True)
class EstimateSettings:
    timeout_ms: int = 200  # 0: no EXPLAIN, so rows_over rules never match


@dataclass(frozen=True)
class Policy:
    version: str  # first 12 hex digits of the sha256 of the file's bytes
    defaults: Mapping[Risk, Action]
    rules: tuple[Rule, ...] = ()
    agents: tuple[AgentMapping, ...] = ()
    approval: ApprovalSettings = ApprovalSettings()
    snapshot: SnapshotSettings = SnapshotSettings()
    protected: tuple[ProtectedTable, ...] = ()
    groups: tuple[RecoveryGroup, ...] = ()
    drills: DrillSettings = DrillSettings()
    bypass: BypassSettings = BypassSettings()
    audit: AuditSettings = AuditSettings()
    estimate: EstimateSettings = EstimateSettings()
    description: str | None = None

    def protection_for(self, table: str) -> ProtectedTable | None:
        """The first "protected" entry that covers `table`, if any."""
        return next((p for p in self.protected if p.covers(table)), None)


class PolicyError(Exception):
    """A policy file that cannot be used. `problems` each name the JSON path at fault."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        count = len(self.problems)
        head = f"{where}invalid policy ({count} problem{'s' if count != 1 else ''})"
        return head + "".join(f"\n  {p}" for p in self.problems)


# --- loading -------------------------------------------------------------------------------


@cache
def policy_schema() -> Mapping[str, Any]:
    """The JSON Schema (Draft 2020-12) a policy file must satisfy."""
    text = resources.files("backstop_core").joinpath("policy_schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return MappingProxyType(schema)


@cache
def _validator() -> Any:
    schema = dict(policy_schema())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


class _JSONProblem(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            # json.loads would silently keep the last one; an operator means one of them.
            raise _JSONProblem(f"key {key!r} appears twice in the same object")
        seen[key] = value
    return seen


def _reject_constant(name: str) -> Any:
    raise _JSONProblem(f"{name} is not valid JSON")


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def parse_policy(data: bytes | str) -> Policy:
    """Validate a policy document against the schema and build it. Raises PolicyError."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicyError([f"not UTF-8 text (bad byte at offset {exc.start})"]) from None
    try:
        doc = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise PolicyError(
            [f"line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"]
        ) from None
    except _JSONProblem as exc:
        raise PolicyError([str(exc)]) from None
    problems = _schema_problems(doc) or _semantic_problems(doc)
    if problems:
        raise PolicyError(problems)
    return _build(doc, _version(raw))


def load_policy(path: Path) -> Policy:
    """Read and parse a policy file. Raises PolicyError (also when it cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError([f"cannot read the file: {exc.strerror}"], source=str(path)) from None
    try:
        return parse_policy(data)
    except PolicyError as exc:
        raise PolicyError(exc.problems, source=str(path)) from None


@cache
def default_policy() -> Policy:
    """The policy Backstop ships: identical to the repository's policy.json."""
    return parse_policy(_DEFAULT_POLICY_JSON)


# --- schema error messages -----------------------------------------------------------------

_TYPE_WORDS = {
    "string": "a string",
    "array": "a list",
    "object": "an object",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _json_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _at(path: str, message: str) -> str:
    return f"{path}: {message}" if path else message


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _schema_problems(doc: Any) -> list[str]:
    errors = sorted(
        _validator().iter_errors(doc),
        key=lambda e: [(0, p, "") if isinstance(p, int) else (1, 0, p) for p in e.path],
    )
    typed = {tuple(e.path) for e in errors if e.validator == "type"}
    problems: list[str] = []
    for error in errors:
        path = tuple(error.path)
        # A value of the wrong type: say that once, not once per keyword it also fails.
        if path in typed and error.validator != "type":
            continue
        for message in _messages(error, _json_path(path)):
            if message not in problems:
                problems.append(message)
    return problems


def _messages(error: Any, path: str) -> list[str]:
    kind, expected, value = error.validator, error.validator_value, error.instance
    if kind == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return [_at(path, f"expected {words}, got {_json_type(value)}")]
    if kind == "enum":
        return [_at(path, f"{_show(value)} is not one of {', '.join(map(str, expected))}")]
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return [
            _at(
                _json_path([*error.path, key]),
                f"unknown key (expected one of {', '.join(allowed)})",
            )
            for key in value
            if key not in allowed
        ]
    if kind == "required":
        return [
            _at(_json_path([*error.path, key]), "missing (required)")
            for key in expected
            if key not in value
        ]
    if kind in ("minItems", "minLength"):
        return [_at(path, "must not be empty")]
    if kind == "minProperties":
        keys = ", ".join(sorted(error.schema.get("properties", {})))
        return [_at(path, f"needs at least one of {keys}")]
    if kind == "minimum":
        return [_at(path, f"{value} is below the minimum of {expected}")]
    if kind == "pattern":
        hint = error.schema.get("description", f"a value matching {expected}")
        return [_at(path, f"{_show(value)} is not {hint}")]
    return [_at(path, str(error.message))]


def _semantic_problems(doc: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    first_use: dict[str, int] = {}
    for i, rule in enumerate(doc.get("rules", [])):
        name = rule["name"]
        if name == LEXER_SAFETY_RULE or name.startswith("default:"):
            problems.append(f"rules[{i}].name: {name!r} is reserved for Backstop's own decisions")
        elif name in first_use:
            problems.append(
                f"rules[{i}].name: {name!r} is already used by rules[{first_use[name]}]"
            )
        else:
            first_use[name] = i
    groups: dict[str, int] = {}
    for i, group in enumerate(doc.get("groups", [])):
        name = group["name"]
        if name in groups:
            problems.append(f"groups[{i}].name: {name!r} is already used by groups[{groups[name]}]")
        groups.setdefault(name, i)
    for i, address in enumerate(doc.get("bypass", {}).get("allowed_addresses", [])):
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            problems.append(
                f"bypass.allowed_addresses[{i}]: {address!r} is not an IP address or CIDR network"
            )
    return problems


# --- building ------------------------------------------------------------------------------


def _normalize_operation(operation: str) -> str:
    return operation.strip().upper().replace(" ", "_")


def _as_tuple(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _build_rule(entry: dict[str, Any]) -> Rule:
    match: dict[str, Any] = entry["match"]
    risk = match.get("risk")
    rows_over = match.get("rows_over")
    return Rule(
        name=entry["name"],
        action=Action(entry["action"]),
        reason=entry.get("reason"),
        operations=tuple(_normalize_operation(o) for o in _as_tuple(match.get("operation"))),
        categories=tuple(Category(c) for c in _as_tuple(match.get("category"))),
        min_risk=Risk[risk] if risk is not None else None,
        tables=_as_tuple(match.get("tables")),
        agents=_as_tuple(match.get("agent")),
        rows_over=int(rows_over) if rows_over is not None else None,
        table_destructive=match.get("table_destructive"),
        unbounded=match.get("unbounded"),
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if value is not None else None


def _build(doc: dict[str, Any], version: str) -> Policy:
    approval = doc.get("approval", {})
    snapshot = doc.get("snapshot", {})
    bypass = doc.get("bypass", {})
    return Policy(
        version=version,
        defaults=MappingProxyType({risk: Action(doc["defaults"][risk.name]) for risk in Risk}),
        rules=tuple(_build_rule(r) for r in doc.get("rules", [])),
        agents=tuple(
            AgentMapping(
                agent=a["agent"],
                user=a["match"].get("user"),
                application_name=a["match"].get("application_name"),
            )
            for a in doc.get("agents", [])
        ),
        approval=ApprovalSettings(
            timeout_seconds=int(approval.get("timeout_seconds", 300)),
            auto_approve_window_seconds=int(approval.get("auto_approve_window_seconds", 0)),
            webhook_url=approval.get("webhook_url"),
        ),
        snapshot=SnapshotSettings(
            max_age_seconds=int(snapshot.get("max_age_seconds", 3600)),
            on_demand=bool(snapshot.get("on_demand", True)),
            store=snapshot.get("store"),
        ),
        protected=tuple(
            ProtectedTable(
                table=p["table"],
                interval_seconds=int(p.get("interval_seconds", 3600)),
                retention_count=int(p.get("retention_count", 24)),
                retention_max_age_seconds=_int_or_none(p.get("retention_max_age_seconds")),
            )
            for p in doc.get("protected", [])
        ),
        groups=tuple(
            RecoveryGroup(
                name=g["name"],
                tables=tuple(g["tables"]),
                interval_seconds=int(g.get("interval_seconds", 3600)),
                retention_count=int(g.get("retention_count", 24)),
                retention_max_age_seconds=_int_or_none(g.get("retention_max_age_seconds")),
            )
            for g in doc.get("groups", [])
        ),
        drills=DrillSettings(
            interval_seconds=int(doc.get("drills", {}).get("interval_seconds", 86400))
        ),
        bypass=BypassSettings(
            enabled=bool(bypass.get("enabled", True)),
            interval_seconds=int(bypass.get("interval_seconds", 5)),
            agent_roles=tuple(bypass.get("agent_roles", ["*"])),
            allowed_roles=tuple(bypass.get("allowed_roles", [])),
            allowed_applications=tuple(bypass.get("allowed_applications", [])),
            allowed_addresses=tuple(bypass.get("allowed_addresses", [])),
            action=bypass.get("action", "alert"),
        ),
        audit=AuditSettings(
            redact_literals=bool(doc.get("audit", {}).get("redact_literals", False))
        ),
        estimate=EstimateSettings(timeout_ms=int(doc.get("estimate", {}).get("timeout_ms", 200))),
        description=doc.get("description"),
    )


# --- evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vote:
    """One reason for an action: a matching rule, or the default for a statement's risk."""

    action: Action
    rule: Rule | None
    index: int  # which statement
    statement: Classification

    @property
    def name(self) -> str:
        return self.rule.name if self.rule else f"default:{self.statement.risk.name}"


def resolve_agent(policy: Policy, user: str, application_name: str) -> str:
    """The agent name for a connection: the first "agents" entry that matches, else
    `user`, or `user/application_name` when the client set an application name."""
    for mapping in policy.agents:
        if mapping.matches(user, application_name):
            return mapping.agent
    return f"{user}/{application_name}" if application_name else user


def evaluate(policy: Policy, statements: Sequence[Classification], agent: str) -> Decision:
    """Decide what happens to one query string (one or more statements) from `agent`."""
    count = len(statements)
    for index, statement in enumerate(statements):
        if statement.lexer_unsafe:
            return _lexer_block(statement, index, count)
    if not statements:
        return Decision(policy.defaults[Risk.LOW], "default:LOW", "backstop: empty query.")

    votes: list[_Vote] = []
    rows_unknown: dict[str, Rule] = {}
    for index, statement in enumerate(statements):
        for rule in policy.rules:
            outcome = rule._match(statement, agent)
            if outcome is _Match.YES:
                votes.append(_Vote(rule.action, rule, index, statement))
            elif outcome is _Match.ROWS_UNKNOWN:
                rows_unknown.setdefault(rule.name, rule)
        # After the rules, so that on a tie the named rule is the one reported.
        default = policy.defaults[statement.risk]
        votes.append(_Vote(default, None, index, statement))

    action = strictest(v.action for v in votes)
    lead = max(votes, key=lambda v: v.action.strictness)  # max() keeps the first of equals
    snapshot_vote = next((v for v in votes if v.action.needs_snapshot), None)
    tables: tuple[str, ...] = ()
    if action.needs_snapshot:
        tables = tuple(
            dict.fromkeys(t for v in votes if v.action.needs_snapshot for t in v.statement.tables)
        )
    reason = _reason(policy, action, lead, snapshot_vote, tables, count)
    for rule in rows_unknown.values():
        # Mention a rule only where it would have changed the outcome.
        if strictest((action, rule.action)) is not action:
            reason += (
                f" Rule '{rule.name}' applies above {rule.rows_over:,} rows; no row estimate"
                " was available, so it did not apply."
            )
    return Decision(action, lead.name, reason, tables)


def _lexer_block(statement: Classification, index: int, count: int) -> Decision:
    return Decision(
        Action.BLOCK,
        LEXER_SAFETY_RULE,
        f"backstop: {_subject(statement, index, count)} is blocked by rule '{LEXER_SAFETY_RULE}':"
        " it changes how the server reads string literals (standard_conforming_strings,"
        " backslash_quote or client_encoding), so Backstop could no longer be sure what later"
        " statements do. Keep standard_conforming_strings on, backslash_quote at"
        " safe_encoding and client_encoding at UTF8. No policy can allow this.",
    )


def _describe(statement: Classification) -> str:
    text = statement.operation.replace("_", " ")
    if statement.tables:
        text += " on " + ", ".join(statement.tables)
    if statement.unbounded and statement.operation in ("DELETE", "UPDATE"):
        text += (
            " with a WHERE clause that matches every row"
            if statement.has_where
            else " without a WHERE clause"
        )
    if statement.row_estimate is not None:
        text += f" (about {statement.row_estimate:,} rows)"
    return text


def _subject(statement: Classification, index: int, count: int) -> str:
    what = _describe(statement)
    return what if count == 1 else f"{what} (statement {index + 1} of {count})"


def _by(vote: _Vote) -> str:
    if vote.rule is not None:
        return f"rule '{vote.rule.name}'"
    return f"the default for {vote.statement.risk.name} risk"


def _why(vote: _Vote) -> str:
    if vote.rule is not None:
        if not vote.rule.reason:
            return ""
        text = vote.rule.reason.strip()
        return text if text.endswith((".", "!", "?")) else text + "."
    why = f"Backstop rates it {vote.statement.risk.name} risk"
    if vote.statement.reasons:
        why += ": " + "; ".join(vote.statement.reasons)
    return why + "."


def _block_hint(statement: Classification) -> str:
    if statement.unbounded and statement.operation in ("DELETE", "UPDATE"):
        verb = "delete" if statement.operation == "DELETE" else "update"
        return f"Add a WHERE clause that selects only the rows to {verb}, or ask an operator."
    return "Ask an operator to run it or to change the policy."


def _snapshot_terms(policy: Policy, tables: tuple[str, ...]) -> str:
    if not tables:
        return "The statement names no table, so there is nothing to snapshot."
    names = ", ".join(tables)
    age = policy.snapshot.max_age_seconds
    if policy.snapshot.on_demand:
        return (
            f"It runs once a snapshot of {names} no older than {age} s exists;"
            " Backstop takes one first if needed."
        )
    return (
        f"It runs only if a snapshot of {names} no older than {age} s exists;"
        " otherwise it is refused, so ask an operator to take one."
    )


def _approval_terms(policy: Policy) -> str:
    return (
        "It waits until an operator approves or denies it"
        f" (at most {policy.approval.timeout_seconds} s)."
    )


def _reason(
    policy: Policy,
    action: Action,
    lead: _Vote,
    snapshot_vote: _Vote | None,
    tables: tuple[str, ...],
    count: int,
) -> str:
    subject = _subject(lead.statement, lead.index, count)
    by, why = _by(lead), _why(lead)
    why = f" {why}" if why else ""
    if action is Action.ALLOW:
        return f"backstop: {subject} is allowed by {by}."
    if action is Action.BLOCK:
        return f"backstop: {subject} is blocked by {by}.{why} {_block_hint(lead.statement)}"
    if action is Action.REQUIRE_SNAPSHOT:
        return (
            f"backstop: {subject} needs a fresh snapshot under {by}.{why}"
            f" {_snapshot_terms(policy, tables)}"
        )
    if action is Action.APPROVE:
        return (
            f"backstop: {subject} needs an operator's approval under {by}.{why}"
            f" {_approval_terms(policy)}"
        )
    # approve_with_snapshot, either from one vote or from approve plus require_snapshot.
    if lead.action is not Action.APPROVE_WITH_SNAPSHOT and snapshot_vote is not None:
        by = f"{by} and a snapshot under {_by(snapshot_vote)}"
        if snapshot_vote.index != lead.index:
            by += f" (for {_subject(snapshot_vote.statement, snapshot_vote.index, count)})"
    return (
        f"backstop: {subject} needs an operator's approval under {by}.{why}"
        f" {_snapshot_terms(policy, tables)} {_approval_terms(policy)}"
    )


# --- explain -------------------------------------------------------------------------------


def _conditions(rule: Rule) -> str:
    parts: list[str] = []
    if rule.operations:
        parts.append("operation " + " or ".join(rule.operations))
    if rule.categories:
        parts.append("category " + " or ".join(rule.categories))
    if rule.min_risk is not None:
        parts.append(f"risk {rule.min_risk.name} or above")
    if rule.tables:
        parts.append("table " + " or ".join(rule.tables))
    if rule.agents:
        parts.append("agent " + " or ".join(rule.agents))
    if rule.rows_over is not None:
        parts.append(f"more than {rule.rows_over:,} rows")
    if rule.table_destructive is not None:
        parts.append("table-destructive" if rule.table_destructive else "not table-destructive")
    if rule.unbounded is not None:
        parts.append("unbounded" if rule.unbounded else "bounded")
    return " and ".join(parts) if parts else "every statement"


def _retention(count: int, max_age: int | None) -> str:
    text = f"keep {count}"
    return text + (f", at most {max_age} s old" if max_age is not None else "")


def explain(policy: Policy) -> str:
    """A human-readable summary, as printed by `backstop policy check`."""
    lines = [f"Policy {policy.version}"]
    if policy.description:
        lines.append(f"  {policy.description}")
    lines += ["", "Defaults by risk:"]
    lines += [f"  {risk.name:<9} {policy.defaults[risk]}" for risk in Risk]

    lines += [
        "",
        "Rules (every matching rule counts; the strictest action wins;"
        " allow < require_snapshot < approve < approve_with_snapshot < block):",
    ]
    width = max((len(r.name) for r in policy.rules), default=0)
    for rule in policy.rules:
        lines.append(f"  {rule.name:<{width}}  {rule.action:<21}  when {_conditions(rule)}")
    if not policy.rules:
        lines.append("  none: the defaults decide")
    lines.append(
        f"  {LEXER_SAFETY_RULE:<{width}}  {'block':<21}  always, when a statement changes"
        " how the server reads string literals"
    )

    lines += ["", "Agents (first match wins; otherwise user, or user/application_name):"]
    for m in policy.agents:
        when = " and ".join(
            f"{key} {glob}"
            for key, glob in (("user", m.user), ("application_name", m.application_name))
            if glob is not None
        )
        lines.append(f"  {when} -> {m.agent}")
    if not policy.agents:
        lines.append("  no mapping")

    a = policy.approval
    auto = (
        f"an identical approved statement is approved again for {a.auto_approve_window_seconds} s"
        if a.auto_approve_window_seconds
        else "no auto-approval"
    )
    lines += [
        "",
        f"Approvals: time out after {a.timeout_seconds} s; {auto};"
        f" webhook {a.webhook_url or 'none'}.",
    ]
    s = policy.snapshot
    lines.append(
        f"Snapshots: at most {s.max_age_seconds} s old before a statement that needs one;"
        f" {'taken on demand' if s.on_demand else 'never taken on demand'};"
        f" store {s.store or 'from the Backstop configuration'}."
    )

    lines += ["", "Protected tables (first match wins):"]
    for p in policy.protected:
        lines.append(
            f"  {p.table}: every {p.interval_seconds} s,"
            f" {_retention(p.retention_count, p.retention_max_age_seconds)}"
        )
    if not policy.protected:
        lines.append("  none")
    lines.append("Recovery groups:")
    for g in policy.groups:
        lines.append(
            f"  {g.name}: {', '.join(g.tables)} every {g.interval_seconds} s,"
            f" {_retention(g.retention_count, g.retention_max_age_seconds)}"
        )
    if not policy.groups:
        lines.append("  none")
    lines.append(
        f"Restore drills: every {policy.drills.interval_seconds} s, of each protected table's"
        " newest snapshot."
        if policy.drills.enabled
        else "Restore drills: off."
    )

    b = policy.bypass
    lines.append("")
    if b.enabled:
        excused = [
            *(f"role {r}" for r in b.allowed_roles),
            *(f"application {x}" for x in b.allowed_applications),
            *(f"address {x}" for x in b.allowed_addresses),
        ]
        outcome = "raises an alert" if b.action == "alert" else "is terminated, with an alert"
        lines.append(
            f"Bypass detection: every {b.interval_seconds} s; a session that does not come"
            f" through Backstop, of role {' or '.join(b.agent_roles) or '(none)'}, {outcome}."
        )
        lines.append(f"  excused: {', '.join(excused) if excused else 'nobody'}")
    else:
        lines.append("Bypass detection: off")
    lines.append(
        "Audit: SQL recorded "
        + ("with literals redacted." if policy.audit.redact_literals else "as sent.")
    )
    lines.append(
        f"Row estimates: EXPLAIN with a {policy.estimate.timeout_ms} ms timeout."
        if policy.estimate.timeout_ms
        else "Row estimates: off (rows_over rules never match)."
    )
    return "\n".join(lines)


# --- hot reload ----------------------------------------------------------------------------


class PolicyWatcher:
    """Reloads the policy file when it changes.

    Watches the parent directory, not the file, because editors save by writing a new file
    and renaming it over the old one. A file that does not parse keeps the last good policy.
    """

    def __init__(
        self,
        path: Path,
        on_change: Callable[[Policy], None],
        on_error: Callable[[str], None],
        *,
        initial: Policy | None = None,
        force_polling: bool | None = None,
    ) -> None:
        self._path = Path(path).absolute()
        self._on_change = on_change
        self._on_error = on_error
        self._force_polling = force_polling
        self._current = initial if initial is not None else load_policy(self._path)
        # The version of the bytes last read, good or bad, so an unchanged file is not
        # reported twice.
        self._seen: str | None = self._current.version

    @property
    def current(self) -> Policy:
        return self._current

    @property
    def path(self) -> Path:
        return self._path

    def _is_policy_file(self, _change: object, changed: str) -> bool:
        return Path(changed).name == self._path.name

    async def run(self) -> None:
        """Watch until cancelled."""
        from watchfiles import awatch

        self.check()  # a change made before the watch began
        async for _changes in awatch(
            self._path.parent,
            watch_filter=self._is_policy_file,
            recursive=False,
            force_polling=self._force_polling,
        ):
            self.check()

    def check(self) -> None:
        """Reread the file now; apply it if it changed and is valid."""
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            if self._seen is not None:
                self._seen = None
                self._on_error(
                    f"{self._path}: cannot read the policy file ({exc.strerror});"
                    f" keeping policy {self._current.version}"
                )
            return
        version = _version(data)
        if version == self._seen:
            return
        self._seen = version
        try:
            policy = parse_policy(data)
        except PolicyError as exc:
            error = PolicyError(exc.problems, source=str(self._path))
            self._on_error(f"{error}\nkeeping policy {self._current.version}")
            return
        self._current = policy
        self._on_change(policy)


# Kept byte for byte equal to policy.json at the top of the repository (a test checks).
_DEFAULT_POLICY_JSON = """\
{
  "description": "Backstop's example policy; docs/policy.md explains every field.",
  "defaults": {
    "LOW": "allow",
    "MEDIUM": "allow",
    "HIGH": "approve",
    "CRITICAL": "approve_with_snapshot"
  },
  "rules": [
    {
      "name": "no-drop-database",
      "match": { "operation": "DROP_DATABASE" },
      "action": "block",
      "reason": "Dropping a database cannot be undone, and no table snapshot can bring it back."
    },
    {
      "name": "no-drop-schema",
      "match": { "operation": "DROP_SCHEMA" },
      "action": "block",
      "reason": "Dropping a schema drops every table in it; per-table snapshots cannot protect it."
    },
    {
      "name": "no-alter-system",
      "match": { "operation": "ALTER_SYSTEM" },
      "action": "block",
      "reason": "ALTER SYSTEM changes the server's configuration for every client."
    },
    {
      "name": "snapshot-before-destroying-a-table",
      "match": { "table_destructive": true },
      "action": "approve_with_snapshot",
      "reason": "This empties, drops or rewrites a whole table."
    },
    {
      "name": "approve-large-writes",
      "match": { "category": "WRITE", "rows_over": 10000 },
      "action": "approve",
      "reason": "It changes more than 10000 rows."
    }
  ],
  "agents": [
    { "match": { "user": "cursor_agent" }, "agent": "cursor" }
  ],
  "approval": {
    "timeout_seconds": 300,
    "auto_approve_window_seconds": 0,
    "webhook_url": null
  },
  "snapshot": {
    "max_age_seconds": 3600,
    "on_demand": true,
    "store": null
  },
  "protected": [
    { "table": "public.*", "interval_seconds": 3600, "retention_count": 24 }
  ],
  "groups": [],
  "drills": {
    "interval_seconds": 86400
  },
  "bypass": {
    "enabled": true,
    "interval_seconds": 5,
    "agent_roles": ["*"],
    "allowed_roles": [],
    "allowed_applications": [],
    "allowed_addresses": [],
    "action": "alert"
  },
  "audit": {
    "redact_literals": false
  },
  "estimate": {
    "timeout_ms": 200
  }
}
"""
