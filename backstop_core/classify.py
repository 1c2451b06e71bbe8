"""SQL text -> Classification, from PostgreSQL's own grammar (pglast). Pure: no I/O, no asyncio.

pglast's C parser turns the SQL into a JSON parse tree. One iterative walk visits every dict
and list of that tree, collecting tables, function calls and nested statements (a DELETE
inside a WITH clause, a GRANT inside CREATE SCHEMA); a handler per statement type decides the
operation and the base risk. The SQL text itself is only ever sliced into statements and
handed to the parser, never pattern-matched. Procedural code (DO blocks, plpgsql and SQL
function bodies) is parsed too, and its embedded SQL is classified by the same rules.

Anything the classifier cannot see through is never LOW: SQL that does not parse, dynamic
EXECUTE, statement types it does not know, functions that act outside the statement.
"""

from __future__ import annotations

import json

try:  # orjson parses pglast's JSON tree about twice as fast
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads  # type: ignore[assignment]
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from enum import IntEnum, StrEnum
from itertools import count
from types import MemberDescriptorType
from typing import Any, Final

from pglast.parser import ParseError, parse_plpgsql_json, parse_sql_json, scan

from backstop_core.sqlform import statement_form

__all__ = [
    "UNSAFE_PARAMETERS",
    "Category",
    "Classification",
    "Classifier",
    "Risk",
    "classify",
    "lexer_unsafe_setting",
    "worst",
]


class Risk(IntEnum):
    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3

    def __str__(self) -> str:
        return self.name


class Category(StrEnum):
    READ = "READ"
    WRITE = "WRITE"
    DDL = "DDL"
    DCL = "DCL"
    ADMIN = "ADMIN"
    TRANSACTION = "TRANSACTION"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Classification:
    """What one statement does, as far as its parse tree tells."""

    sql: str
    operation: str
    category: Category
    tables: tuple[str, ...] = ()
    has_where: bool = False
    unbounded: bool = False
    table_destructive: bool = False
    risk: Risk = Risk.LOW
    reasons: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    # PREPARE name AS ... carries the name and the inner statement's classification;
    # EXECUTE name carries the name, and the session substitutes what it prepared.
    prepared_name: str | None = None
    prepared: Classification | None = field(default=None, compare=False)
    executes: str | None = None
    # True when the statement would make the server's lexer disagree with pglast's
    # (standard_conforming_strings off, backslash_quote on, an unsafe client_encoding).
    lexer_unsafe: bool = False
    row_estimate: int | None = None
    table_rows: int | None = None
    # The tables whose existing rows or definition the statement changes, empties or drops
    # (a subset of `tables`): what a pre-operation snapshot has to cover.
    targets: tuple[str, ...] = ()


def worst(classifications: Sequence[Classification]) -> Risk:
    """The highest risk among the classifications of one SQL string (LOW for none)."""
    return max((c.risk for c in classifications), default=Risk.LOW)


# --------------------------------------------------------------------------------------
# Lexer safety: settings that make the server read quotes differently from pglast.

UNSAFE_PARAMETERS: Final = frozenset(
    {"standard_conforming_strings", "backslash_quote", "client_encoding"}
)

_DESYNC = (
    "so Backstop's parser and the server would read quotes differently and text that "
    "Backstop sees inside a string literal could run as SQL"
)

# Client encodings whose multibyte characters can contain the byte of an ASCII quote or
# backslash, spelled as PostgreSQL's clean_encoding_name() normalises them.
_UNSAFE_ENCODINGS: Final = frozenset(
    {"big5", "win950", "windows950"}
    | {"gbk", "win936", "windows936", "gb18030"}
    | {"sjis", "mskanji", "shiftjis", "win932", "windows932", "shiftjis2004"}
    | {"johab", "uhc", "win949", "windows949"}
)
_SAFE_ENCODINGS: Final = frozenset(
    {"utf8", "unicode", "sqlascii", "muleinternal", "alt", "abc", "tcvn", "tcvn5712", "vscii"}
    | {"euccn", "eucjp", "euckr", "euctw", "eucjis2004", "koi8", "koi8r", "koi8u", "win"}
    | {f"latin{n}" for n in range(1, 11)}
    | {f"iso8859{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)}
    | {f"win{n}" for n in (866, 874, *range(1250, 1259))}
    | {f"windows{n}" for n in (866, 874, *range(1250, 1259))}
)


def _parse_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool(): on/off, true/false, yes/no, 1/0 and unique prefixes."""
    v = value.strip().lower()
    if not v:
        return None
    if v == "1":
        return True
    if v == "0":
        return False
    if "true".startswith(v) or "yes".startswith(v):
        return True
    if "false".startswith(v) or "no".startswith(v):
        return False
    if len(v) >= 2 and "on".startswith(v):
        return True
    if len(v) >= 2 and "off".startswith(v):
        return False
    return None


def lexer_unsafe_setting(name: str, value: str) -> str | None:
    """A reason when setting `name` to `value` desynchronises the lexers, else None.

    For SET statements, startup options and the server's ParameterStatus reports. A value
    PostgreSQL would not accept counts as unsafe: that is the side to err on.
    """
    key = name.strip().lower()
    if key == "standard_conforming_strings":
        if _parse_bool(value) is True:
            return None
        return (
            f"standard_conforming_strings={value or '?'} makes the server treat backslashes "
            f"in ordinary string literals as escapes, {_DESYNC}"
        )
    if key == "backslash_quote":
        v = value.strip().lower()
        if v == "safe_encoding" or _parse_bool(v) is False:
            return None
        return f"backslash_quote={value or '?'} lets \\' stand for a quote, {_DESYNC}"
    if key == "client_encoding":
        normalised = "".join(ch for ch in value.lower() if ch.isalnum())
        if normalised in _SAFE_ENCODINGS:
            return None
        if normalised in _UNSAFE_ENCODINGS:
            return (
                f"client_encoding {value} is a multibyte encoding in which a quote byte can "
                f"hide inside a character, {_DESYNC}"
            )
        return (
            f"client_encoding {value or '?'} is not an encoding Backstop knows to be safe, "
            f"{_DESYNC}"
        )
    return None


# --------------------------------------------------------------------------------------
# Functions with effects outside the statement: name -> (risk, what it does).

# fmt: off
_FUNCTION_RULES: Final[dict[str, tuple[Risk, str]]] = {
    "pg_read_file": (Risk.CRITICAL, "reads files on the database server"),
    "pg_read_binary_file": (Risk.CRITICAL, "reads files on the database server"),
    "pg_ls_dir": (Risk.HIGH, "lists directories on the database server"),
    "pg_stat_file": (Risk.HIGH, "inspects files on the database server"),
    "pg_file_write": (Risk.CRITICAL, "writes files on the database server"),
    "pg_file_unlink": (Risk.CRITICAL, "deletes files on the database server"),
    "pg_file_rename": (Risk.CRITICAL, "renames files on the database server"),
    "lo_import": (Risk.CRITICAL, "reads a file on the database server into a large object"),
    "lo_export": (Risk.CRITICAL, "writes a large object to a file on the database server"),
    "lo_unlink": (Risk.CRITICAL, "deletes a large object permanently"),
    "lo_from_bytea": (Risk.HIGH, "creates a large object"),
    "lo_put": (Risk.HIGH, "overwrites part of a large object"),
    "lowrite": (Risk.HIGH, "overwrites part of a large object"),
    "lo_truncate": (Risk.HIGH, "truncates a large object"),
    "lo_create": (Risk.MEDIUM, "creates a large object"),
    "lo_creat": (Risk.MEDIUM, "creates a large object"),
    "dblink": (Risk.HIGH, "runs a query over a separate connection that Backstop does not see"),
    "dblink_exec":
        (Risk.CRITICAL, "runs arbitrary SQL over a separate connection that Backstop does not see"),
    "dblink_connect": (Risk.HIGH, "opens a database connection that Backstop does not see"),
    "dblink_connect_u": (Risk.HIGH, "opens a database connection that Backstop does not see"),
    "dblink_send_query":
        (Risk.HIGH, "runs a query over a separate connection that Backstop does not see"),
    "pg_terminate_backend": (Risk.CRITICAL, "ends other sessions"),
    "pg_cancel_backend": (Risk.HIGH, "cancels other sessions' queries"),
    "pg_reload_conf": (Risk.HIGH, "reloads the server configuration"),
    "pg_rotate_logfile": (Risk.HIGH, "rotates the server log file"),
    "pg_promote": (Risk.CRITICAL, "promotes a standby server to primary"),
    "pg_switch_wal": (Risk.HIGH, "forces a switch to a new WAL file"),
    "pg_create_restore_point": (Risk.HIGH, "writes a named restore point into the WAL"),
    "pg_drop_replication_slot":
        (Risk.HIGH, "drops a replication slot; its consumer loses its place"),
    "pg_create_physical_replication_slot":
        (Risk.HIGH, "creates a replication slot that keeps WAL on disk until consumed"),
    "pg_create_logical_replication_slot":
        (Risk.HIGH, "creates a replication slot that keeps WAL on disk until consumed"),
    "pg_logical_slot_get_changes": (Risk.HIGH, "consumes changes from a replication slot"),
    "pg_logical_slot_get_binary_changes": (Risk.HIGH, "consumes changes from a replication slot"),
    "pg_replication_slot_advance": (Risk.HIGH, "moves a replication slot forward"),
    "pg_logical_emit_message": (Risk.HIGH, "writes a message into the WAL"),
    "pg_backup_start": (Risk.HIGH, "starts an online backup"),
    "pg_backup_stop": (Risk.HIGH, "stops an online backup"),
    "pg_start_backup": (Risk.HIGH, "starts an online backup"),
    "pg_stop_backup": (Risk.HIGH, "stops an online backup"),
    "pg_wal_replay_pause": (Risk.HIGH, "pauses WAL replay on a standby"),
    "pg_wal_replay_resume": (Risk.HIGH, "resumes WAL replay on a standby"),
    "pg_truncate_visibility_map": (Risk.HIGH, "truncates a table's visibility map"),
    "set_config": (Risk.HIGH, "changes a server setting from inside a query"),
    "pg_sleep": (Risk.MEDIUM, "holds the session, and any locks it has, while it sleeps"),
    "pg_sleep_for": (Risk.MEDIUM, "holds the session, and any locks it has, while it sleeps"),
    "pg_sleep_until": (Risk.MEDIUM, "holds the session, and any locks it has, while it sleeps"),
    "query_to_xml": (Risk.HIGH, "runs the SQL text it is given"),
    "query_to_xmlschema": (Risk.HIGH, "runs the SQL text it is given"),
    "query_to_xml_and_xmlschema": (Risk.HIGH, "runs the SQL text it is given"),
    "table_to_xml": (Risk.MEDIUM, "reads a whole table named only by its argument"),
    "table_to_xml_and_xmlschema": (Risk.MEDIUM, "reads a whole table named only by its argument"),
    "schema_to_xml": (Risk.HIGH, "reads every table of a schema"),
    "schema_to_xml_and_xmlschema": (Risk.HIGH, "reads every table of a schema"),
    "database_to_xml": (Risk.HIGH, "reads every table of the database"),
    "database_to_xml_and_xmlschema": (Risk.HIGH, "reads every table of the database"),
    "setval": (Risk.MEDIUM, "changes a sequence's current value"),
    "pg_stat_statements_reset": (Risk.MEDIUM, "discards collected statistics"),
    "pg_import_system_collations": (Risk.MEDIUM, "adds collations to the catalog"),
}
# fmt: on

# Families matched by prefix when the exact name is not in the table above.
_FUNCTION_PREFIX_RULES: Final[tuple[tuple[str, Risk, str], ...]] = (
    ("dblink", Risk.HIGH, "uses a separate connection that Backstop does not see"),
    ("pg_file_", Risk.CRITICAL, "accesses files on the database server"),
    ("pg_ls_", Risk.HIGH, "lists directories on the database server"),
    ("pg_replication_origin_", Risk.HIGH, "changes replication progress tracking"),
    ("pg_stat_reset", Risk.MEDIUM, "discards collected statistics"),
    ("binary_upgrade_", Risk.HIGH, "is an internal pg_upgrade function"),
)
_FUNCTION_PREFIXES: Final = tuple(p for p, _, _ in _FUNCTION_PREFIX_RULES)

# Functions whose string arguments are SQL that runs: classify that SQL too.
_SQL_ARGUMENT_FUNCTIONS: Final = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "dblink",
        "dblink_exec",
        "dblink_send_query",
        "dblink_open",
    }
)

# Settings that change what later statements do, beyond the lexer-sensitive ones.
_SENSITIVE_SETTINGS: Final[dict[str, tuple[Risk, str]]] = {
    "session_replication_role": (
        Risk.HIGH,
        "session_replication_role can switch off triggers and foreign-key checks",
    ),
    "allow_system_table_mods": (Risk.HIGH, "allow_system_table_mods permits changing catalogs"),
    "zero_damaged_pages": (Risk.HIGH, "zero_damaged_pages silently discards damaged data"),
    "ignore_system_indexes": (Risk.MEDIUM, "ignore_system_indexes changes catalog access"),
    "lo_compat_privileges": (Risk.HIGH, "lo_compat_privileges disables large-object checks"),
}

# Values of those settings that are their safe defaults.
_HARMLESS_VALUES: Final = frozenset({"origin", "off", "false", "0", "default"})

_UNTRUSTED_LANGUAGES: Final = frozenset({"c", "plsh"})

_MAX_DEPTH: Final = 8


# --------------------------------------------------------------------------------------
# Result under construction.


_QUIET_BASE: Final = frozenset({"SELECT", "SET", "RESET"})


class _Result:
    """A Classification while it is being built (mutable, merged from nested results)."""

    __slots__ = (
        "category",
        "destructive",
        "effects",
        "executes",
        "functions",
        "has_where",
        "lexer_unsafe",
        "opaque",
        "operation",
        "prepared",
        "prepared_name",
        "reasons",
        "risk",
        "tables",
        "targets",
        "unbounded",
    )

    def __init__(self, operation: str, category: Category, risk: Risk, reason: str) -> None:
        self.operation = operation
        self.category = category
        self.risk = risk
        self.reasons: list[str] = [reason]
        self.tables: dict[str, int] = {}
        self.targets: dict[str, None] = {}
        self.functions: dict[str, int] = {}
        self.has_where = False
        self.unbounded = False
        self.destructive = False
        self.lexer_unsafe = False
        self.opaque = False
        self.effects: list[_Result] = []
        self.prepared_name: str | None = None
        self.prepared: Classification | None = None
        self.executes: str | None = None

    def flag(self, risk: Risk, reason: str) -> None:
        if risk > self.risk:
            self.risk = risk
        self.reasons.append(reason)

    def target(self, name: str, location: int = 0) -> None:
        self.targets[name] = None
        self.tables.setdefault(name, location)

    def absorb(self, sub: _Result, prefix: str = "", effect: bool = True) -> None:
        """Merge a nested statement: its risk, what it touches, and why.

        effect=False for SQL that runs elsewhere or as a side effect (a function argument):
        it raises the risk but does not make this statement that kind of statement.
        """
        if sub.risk > self.risk:
            self.risk = sub.risk
        if sub.risk > Risk.LOW:
            # What a nested query or SET is ("SELECT reads data") is not news; why it is
            # risky is.
            reasons = sub.reasons[1:] if sub.operation in _QUIET_BASE else sub.reasons
            self.reasons.extend(prefix + r for r in reasons if r)
        for name, location in sub.tables.items():
            self.tables.setdefault(name, location)
        self.targets.update(sub.targets)
        for name, location in sub.functions.items():
            self.functions.setdefault(name, location)
        self.destructive = self.destructive or sub.destructive
        self.lexer_unsafe = self.lexer_unsafe or sub.lexer_unsafe
        self.opaque = self.opaque or sub.opaque
        if self.executes is None:
            self.executes = sub.executes
        if effect:
            self.effects.append(sub)

    def build(self, sql: str) -> Classification:
        targets = tuple(self.targets)
        tables = self.tables
        if len(tables) <= 1:
            ordered = tuple(tables)
        else:  # the statement's own targets first, then the rest in order of appearance
            rest = sorted((loc, name) for name, loc in tables.items() if name not in self.targets)
            ordered = targets + tuple(name for _, name in rest)
        functions = self.functions
        if len(functions) <= 1:
            called = tuple(functions)
        else:
            called = tuple(name for _, name in sorted((loc, n) for n, loc in functions.items()))
        reasons = self.reasons
        said = tuple(reasons) if len(reasons) == 1 else tuple(dict.fromkeys(reasons))
        return _new_classification(
            sql,
            self.operation,
            self.category,
            ordered,
            self.has_where,
            self.unbounded,
            self.destructive,
            self.risk,
            said,
            called,
            self.prepared_name,
            self.prepared,
            self.executes,
            self.lexer_unsafe,
            None,
            None,
            targets,
        )


# How a Classification is made on the hot path. The dataclass's generated __init__ is
# interpreted Python even when this module is compiled (mypyc leaves the methods that
# dataclasses generates to dataclasses), and being frozen it sets each field through
# object.__setattr__: 1.9 us for the 17 fields. Compiled (see backstop_core.native),
# Classification is a native class and this module's own attribute writes go straight
# into the object, past the frozen __setattr__ (which still refuses every other writer);
# as plain Python its slots are member descriptors, and setting them one by one beats
# the generated __init__.
_NATIVE_CLASSIFICATION: Final = not isinstance(vars(Classification)["sql"], MemberDescriptorType)


def _slot_setters() -> tuple[Callable[[Classification, Any], None], ...]:
    names = tuple(f.name for f in fields(Classification))
    # _new_classification below fills exactly these fields in this order.
    expected = (
        "sql",
        "operation",
        "category",
        "tables",
        "has_where",
        "unbounded",
        "table_destructive",
        "risk",
        "reasons",
        "functions",
        "prepared_name",
        "prepared",
        "executes",
        "lexer_unsafe",
        "row_estimate",
        "table_rows",
        "targets",
    )
    if names != expected:  # pragma: no cover - a guard for whoever adds a field
        raise RuntimeError(f"Classification fields changed ({names}): update _new_classification")
    return tuple(getattr(Classification, name).__set__ for name in names)


(
    _set_sql,
    _set_operation,
    _set_category,
    _set_tables,
    _set_has_where,
    _set_unbounded,
    _set_destructive,
    _set_risk,
    _set_reasons,
    _set_functions,
    _set_prepared_name,
    _set_prepared,
    _set_executes,
    _set_lexer_unsafe,
    _set_row_estimate,
    _set_table_rows,
    _set_targets,
) = _slot_setters()


def _new_classification(
    sql: str,
    operation: str,
    category: Category,
    tables: tuple[str, ...],
    has_where: bool,
    unbounded: bool,
    destructive: bool,
    risk: Risk,
    reasons: tuple[str, ...],
    functions: tuple[str, ...],
    prepared_name: str | None,
    prepared: Classification | None,
    executes: str | None,
    lexer_unsafe: bool,
    row_estimate: int | None,
    table_rows: int | None,
    targets: tuple[str, ...],
) -> Classification:
    """Classification(...) with every field given, without its generated __init__."""
    c: Classification
    if _NATIVE_CLASSIFICATION:
        c = Classification.__new__(Classification)
        c.sql = sql  # type: ignore[misc]
        c.operation = operation  # type: ignore[misc]
        c.category = category  # type: ignore[misc]
        c.tables = tables  # type: ignore[misc]
        c.has_where = has_where  # type: ignore[misc]
        c.unbounded = unbounded  # type: ignore[misc]
        c.table_destructive = destructive  # type: ignore[misc]
        c.risk = risk  # type: ignore[misc]
        c.reasons = reasons  # type: ignore[misc]
        c.functions = functions  # type: ignore[misc]
        c.prepared_name = prepared_name  # type: ignore[misc]
        c.prepared = prepared  # type: ignore[misc]
        c.executes = executes  # type: ignore[misc]
        c.lexer_unsafe = lexer_unsafe  # type: ignore[misc]
        c.row_estimate = row_estimate  # type: ignore[misc]
        c.table_rows = table_rows  # type: ignore[misc]
        c.targets = targets  # type: ignore[misc]
        return c
    c = object.__new__(Classification)
    _set_sql(c, sql)
    _set_operation(c, operation)
    _set_category(c, category)
    _set_tables(c, tables)
    _set_has_where(c, has_where)
    _set_unbounded(c, unbounded)
    _set_destructive(c, destructive)
    _set_risk(c, risk)
    _set_reasons(c, reasons)
    _set_functions(c, functions)
    _set_prepared_name(c, prepared_name)
    _set_prepared(c, prepared)
    _set_executes(c, executes)
    _set_lexer_unsafe(c, lexer_unsafe)
    _set_row_estimate(c, row_estimate)
    _set_table_rows(c, table_rows)
    _set_targets(c, targets)
    return c


def _with_sql(c: Classification, sql: str) -> Classification:
    """A copy of a classification with another `sql`."""
    return _new_classification(
        sql,
        c.operation,
        c.category,
        c.tables,
        c.has_where,
        c.unbounded,
        c.table_destructive,
        c.risk,
        c.reasons,
        c.functions,
        c.prepared_name,
        c.prepared,
        c.executes,
        c.lexer_unsafe,
        c.row_estimate,
        c.table_rows,
        c.targets,
    )


class _Context:
    """Where a statement is being classified: its schema default, text and nesting."""

    __slots__ = ("depth", "schema", "text")

    def __init__(self, schema: str, text: str, depth: int) -> None:
        self.schema = schema
        self.text = text
        self.depth = depth


_NO_SCOPE: Final[frozenset[str]] = frozenset()


# --------------------------------------------------------------------------------------
# The walk.


def _walk(res: _Result, root: Any, scope: frozenset[str], ctx: _Context) -> None:
    """Visit every dict and list under root: tables, calls, nested statements.

    `scope` holds the CTE names visible here, which are not tables. Subtrees that are known
    leaves (literals, column references, type names) are not descended into.
    """
    if type(root) is dict and "withClause" in root:
        _walk_with(res, root, scope, ctx)
        return
    stack: list[Any] = [root]
    hooks = _HOOKS
    while stack:
        node = stack.pop()
        if type(node) is not dict:
            if type(node) is list:
                stack.extend(node)
            continue
        for key, value in node.items():
            vt = type(value)
            if vt is dict:
                hook = hooks.get(key)
                if hook is None:
                    stack.append(value)
                elif hook is _SKIP:
                    pass
                elif hook is _RANGE_VAR:
                    if "relname" in value:
                        _range_var(res, value, scope, ctx)
                    else:
                        stack.append(value)
                elif hook is _CALL:
                    _on_call(res, value, ctx)
                    stack.append(value)
                elif hook is _QUERY:
                    if "withClause" in value:
                        _walk_with(res, value, scope, ctx)
                    else:
                        stack.append(value)
                else:
                    res.absorb(_classify_node(hook, value, ctx, scope))
            elif vt is list:
                stack.extend(value)


def _walk_with(res: _Result, node: dict[str, Any], scope: frozenset[str], ctx: _Context) -> None:
    """A statement with a WITH clause: its CTE names hide tables only where they are visible."""
    clause = node["withClause"]
    ctes = clause.get("ctes") or []
    names = [c.get("CommonTableExpr", {}).get("ctename", "") for c in ctes]
    visible = scope | frozenset(names)
    recursive = clause.get("recursive", False)
    for i, cte in enumerate(ctes):
        # A non-recursive CTE sees only the CTEs before it; its own name is a real table.
        _walk(res, cte, visible if recursive else scope | frozenset(names[:i]), ctx)
    _walk(res, {k: v for k, v in node.items() if k != "withClause"}, visible, ctx)


def _qualify(rv: dict[str, Any], ctx: _Context) -> str:
    rel: str = rv["relname"]
    schema = rv.get("schemaname")
    if schema is None:
        schema = "pg_temp" if rv.get("relpersistence") == "t" else ctx.schema
    return f"{schema}.{rel}" if schema else rel


def _range_var(res: _Result, rv: dict[str, Any], scope: frozenset[str], ctx: _Context) -> None:
    if "schemaname" not in rv and rv["relname"] in scope:
        return
    name = _qualify(rv, ctx)
    if name not in res.tables:
        res.tables[name] = rv.get("location", 0)


def _name_list(items: Any) -> list[str]:
    """[{"String": {"sval": "a"}}, ...] -> ["a", ...]."""
    out: list[str] = []
    for item in items or ():
        s = item.get("String") if type(item) is dict else None
        if s is not None:
            out.append(s.get("sval", ""))
    return out


def _qualify_names(parts: list[str], ctx: _Context) -> str:
    if len(parts) >= 2:
        return f"{parts[-2]}.{parts[-1]}"
    if parts and ctx.schema:
        return f"{ctx.schema}.{parts[0]}"
    return parts[0] if parts else "?"


# --------------------------------------------------------------------------------------
# Function calls.


def _on_call(res: _Result, call: dict[str, Any], ctx: _Context) -> None:
    names = _name_list(call.get("funcname"))
    if not names:
        return
    name = names[-1].lower()
    res.functions.setdefault(name, call.get("location", 0))
    rule = _FUNCTION_RULES.get(name)
    if rule is None:
        if not name.startswith(_FUNCTION_PREFIXES):
            return
        rule = next((r, w) for p, r, w in _FUNCTION_PREFIX_RULES if name.startswith(p))
    risk, why = rule
    args = call.get("args") or []
    if name == "set_config":
        # Judged by what it sets: drivers call it for harmless settings (asyncpg turns
        # jit off while it introspects types), and the dangerous ones are named below.
        _check_set_config(res, args)
        return
    res.flag(risk, f"{name}() {why}")
    if name in _SQL_ARGUMENT_FUNCTIONS:
        for arg in args:
            text = _const(arg)
            if type(text) is str:
                _absorb_text(res, text, ctx, f"{name}() runs: ", None, effect=False)


def _check_set_config(res: _Result, args: list[Any]) -> None:
    setting = _const(args[0]) if args else _NOT_CONST
    if type(setting) is not str:
        res.flag(
            Risk.CRITICAL,
            "set_config() with a setting name computed at run time could switch off "
            "standard_conforming_strings or change the role",
        )
        return
    name = setting.strip().lower()
    value = _const(args[1]) if len(args) > 1 else _NOT_CONST
    if name in UNSAFE_PARAMETERS:
        if type(value) is not str:
            res.flag(
                Risk.CRITICAL,
                f"set_config() sets {name} to a value computed at run time, {_DESYNC}",
            )
            return
        reason = lexer_unsafe_setting(name, value)
        if reason is not None:
            res.lexer_unsafe = True
            res.flag(Risk.CRITICAL, f"set_config(): {reason}")
    elif name in ("role", "session_authorization"):
        res.flag(Risk.HIGH, f"set_config() changes {name}, and with it the session's privileges")
    elif name == "search_path":
        # Unlike SET search_path, a path set this way is not followed by the gateway.
        res.flag(Risk.HIGH, f"set_config() sets search_path: {_SEARCH_PATH_REASON}")
    elif name in _SENSITIVE_SETTINGS and (
        type(value) is not str or value.strip().lower() not in _HARMLESS_VALUES
    ):
        res.flag(*_SENSITIVE_SETTINGS[name])
    else:
        res.reasons.append(f"set_config() changes {name} for this session")


# --------------------------------------------------------------------------------------
# Constant folding for WHERE clauses.

_NOT_CONST: Final = object()
# Truth of a WHERE clause: _LIKELY means true for every row except where a column is NULL
# (x = x, x IS NOT NULL); _LIKELY_FALSE is its negation (x IS NULL).
_UNKNOWN, _TRUE, _FALSE, _LIKELY, _LIKELY_FALSE = 0, 1, 2, 3, 4
_NEGATION: Final = {
    _TRUE: _FALSE,
    _FALSE: _TRUE,
    _LIKELY: _LIKELY_FALSE,
    _LIKELY_FALSE: _LIKELY,
    _UNKNOWN: _UNKNOWN,
}
_INT_TYPES: Final = frozenset({"int2", "int4", "int8", "integer", "bigint", "smallint"})
_TEXT_TYPES: Final = frozenset({"text", "varchar", "bpchar", "name"})


# Every time a literal's value decides something, `_LITERAL_READS` advances (next() on a
# count is atomic under the GIL). A classification made while it stood still depended on
# where the literals are, never on their values: `Classifier` may then reuse it for every
# statement that differs only in its literals.
_LITERAL_READS: Final = count()


def _const(node: Any) -> object:
    """The Python value of a literal (int, Decimal, str, bool, None for NULL), else _NOT_CONST;
    a literal looked at is a literal used (see `_LITERAL_READS`)."""
    if type(node) is dict and ("A_Const" in node or "TypeCast" in node):
        next(_LITERAL_READS)  # even a literal that turns out unusable ('x'::boolean) decides
    return _literal(node)


def _is_literal(node: Any) -> bool:
    """Whether node is a literal, possibly cast (`5`, `'x'::date`), whatever its value."""
    while type(node) is dict:
        if "A_Const" in node:
            return True
        cast = node.get("TypeCast")
        if cast is None:
            return False
        node = cast.get("arg")
    return False


def _literal(node: Any) -> object:
    """`_const` for a look that does not use the value (is it a literal at all?)."""
    if type(node) is not dict:
        return _NOT_CONST
    c = node.get("A_Const")
    if c is not None:
        if "ival" in c:
            return int(c["ival"].get("ival", 0))
        if "sval" in c:
            return str(c["sval"].get("sval", ""))
        if "fval" in c:
            try:
                return Decimal(c["fval"].get("fval", "0"))
            except InvalidOperation:
                return _NOT_CONST
        if "boolval" in c:
            return bool(c["boolval"].get("boolval", False))
        if c.get("isnull"):
            return None
        return _NOT_CONST
    cast = node.get("TypeCast")
    if cast is None:
        return _NOT_CONST
    value = _literal(cast.get("arg"))
    names = _name_list(cast.get("typeName", {}).get("names"))
    typ = names[-1].lower() if names else ""
    if value is _NOT_CONST or value is None:
        return value
    if typ in ("bool", "boolean"):
        if type(value) is str:
            parsed = _parse_bool(value)
            return _NOT_CONST if parsed is None else parsed
        return value if type(value) is bool else _NOT_CONST
    if typ in _INT_TYPES:
        if type(value) is int:
            return value
        if type(value) is str:
            try:
                return int(value.strip())
            except ValueError:
                return _NOT_CONST
        return _NOT_CONST
    if typ in _TEXT_TYPES:
        return value if type(value) is str else _NOT_CONST
    return _NOT_CONST


def _compare(left: object, right: object, op: str) -> int:
    """Fold `left op right` for two literals the way PostgreSQL would, or _UNKNOWN."""
    if left is None or right is None:
        return _UNKNOWN
    lt, rt = type(left), type(right)
    if lt is str and rt is not str:
        left, lt = _coerce(left, right), type(right)
    elif rt is str and lt is not str:
        right, rt = _coerce(right, left), type(left)
    if left is _NOT_CONST or right is _NOT_CONST:
        return _UNKNOWN
    numeric = (int, Decimal)
    if lt is bool or rt is bool:
        if lt is not rt:
            return _UNKNOWN
    elif lt in numeric and rt in numeric:
        pass
    elif lt is not rt:
        return _UNKNOWN
    elif lt is str and op not in ("=", "<>", "!=") and left != right:
        return _LIKELY  # the order of two strings depends on the collation: assume the worst
    a: Any = left
    b: Any = right
    if op == "=":
        result = a == b
    elif op in ("<>", "!="):
        result = a != b
    elif op == "<":
        result = a < b
    elif op == ">":
        result = a > b
    elif op == "<=":
        result = a <= b
    elif op == ">=":
        result = a >= b
    else:
        return _UNKNOWN
    return _TRUE if result else _FALSE


def _coerce(text: object, like: object) -> object:
    """An untyped string literal compared with a typed one takes the other's type."""
    assert isinstance(text, str)
    if type(like) is bool:
        parsed = _parse_bool(text)
        return _NOT_CONST if parsed is None else parsed
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        return _NOT_CONST


def _same_expr(a: Any, b: Any) -> bool:
    """Structural equality of two expressions, ignoring where they appear in the text."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        if len(a) == 1 and len(b) == 1:
            if a.keys() != b.keys():
                return False  # different node types
            ref = a.get("ColumnRef")
            if ref is not None:  # the common case, compared without recursion
                return bool(ref.get("fields") == b["ColumnRef"].get("fields"))
            if "A_Const" in a:
                next(_LITERAL_READS)  # equal or not depends on the values
        keys = [k for k in a if k != "location"]
        if len(keys) != sum(1 for k in b if k != "location"):
            return False
        return all(k in b and _same_expr(a[k], b[k]) for k in keys)
    if type(a) is list:
        return len(a) == len(b) and all(_same_expr(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _column_name(node: Any) -> str | None:
    ref = node.get("ColumnRef") if type(node) is dict else None
    if ref is None:
        return None
    parts = []
    for f in ref.get("fields", ()):
        parts.append(f["String"].get("sval", "") if "String" in f else "*")
    return ".".join(parts)


def _operator(expr: dict[str, Any]) -> str:
    names = _name_list(expr.get("name"))
    return names[-1] if names else ""


def _truth(node: Any) -> tuple[int, str]:
    """Whether a WHERE expression is always true, likely true for every row, false or unknown.

    The note says why, in words an operator can check against the SQL.
    """
    if type(node) is not dict or len(node) != 1:
        return _UNKNOWN, ""
    ((kind, body),) = node.items()
    if kind == "A_Expr":
        return _expr_truth(body)
    if kind == "BoolExpr":
        return _bool_truth(body)
    if kind == "A_Const" or kind == "TypeCast":
        value = _const(node)
        if value is True:
            return _TRUE, "it is the constant true"
        if value is False:
            return _FALSE, ""
        return _UNKNOWN, ""
    if kind == "NullTest":
        arg = body.get("arg")
        value = _const(arg)
        not_null = body.get("nulltesttype") == "IS_NOT_NULL"
        if value is not _NOT_CONST:
            return (_TRUE if (value is not None) == not_null else _FALSE), "it tests a constant"
        column = _column_name(arg)
        if column is None:
            return _UNKNOWN, ""
        note = f"{column} IS NOT NULL is true for every row where {column} has a value"
        return (_LIKELY if not_null else _LIKELY_FALSE), note
    if kind == "BooleanTest":
        inner, note = _truth(body.get("arg"))
        test = body.get("booltesttype", "")
        if inner == _TRUE:
            return (
                _TRUE if test in ("IS_TRUE", "IS_NOT_FALSE", "IS_NOT_UNKNOWN") else _FALSE
            ), note
        if inner == _FALSE:
            return (
                _TRUE if test in ("IS_FALSE", "IS_NOT_TRUE", "IS_NOT_UNKNOWN") else _FALSE
            ), note
        return _UNKNOWN, ""
    if kind == "SubLink":
        return _sublink_truth(body)
    return _UNKNOWN, ""


def _bool_truth(body: dict[str, Any]) -> tuple[int, str]:
    op = body.get("boolop")
    parts = [_truth(a) for a in body.get("args") or ()]
    if op == "NOT_EXPR":
        if not parts:
            return _UNKNOWN, ""
        inner, note = parts[0]
        if inner == _FALSE:
            return _TRUE, "it negates a condition that is always false"
        return _NEGATION[inner], note
    values = [v for v, _ in parts]
    notes = [n for v, n in parts if v in (_TRUE, _LIKELY) and n]
    if op == "OR_EXPR":
        for v, n in parts:
            if v == _TRUE:
                return (
                    _TRUE,
                    f"one side of OR is always true: {n}" if n else "one side of OR is always true",
                )
        for v, n in parts:
            if v == _LIKELY:
                return _LIKELY, n
        return (_FALSE, "") if values and all(v == _FALSE for v in values) else (_UNKNOWN, "")
    if op == "AND_EXPR":
        if any(v == _FALSE for v in values):
            return _FALSE, ""
        if values and all(v == _TRUE for v in values):
            return _TRUE, "; ".join(dict.fromkeys(notes))
        if values and all(v in (_TRUE, _LIKELY) for v in values):
            return _LIKELY, "; ".join(dict.fromkeys(notes))
    return _UNKNOWN, ""


def _expr_truth(body: dict[str, Any]) -> tuple[int, str]:
    kind = body.get("kind")
    left, right = body.get("lexpr"), body.get("rexpr")
    if kind == "AEXPR_OP":
        if _is_literal(left) is not _is_literal(right):
            return _UNKNOWN, ""  # a column against a value (whatever the value): the common case
        lv, rv = _const(left), _const(right)
        if (lv is _NOT_CONST) is not (rv is _NOT_CONST):
            return _UNKNOWN, ""
        op = _operator(body)
        if lv is not _NOT_CONST:
            return _compare(lv, rv, op), "it compares constants"
        if left is not None and _same_expr(left, right):
            note = f"both sides of {op} are the same expression"
            if op in ("=", "<=", ">="):
                return _LIKELY, note
            if op in ("<>", "!=", "<", ">"):
                return _LIKELY_FALSE, note
        return _UNKNOWN, ""
    op = _operator(body)
    if kind in ("AEXPR_NOT_DISTINCT", "AEXPR_DISTINCT"):
        lv, rv = _const(left), _const(right)
        if _same_expr(left, right) or (
            lv is not _NOT_CONST and rv is not _NOT_CONST and lv == rv and type(lv) is type(rv)
        ):
            same = kind == "AEXPR_NOT_DISTINCT"
            return (_TRUE if same else _FALSE), "both sides are the same expression"
        return _UNKNOWN, ""
    if kind == "AEXPR_IN" and op == "=":
        lv = _const(left)
        items = right.get("List", {}).get("items", []) if type(right) is dict else []
        if lv is not _NOT_CONST:
            for item in items:
                if _compare(lv, _const(item), "=") == _TRUE:
                    return _TRUE, "it tests a constant against a list that contains it"
        return _UNKNOWN, ""
    if kind in ("AEXPR_LIKE", "AEXPR_ILIKE") and op in ("~~", "~~*"):
        pattern = _const(right)
        if type(pattern) is str and pattern and set(pattern) == {"%"}:
            column = _column_name(left)
            if _const(left) not in (_NOT_CONST, None):
                return _TRUE, f"LIKE '{pattern}' matches any value"
            if column is not None:
                return (
                    _LIKELY,
                    f"{column} LIKE '{pattern}' matches every row where {column} has a value",
                )
        return _UNKNOWN, ""
    return _UNKNOWN, ""


def _where_truth(where: Any) -> tuple[int, str]:
    """_truth, plus: a condition that mentions no column is the same for every row."""
    truth, note = _truth(where)
    if truth == _UNKNOWN and where is not None and not _depends_on_rows(where):
        return _LIKELY, "it does not refer to any column, so it is the same for every row"
    return truth, note


def _depends_on_rows(node: Any) -> bool:
    if type(node) is not dict:
        return False
    expr = node.get("A_Expr")
    if expr is not None and (
        "ColumnRef" in (expr.get("lexpr") or ()) or "ColumnRef" in (expr.get("rexpr") or ())
    ):
        return True  # the common case: a column compared with something
    boolean = node.get("BoolExpr")
    if boolean is not None:
        return any(_depends_on_rows(arg) for arg in boolean.get("args") or ())
    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if "ColumnRef" in item or "SubLink" in item or "CurrentOfExpr" in item:
                return True
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return False


def _sublink_truth(body: dict[str, Any]) -> tuple[int, str]:
    sub = body.get("subselect", {}).get("SelectStmt")
    if sub is None or any(
        k in sub for k in ("fromClause", "whereClause", "havingClause", "limitCount", "valuesLists")
    ):
        return _UNKNOWN, ""
    link = body.get("subLinkType")
    if link == "EXISTS_SUBLINK":
        return _TRUE, "EXISTS of a query without FROM is always true"
    if link == "EXPR_SUBLINK":
        targets = sub.get("targetList") or []
        if len(targets) == 1:
            return _truth(targets[0].get("ResTarget", {}).get("val"))
    return _UNKNOWN, ""


# --------------------------------------------------------------------------------------
# Statement handlers.

_Handler = Callable[[dict[str, Any], _Context, frozenset[str]], _Result]

_DML_RANK: Final = {"DELETE": 4, "UPDATE": 3, "MERGE": 2, "INSERT": 1}

_SEARCH_PATH_REASON: Final = (
    "changing search_path changes which schema unqualified table names resolve to, "
    "so later statements may touch different tables than they appear to"
)


def _adopt_writes(
    res: _Result, own: tuple[Risk, int] | None = None, how: str = "a data-modifying WITH clause"
) -> None:
    """A statement that carries writes (a data-modifying WITH, COPY of a DELETE) is that write.

    `own` is the risk and rank of the statement's own write, for DML with writes in WITH.
    """
    writes = [e for e in res.effects if e.category is Category.WRITE and e.operation in _DML_RANK]
    if not writes:
        return
    primary = max(writes, key=lambda e: (e.risk, _DML_RANK[e.operation]))
    if own is not None and own >= (primary.risk, _DML_RANK[primary.operation]):
        return
    if res.category is Category.READ and own is None:
        res.reasons[0] = f"{how} makes this a {primary.operation}, not just a read"
    res.operation = primary.operation
    res.category = Category.WRITE
    res.has_where = primary.has_where
    res.unbounded = primary.unbounded


def _select(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    into = body.get("intoClause")
    if into is not None:
        res = _Result("CREATE_TABLE", Category.DDL, Risk.MEDIUM, "SELECT INTO creates a new table")
    else:
        res = _Result("SELECT", Category.READ, Risk.LOW, "SELECT reads data")
        if body.get("lockingClause"):
            res.reasons.append("it locks the rows it reads until the transaction ends")
        if "fromClause" in body:
            where = body.get("whereClause")
            res.has_where = where is not None
            res.unbounded = where is None or _truth(where)[0] in (_TRUE, _LIKELY)
    _walk(res, body, scope, ctx)
    _adopt_writes(res)
    return res


def _bounded(res: _Result, op: str, where: Any, table: str, verb: str) -> None:
    """Risk of an UPDATE or DELETE from its WHERE clause alone (row counts come later)."""
    if where is None:
        reason = f"{op} has no WHERE clause: it {verb} every row of {table}"
    elif "CurrentOfExpr" in where:
        res.has_where = True
        res.reasons[0] = f"{op} WHERE CURRENT OF touches only the row under the cursor"
        return
    else:
        res.has_where = True
        truth, note = _where_truth(where)
        if truth == _TRUE:
            reason = (
                f"the WHERE clause is always true ({note}): this {op} {verb} every row of {table}"
            )
        elif truth == _LIKELY:
            reason = (
                f"the WHERE clause is likely true for every row ({note}): this {op} "
                f"probably {verb} every row of {table}"
            )
        else:
            return
    res.unbounded = True
    res.destructive = True
    res.risk = Risk.CRITICAL
    res.reasons[0] = reason


def _dml(op: str, body: dict[str, Any], ctx: _Context, describe: str) -> tuple[_Result, str]:
    """The result for a write to body["relation"] (never a CTE, whatever the scope says)."""
    rv = body["relation"]
    table = _qualify(rv, ctx)
    res = _Result(op, Category.WRITE, Risk.MEDIUM, describe.format(table=table))
    res.target(table, rv.get("location", 0))
    return res, table


def _dml_rest(res: _Result, body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> None:
    """Walk the rest of a write; a riskier write in its WITH clause decides what it is."""
    own = (res.risk, _DML_RANK[res.operation])
    _walk(res, body, scope, ctx)
    _adopt_writes(res, own)


def _delete(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res, table = _dml(
        "DELETE", body, ctx, "DELETE removes the rows of {table} that match its WHERE clause"
    )
    _bounded(res, "DELETE", body.get("whereClause"), table, "removes")
    _dml_rest(res, body, ctx, scope)
    return res


def _update(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res, table = _dml(
        "UPDATE", body, ctx, "UPDATE changes the rows of {table} that match its WHERE clause"
    )
    _bounded(res, "UPDATE", body.get("whereClause"), table, "rewrites")
    _dml_rest(res, body, ctx, scope)
    return res


def _insert(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res, table = _dml("INSERT", body, ctx, "INSERT adds rows to {table}")
    conflict = body.get("onConflictClause")
    if conflict is not None and conflict.get("action") == "ONCONFLICT_UPDATE":
        res.reasons.append(f"ON CONFLICT DO UPDATE also updates existing rows of {table}")
    _dml_rest(res, body, ctx, scope)
    return res


def _merge(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res, table = _dml("MERGE", body, ctx, "MERGE inserts, updates or deletes rows of {table}")
    res.has_where = True
    truth, note = _where_truth(body.get("joinCondition"))
    every = truth in (_TRUE, _LIKELY)
    for clause in body.get("mergeWhenClauses") or ():
        when = clause.get("MergeWhenClause", {})
        match, command = when.get("matchKind", ""), when.get("commandType", "")
        unconditional = "condition" not in when
        if match == "MERGE_WHEN_MATCHED":
            if command == "CMD_DELETE":
                res.flag(
                    Risk.HIGH,
                    f"MERGE ... WHEN MATCHED THEN DELETE deletes the rows of {table} that the "
                    "source matches",
                )
            if every and unconditional and command in ("CMD_DELETE", "CMD_UPDATE"):
                verb = "deletes" if command == "CMD_DELETE" else "rewrites"
                res.unbounded = True
                res.destructive = True
                res.flag(
                    Risk.CRITICAL,
                    f"the MERGE join condition is always true ({note}): it {verb} every row "
                    f"of {table}",
                )
        elif match == "MERGE_WHEN_NOT_MATCHED_BY_SOURCE" and command in (
            "CMD_DELETE",
            "CMD_UPDATE",
        ):
            verb = "deletes" if command == "CMD_DELETE" else "updates"
            res.flag(
                Risk.HIGH,
                f"MERGE ... WHEN NOT MATCHED BY SOURCE {verb} every row of {table} that the "
                "source does not match",
            )
    _dml_rest(res, body, ctx, scope)
    return res


def _truncate(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    relations = [item.get("RangeVar", item) for item in body.get("relations") or ()]
    names = [_qualify(rv, ctx) for rv in relations]
    res = _Result(
        "TRUNCATE", Category.WRITE, Risk.CRITICAL, f"TRUNCATE empties {', '.join(names)} entirely"
    )
    for name, rv in zip(names, relations, strict=True):
        res.target(name, rv.get("location", 0))
    res.unbounded = True
    res.destructive = True
    if body.get("behavior") == "DROP_CASCADE":
        res.reasons.append(
            "CASCADE also truncates every table that references it through a foreign key"
        )
    _walk(res, body, scope, ctx)
    return res


_DROP_KINDS: Final[dict[str, tuple[str, str]]] = {
    "OBJECT_TABLE": ("DROP_TABLE", "TABLE"),
    "OBJECT_SCHEMA": ("DROP_SCHEMA", "SCHEMA"),
    "OBJECT_INDEX": ("DROP_INDEX", "INDEX"),
    "OBJECT_VIEW": ("DROP_VIEW", "VIEW"),
    "OBJECT_MATVIEW": ("DROP_MATERIALIZED_VIEW", "MATERIALIZED VIEW"),
    "OBJECT_FOREIGN_TABLE": ("DROP_FOREIGN_TABLE", "FOREIGN TABLE"),
    "OBJECT_SEQUENCE": ("DROP_SEQUENCE", "SEQUENCE"),
    "OBJECT_FUNCTION": ("DROP_FUNCTION", "FUNCTION"),
    "OBJECT_PROCEDURE": ("DROP_FUNCTION", "PROCEDURE"),
    "OBJECT_ROUTINE": ("DROP_FUNCTION", "ROUTINE"),
    "OBJECT_AGGREGATE": ("DROP_FUNCTION", "AGGREGATE"),
    "OBJECT_TRIGGER": ("DROP_TRIGGER", "TRIGGER"),
    "OBJECT_TYPE": ("DROP_TYPE", "TYPE"),
    "OBJECT_DOMAIN": ("DROP_TYPE", "DOMAIN"),
    "OBJECT_EXTENSION": ("DROP_EXTENSION", "EXTENSION"),
    "OBJECT_POLICY": ("DROP_POLICY", "POLICY"),
    "OBJECT_RULE": ("DROP_RULE", "RULE"),
}
# Dropping these with CASCADE also drops table columns that use them.
_DROP_CASCADE_TO_COLUMNS: Final = frozenset({"OBJECT_TYPE", "OBJECT_DOMAIN", "OBJECT_EXTENSION"})
_RELATION_DROPS: Final = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"}
)


def _drop(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    kind = body.get("removeType", "")
    operation, noun = _DROP_KINDS.get(kind, ("DROP_OTHER", kind.removeprefix("OBJECT_")))
    names: list[str] = []
    for obj in body.get("objects") or ():
        if "List" in obj:
            parts = _name_list(obj["List"].get("items"))
            names.append(_qualify_names(parts, ctx) if kind in _RELATION_DROPS else ".".join(parts))
        elif "String" in obj:
            names.append(obj["String"].get("sval", ""))
        elif "ObjectWithArgs" in obj:
            names.append(".".join(_name_list(obj["ObjectWithArgs"].get("objname"))))
        elif "TypeName" in obj:
            names.append(".".join(_name_list(obj["TypeName"].get("names"))))
    listed = ", ".join(n for n in names if n) or "an object"
    cascade = body.get("behavior") == "DROP_CASCADE"
    if kind == "OBJECT_TABLE":
        res = _Result(
            operation,
            Category.DDL,
            Risk.CRITICAL,
            f"DROP TABLE destroys {listed} with all {'its' if len(names) == 1 else 'their'} rows",
        )
        res.destructive = res.unbounded = True
        for name in names:
            res.target(name)
    elif kind == "OBJECT_SCHEMA":
        res = _Result(
            operation, Category.DDL, Risk.CRITICAL, f"DROP SCHEMA destroys schema {listed}"
        )
        res.destructive = True
    else:
        res = _Result(operation, Category.DDL, Risk.HIGH, f"DROP {noun} removes {listed}")
        if kind in _RELATION_DROPS:
            for name in names:
                res.tables.setdefault(name, 0)
    if cascade:
        res.reasons.append(
            "CASCADE also drops objects that depend on it (the gateway lists them from the catalog)"
        )
        if kind == "OBJECT_SCHEMA":
            res.reasons.append("CASCADE drops every table in the schema with it")
        elif kind in _DROP_CASCADE_TO_COLUMNS:
            res.destructive = True
            res.flag(
                Risk.CRITICAL, f"CASCADE also drops the table columns that use this {noun.lower()}"
            )
    return res


def _dropdb(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res = _Result(
        "DROP_DATABASE",
        Category.DDL,
        Risk.CRITICAL,
        f"DROP DATABASE destroys database {body.get('dbname', '?')} and every table in it",
    )
    res.destructive = True
    return res


def _drop_owned(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res = _Result(
        "DROP_OWNED",
        Category.DDL,
        Risk.CRITICAL,
        "DROP OWNED drops every object the role owns, tables included",
    )
    res.destructive = True
    return res


_ALTER_KINDS: Final[dict[str, str]] = {
    "OBJECT_TABLE": "ALTER_TABLE",
    "OBJECT_INDEX": "ALTER_INDEX",
    "OBJECT_VIEW": "ALTER_VIEW",
    "OBJECT_MATVIEW": "ALTER_MATERIALIZED_VIEW",
    "OBJECT_SEQUENCE": "ALTER_SEQUENCE",
    "OBJECT_FOREIGN_TABLE": "ALTER_FOREIGN_TABLE",
    "OBJECT_TYPE": "ALTER_TYPE",
    "OBJECT_COLUMN": "ALTER_TABLE",
    "OBJECT_TABCONSTRAINT": "ALTER_TABLE",
    "OBJECT_SCHEMA": "ALTER_SCHEMA",
    "OBJECT_DATABASE": "ALTER_DATABASE",
    "OBJECT_FUNCTION": "ALTER_FUNCTION",
    "OBJECT_PROCEDURE": "ALTER_FUNCTION",
}


def _alter_table(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    objtype = body.get("objtype", "OBJECT_TABLE")
    operation = _ALTER_KINDS.get(objtype, "ALTER")
    rv = body["relation"]
    table = _qualify(rv, ctx)
    res = _Result(
        operation, Category.DDL, Risk.MEDIUM, f"{operation.replace('_', ' ')} changes {table}"
    )
    if objtype == "OBJECT_TABLE":
        res.target(table, rv.get("location", 0))
        for item in body.get("cmds") or ():
            cmd = item.get("AlterTableCmd", {})
            subtype = cmd.get("subtype")
            column = cmd.get("name", "?")
            if subtype == "AT_DropColumn":
                res.destructive = True
                res.flag(Risk.HIGH, f"drops column {column} of {table} and all the data in it")
                if cmd.get("behavior") == "DROP_CASCADE":
                    res.reasons.append("CASCADE also drops objects that depend on the column")
            elif subtype == "AT_AlterColumnType":
                res.destructive = True
                res.flag(
                    Risk.HIGH,
                    f"changes the type of column {column} of {table}, rewriting every row "
                    "(a narrowing type can lose data)",
                )
    _walk(res, body, scope, ctx)
    return res


def _rename_like(type_key: str) -> _Handler:
    """RENAME, SET SCHEMA and OWNER TO, whose object type sits under `type_key`."""

    def handler(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
        objtype = body.get(type_key, "")
        if objtype == "OBJECT_ROLE":
            res = _Result("ALTER_ROLE", Category.DCL, Risk.HIGH, "ALTER ROLE changes a role")
        else:
            operation = _ALTER_KINDS.get(objtype, "ALTER")
            res = _Result(
                operation,
                Category.DDL,
                Risk.MEDIUM,
                f"{operation.replace('_', ' ')} changes a definition",
            )
            rv = body.get("relation")
            if operation == "ALTER_TABLE" and rv is not None:
                res.target(_qualify(rv, ctx), rv.get("location", 0))
        _walk(res, body, scope, ctx)
        return res

    return handler


def _grant(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    op = "GRANT" if body.get("is_grant") else "REVOKE"
    res = _Result(op, Category.DCL, Risk.HIGH, f"{op} changes who may read or change data")
    _walk(res, body, scope, ctx)
    return res


def _set_value(arg: Any) -> str:
    value = _const(arg)
    if value is _NOT_CONST or value is None:
        return ""
    if type(value) is bool:
        return "on" if value else "off"
    return str(value)


def _variable_set(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    kind = body.get("kind", "")
    name = body.get("name", "")
    key = name.lower()
    if kind in ("VAR_RESET", "VAR_RESET_ALL"):
        what = "every setting" if kind == "VAR_RESET_ALL" else name
        return _Result("RESET", Category.ADMIN, Risk.LOW, f"RESET restores {what} to its default")
    if kind == "VAR_SET_MULTI":
        res = _Result(
            "SET",
            Category.TRANSACTION,
            Risk.LOW,
            "SET TRANSACTION changes how the transaction runs",
        )
        _walk(res, body, scope, ctx)
        return res
    res = _Result("SET", Category.ADMIN, Risk.LOW, f"SET changes the session setting {name}")
    if kind != "VAR_SET_VALUE":
        return res  # SET ... TO DEFAULT, FROM CURRENT
    value = ", ".join(_set_value(a) for a in body.get("args") or ())
    if key in ("role", "session_authorization"):
        if value.lower() not in ("none", "default"):
            res.category = Category.DCL
            res.flag(
                Risk.HIGH,
                f"SET {'ROLE' if key == 'role' else 'SESSION AUTHORIZATION'} switches the session "
                f"to {value or 'another role'} and its privileges",
            )
    elif key == "search_path":
        res.flag(Risk.MEDIUM, f"SET search_path: {_SEARCH_PATH_REASON}")
    elif key in UNSAFE_PARAMETERS:
        reason = lexer_unsafe_setting(key, value)
        if reason is not None:
            res.lexer_unsafe = True
            res.flag(Risk.CRITICAL, reason)
    elif key in _SENSITIVE_SETTINGS and value.lower() not in _HARMLESS_VALUES:
        res.flag(*_SENSITIVE_SETTINGS[key])
    _walk(res, body, scope, ctx)
    return res


def _role_set(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res = _Result(
        "ALTER_ROLE",
        Category.DCL,
        Risk.HIGH,
        "ALTER ROLE ... SET changes settings for the role's future sessions",
    )
    _walk(res, body, scope, ctx)
    return res


_TRANSACTION_KINDS: Final[dict[str, tuple[str, Risk]]] = {
    "TRANS_STMT_BEGIN": ("BEGIN", Risk.LOW),
    "TRANS_STMT_START": ("BEGIN", Risk.LOW),
    "TRANS_STMT_COMMIT": ("COMMIT", Risk.LOW),
    "TRANS_STMT_ROLLBACK": ("ROLLBACK", Risk.LOW),
    "TRANS_STMT_SAVEPOINT": ("SAVEPOINT", Risk.LOW),
    "TRANS_STMT_RELEASE": ("RELEASE_SAVEPOINT", Risk.LOW),
    "TRANS_STMT_ROLLBACK_TO": ("ROLLBACK_TO_SAVEPOINT", Risk.LOW),
    "TRANS_STMT_PREPARE": ("PREPARE_TRANSACTION", Risk.MEDIUM),
    "TRANS_STMT_COMMIT_PREPARED": ("COMMIT_PREPARED", Risk.MEDIUM),
    "TRANS_STMT_ROLLBACK_PREPARED": ("ROLLBACK_PREPARED", Risk.MEDIUM),
}


def _transaction(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    kind = body.get("kind", "")
    operation, risk = _TRANSACTION_KINDS.get(kind, ("TRANSACTION", Risk.MEDIUM))
    if risk is Risk.LOW:
        reason = f"{operation.replace('_', ' ')} controls the transaction"
    else:
        reason = (
            f"{operation.replace('_', ' ')} acts on a two-phase transaction that outlives "
            "the session"
        )
    return _Result(operation, Category.TRANSACTION, risk, reason)


def _copy(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    is_from = bool(body.get("is_from"))
    direction = "FROM" if is_from else "TO"
    rv = body.get("relation")
    table = _qualify(rv, ctx) if rv is not None else "a query"
    if is_from:
        res = _Result("COPY", Category.WRITE, Risk.MEDIUM, f"COPY FROM loads rows into {table}")
        if rv is not None:
            res.target(table, rv.get("location", 0))
    else:
        res = _Result("COPY", Category.READ, Risk.LOW, f"COPY TO sends the rows of {table} out")
    filename = body.get("filename")
    if body.get("is_program"):
        res.flag(
            Risk.CRITICAL,
            f"COPY {direction} PROGRAM runs the shell command {filename!r} on the database server",
        )
    elif filename is not None:
        verb = "reads the file" if is_from else "writes the file"
        res.flag(Risk.HIGH, f"COPY {direction} {verb} {filename!r} on the database server")
    _walk(res, body, scope, ctx)
    _adopt_writes(res, how="the COPY query")
    return res


def _defelem_true(arg: Any) -> bool:
    """The value of a boolean option: absent means true; anything unclear counts as true."""
    if type(arg) is not dict:
        return True
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval", False))
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival", 0))
    if "String" in arg:
        return _parse_bool(arg["String"].get("sval", "")) is not False
    return True


def _explain(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    analyze = any(
        o.get("DefElem", {}).get("defname") == "analyze" and _defelem_true(o["DefElem"].get("arg"))
        for o in body.get("options") or ()
    )
    ((kind, inner),) = body["query"].items()
    sub = _classify_node(kind, inner, ctx, scope)
    if analyze:
        if sub.category is Category.READ:
            sub.operation = "EXPLAIN"
        sub.reasons.append("EXPLAIN ANALYZE executes the statement it explains")
        return sub
    res = _Result(
        "EXPLAIN", Category.READ, Risk.LOW, "EXPLAIN without ANALYZE only plans the statement"
    )
    res.tables = sub.tables
    res.functions = sub.functions
    return res


def _prepare(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    name = body.get("name", "")
    ((kind, inner),) = body["query"].items()
    sub = _classify_node(kind, inner, ctx, scope)
    res = _Result(
        "PREPARE",
        sub.category,
        sub.risk,
        f"PREPARE stores a {sub.operation} as {name}; it runs on EXECUTE {name}",
    )
    res.reasons.extend(sub.reasons)
    res.tables, res.targets, res.functions = sub.tables, sub.targets, sub.functions
    res.has_where, res.unbounded, res.destructive = sub.has_where, sub.unbounded, sub.destructive
    res.lexer_unsafe = sub.lexer_unsafe
    res.prepared_name = name
    res.prepared = sub.build(ctx.text)
    return res


def _execute(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    name = body.get("name", "")
    res = _Result(
        "EXECUTE",
        Category.UNKNOWN,
        Risk.MEDIUM,
        f"EXECUTE runs prepared statement {name}; the session must substitute what {name} "
        "was prepared as",
    )
    res.executes = name
    _walk(res, body, scope, ctx)
    return res


def _deallocate(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    return _Result(
        "DEALLOCATE", Category.ADMIN, Risk.LOW, "DEALLOCATE forgets a prepared statement"
    )


_CATEGORY_WEIGHT: Final = {
    Category.TRANSACTION: 0,
    Category.READ: 1,
    Category.WRITE: 2,
    Category.ADMIN: 3,
    Category.DDL: 4,
    Category.DCL: 5,
    Category.UNKNOWN: 6,
}


def _body_category(res: _Result) -> Category:
    if res.opaque:
        return Category.UNKNOWN
    return max(
        (e.category for e in res.effects),
        key=_CATEGORY_WEIGHT.__getitem__,
        default=Category.READ,
    )


def _options(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        de = item.get("DefElem") if type(item) is dict else None
        if de is not None:
            out[de.get("defname", "")] = de.get("arg")
    return out


def _opaque_language(res: _Result, language: str, what: str) -> None:
    if language in _UNTRUSTED_LANGUAGES or language.endswith("u"):
        res.flag(
            Risk.CRITICAL,
            f"the {what} is written in {language}, which can run any code on the database "
            "server and cannot be inspected",
        )
    else:
        res.flag(Risk.HIGH, f"the {what} is written in {language}, which Backstop cannot inspect")
    res.opaque = True


def _dollar_quote(body: str) -> str:
    """Wrap a DO body in a dollar quote whose tag cannot end early inside the body."""
    n = 0
    while True:
        tag = f"$backstop{n}$"
        if (body + tag).find(tag) == len(body):
            return f"{tag}{body}{tag}"
        n += 1


def _do(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res = _Result("DO", Category.READ, Risk.MEDIUM, "DO runs an anonymous code block")
    options = _options(body.get("args"))
    language_arg = options.get("language")
    language = "plpgsql"
    if type(language_arg) is dict and "String" in language_arg:
        language = language_arg["String"].get("sval", "").lower()
    code_arg = options.get("as")
    code = code_arg.get("String", {}).get("sval", "") if type(code_arg) is dict else ""
    if language == "plpgsql":
        wrapped = (
            "CREATE FUNCTION __backstop_do() RETURNS void LANGUAGE plpgsql AS "
            + _dollar_quote(code)
        )
        _absorb_plpgsql(res, wrapped, "DO block", ctx)
    else:
        _opaque_language(res, language, "DO block")
    res.category = _body_category(res)
    return res


def _create_function(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    noun = "PROCEDURE" if body.get("is_procedure") else "FUNCTION"
    name = ".".join(_name_list(body.get("funcname")))
    res = _Result(
        "CREATE_FUNCTION",
        Category.DDL,
        Risk.MEDIUM,
        f"CREATE {noun} {name} defines code that runs whenever it is called",
    )
    options = _options(body.get("options"))
    language_arg = options.get("language")
    language = "sql"
    if type(language_arg) is dict and "String" in language_arg:
        language = language_arg["String"].get("sval", "").lower()
    what = f"{noun.lower()} body"
    prefix = f"in the {what}: "
    sql_body = body.get("sql_body")
    if sql_body is not None:
        inner = _Result("SELECT", Category.READ, Risk.LOW, "")
        _walk(inner, sql_body, scope, ctx)
        res.absorb(inner, prefix)
    elif language == "plpgsql":
        _absorb_plpgsql(res, ctx.text, what, ctx)
    elif language == "sql":
        source = options.get("as")
        for text in _name_list(source.get("List", {}).get("items") if type(source) is dict else ()):
            _absorb_text(res, text, ctx, prefix, Risk.CRITICAL)
    else:
        _opaque_language(res, language, what)
    _walk(res, {k: v for k, v in body.items() if k != "sql_body"}, scope, ctx)
    return res


def _call(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    call = body.get("funccall", {})
    name = ".".join(_name_list(call.get("funcname"))) or "a procedure"
    res = _Result(
        "CALL",
        Category.UNKNOWN,
        Risk.MEDIUM,
        f"CALL runs procedure {name}, whose body Backstop does not see here",
    )
    _walk(res, body, scope, ctx)
    return res


def _create_schema(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    schema = body.get("schemaname") or ctx.schema
    res = _Result(
        "CREATE_SCHEMA", Category.DDL, Risk.MEDIUM, f"CREATE SCHEMA creates schema {schema}"
    )
    # Objects created inside CREATE SCHEMA land in the new schema.
    _walk(res, body, scope, _Context(schema, ctx.text, ctx.depth))
    return res


def _create_table_as(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    if body.get("objtype") == "OBJECT_MATVIEW":
        res = _Result(
            "CREATE_MATERIALIZED_VIEW",
            Category.DDL,
            Risk.MEDIUM,
            "CREATE MATERIALIZED VIEW stores a query's result",
        )
    else:
        res = _Result(
            "CREATE_TABLE", Category.DDL, Risk.MEDIUM, "CREATE TABLE AS creates a new table"
        )
    _walk(res, body, scope, ctx)
    return res


def _create_extension(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    name = body.get("extname", "?")
    res = _Result(
        "CREATE_EXTENSION",
        Category.DDL,
        Risk.HIGH,
        f"CREATE EXTENSION {name} runs the extension's install script and adds its functions",
    )
    _walk(res, body, scope, ctx)
    return res


def _vacuum(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    options = _options(body.get("options"))
    if body.get("is_vacuumcmd"):
        if "full" in options and _defelem_true(options["full"]):
            res = _Result(
                "VACUUM",
                Category.ADMIN,
                Risk.MEDIUM,
                "VACUUM FULL rewrites the table and blocks all access to it while it runs",
            )
        else:
            res = _Result(
                "VACUUM", Category.ADMIN, Risk.LOW, "VACUUM reclaims space in the background"
            )
    else:
        res = _Result("ANALYZE", Category.ADMIN, Risk.LOW, "ANALYZE updates planner statistics")
    _walk(res, body, scope, ctx)
    return res


def _refresh(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    if body.get("concurrent"):
        res = _Result(
            "REFRESH_MATERIALIZED_VIEW",
            Category.WRITE,
            Risk.LOW,
            "REFRESH MATERIALIZED VIEW CONCURRENTLY recomputes the view without blocking readers",
        )
    else:
        res = _Result(
            "REFRESH_MATERIALIZED_VIEW",
            Category.WRITE,
            Risk.MEDIUM,
            "REFRESH MATERIALIZED VIEW recomputes the view and blocks readers while it runs",
        )
    rv = body.get("relation")
    if rv is not None:
        res.target(_qualify(rv, ctx), rv.get("location", 0))
    _walk(res, body, scope, ctx)
    return res


def _lock(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    res = _Result(
        "LOCK",
        Category.ADMIN,
        Risk.MEDIUM,
        "LOCK TABLE blocks other sessions until the transaction ends",
    )
    if body.get("mode") == 8:
        res.reasons.append("ACCESS EXCLUSIVE mode blocks even reads")
    _walk(res, body, scope, ctx)
    return res


def _fetch(body: dict[str, Any], ctx: _Context, scope: frozenset[str]) -> _Result:
    if body.get("ismove"):
        return _Result("MOVE", Category.READ, Risk.LOW, "MOVE repositions a cursor")
    return _Result("FETCH", Category.READ, Risk.LOW, "FETCH reads rows from a cursor")


_HANDLERS: Final[dict[str, _Handler]] = {
    "SelectStmt": _select,
    "InsertStmt": _insert,
    "UpdateStmt": _update,
    "DeleteStmt": _delete,
    "MergeStmt": _merge,
    "TruncateStmt": _truncate,
    "DropStmt": _drop,
    "DropdbStmt": _dropdb,
    "DropOwnedStmt": _drop_owned,
    "AlterTableStmt": _alter_table,
    "RenameStmt": _rename_like("renameType"),
    "AlterObjectSchemaStmt": _rename_like("objectType"),
    "AlterOwnerStmt": _rename_like("objectType"),
    "GrantStmt": _grant,
    "VariableSetStmt": _variable_set,
    "AlterRoleSetStmt": _role_set,
    "TransactionStmt": _transaction,
    "CopyStmt": _copy,
    "ExplainStmt": _explain,
    "PrepareStmt": _prepare,
    "ExecuteStmt": _execute,
    "DeallocateStmt": _deallocate,
    "DoStmt": _do,
    "CreateFunctionStmt": _create_function,
    "CallStmt": _call,
    "CreateSchemaStmt": _create_schema,
    "CreateTableAsStmt": _create_table_as,
    "CreateExtensionStmt": _create_extension,
    "VacuumStmt": _vacuum,
    "RefreshMatViewStmt": _refresh,
    "LockStmt": _lock,
    "FetchStmt": _fetch,
}

_D, _A, _C, _R, _T = Category.DDL, Category.ADMIN, Category.DCL, Category.READ, Category.TRANSACTION
_L, _M, _H, _X = Risk.LOW, Risk.MEDIUM, Risk.HIGH, Risk.CRITICAL

# Statement types whose classification does not depend on their contents.
# fmt: off
_SIMPLE: Final[dict[str, tuple[str, Category, Risk, str]]] = {
    "VariableShowStmt":
        ("SHOW", _R, _L, "SHOW reads a setting"),
    "CreateStmt":
        ("CREATE_TABLE", _D, _M, "CREATE TABLE creates a table"),
    "CreateForeignTableStmt":
        ("CREATE", _D, _M, "CREATE FOREIGN TABLE maps a remote table"),
    "IndexStmt":
        ("CREATE_INDEX", _D, _M, "CREATE INDEX builds an index, blocking writes"),
    "ViewStmt":
        ("CREATE_VIEW", _D, _M, "CREATE VIEW defines a view"),
    "CreateSeqStmt":
        ("CREATE", _D, _M, "CREATE SEQUENCE creates a sequence"),
    "CreateTrigStmt":
        ("CREATE_TRIGGER", _D, _M, "CREATE TRIGGER runs a function on other statements' writes"),
    "RuleStmt":
        ("CREATE_RULE", _D, _H, "CREATE RULE rewrites other statements that touch the table"),
    "CreateEventTrigStmt":
        ("CREATE", _D, _H, "CREATE EVENT TRIGGER runs a function on every matching DDL statement"),
    "CreatePLangStmt":
        ("CREATE", _D, _H, "CREATE LANGUAGE adds a procedural language"),
    "CreateSubscriptionStmt":
        ("CREATE", _D, _H, "CREATE SUBSCRIPTION copies data in from another server"),
    "CreatePolicyStmt":
        ("CREATE_POLICY", _C, _H, "CREATE POLICY changes which rows each role can see or change"),
    "AlterPolicyStmt":
        ("ALTER_POLICY", _C, _H, "ALTER POLICY changes which rows each role can see or change"),
    "CreatedbStmt":
        ("CREATE_DATABASE", _D, _M, "CREATE DATABASE creates a database"),
    "CreateTableSpaceStmt":
        ("CREATE", _D, _M, "CREATE TABLESPACE adds a storage location"),
    "CreateRoleStmt":
        ("CREATE_ROLE", _C, _H, "CREATE ROLE adds a role that can be given privileges"),
    "AlterRoleStmt":
        ("ALTER_ROLE", _C, _H, "ALTER ROLE changes a role's attributes"),
    "DropRoleStmt":
        ("DROP_ROLE", _C, _H, "DROP ROLE removes a role"),
    "GrantRoleStmt":
        ("GRANT", _C, _H, "GRANT/REVOKE of a role changes who has its privileges"),
    "AlterDefaultPrivilegesStmt":
        ("ALTER_DEFAULT_PRIVILEGES", _C, _H, "ALTER DEFAULT PRIVILEGES changes future grants"),
    "ReassignOwnedStmt":
        ("REASSIGN_OWNED", _C, _H, "REASSIGN OWNED hands every object of a role to another"),
    "AlterSystemStmt":
        ("ALTER_SYSTEM", _A, _X, "ALTER SYSTEM rewrites the server configuration"),
    "AlterDatabaseSetStmt":
        ("ALTER_DATABASE", _D, _M, "ALTER DATABASE ... SET changes defaults for every new session"),
    "AlterDatabaseStmt":
        ("ALTER_DATABASE", _D, _M, "ALTER DATABASE changes a database"),
    "AlterDatabaseRefreshCollStmt":
        ("ALTER_DATABASE", _D, _M, "ALTER DATABASE changes a database"),
    "AlterExtensionStmt":
        ("ALTER_EXTENSION", _D, _H, "ALTER EXTENSION runs the extension's update script"),
    "AlterExtensionContentsStmt":
        ("ALTER_EXTENSION", _D, _M, "ALTER EXTENSION changes what the extension owns"),
    "AlterEventTrigStmt":
        ("ALTER", _D, _H, "ALTER EVENT TRIGGER changes what runs on DDL"),
    "AlterTableMoveAllStmt":
        ("ALTER_TABLE", _D, _M, "ALTER TABLE ALL IN TABLESPACE moves tables"),
    "DropTableSpaceStmt":
        ("DROP_OTHER", _D, _H, "DROP TABLESPACE removes a storage location"),
    "DropSubscriptionStmt":
        ("DROP_OTHER", _D, _H, "DROP SUBSCRIPTION stops and removes a subscription"),
    "DropUserMappingStmt":
        ("DROP_OTHER", _D, _H, "DROP USER MAPPING removes remote credentials"),
    "ListenStmt":
        ("LISTEN", _A, _L, "LISTEN subscribes the session to notifications"),
    "UnlistenStmt":
        ("UNLISTEN", _A, _L, "UNLISTEN stops listening for notifications"),
    "NotifyStmt":
        ("NOTIFY", _A, _L, "NOTIFY sends a notification"),
    "DiscardStmt":
        ("DISCARD", _A, _L, "DISCARD resets session state"),
    "CheckPointStmt":
        ("CHECKPOINT", _A, _M, "CHECKPOINT forces a checkpoint, which costs I/O"),
    "ClusterStmt":
        ("CLUSTER", _A, _M, "CLUSTER rewrites the table and blocks all access while it runs"),
    "ReindexStmt":
        ("REINDEX", _A, _M, "REINDEX rebuilds indexes and blocks writes while it runs"),
    "LoadStmt":
        ("LOAD", _A, _X, "LOAD loads a shared library into the server process"),
    "DeclareCursorStmt":
        ("DECLARE", _R, _L, "DECLARE opens a cursor over a query"),
    "ClosePortalStmt":
        ("CLOSE", _R, _L, "CLOSE closes a cursor"),
    "ConstraintsSetStmt":
        ("SET_CONSTRAINTS", _T, _L, "SET CONSTRAINTS changes when constraints are checked"),
    "CommentStmt":
        ("COMMENT", _D, _L, "COMMENT ON changes an object's description"),
    "SecLabelStmt":
        ("SECURITY_LABEL", _D, _M, "SECURITY LABEL changes an object's security label"),
    "ImportForeignSchemaStmt":
        ("CREATE", _D, _M, "IMPORT FOREIGN SCHEMA creates foreign tables"),
    "CreateUserMappingStmt":
        ("CREATE", _D, _M, "CREATE USER MAPPING stores remote credentials"),
    "AlterUserMappingStmt":
        ("ALTER", _D, _M, "ALTER USER MAPPING changes remote credentials"),
}
# fmt: on
for _kind in (
    "CompositeTypeStmt",
    "CreateEnumStmt",
    "CreateRangeStmt",
    "CreateDomainStmt",
    "DefineStmt",
    "CreateStatsStmt",
    "CreateAmStmt",
    "CreateCastStmt",
    "CreateConversionStmt",
    "CreateOpClassStmt",
    "CreateOpFamilyStmt",
    "CreateTransformStmt",
    "CreateFdwStmt",
    "CreateForeignServerStmt",
    "CreatePublicationStmt",
):
    _SIMPLE[_kind] = ("CREATE", _D, _M, "CREATE defines a new database object")
for _kind in (
    "AlterCollationStmt",
    "AlterDomainStmt",
    "AlterEnumStmt",
    "AlterFdwStmt",
    "AlterForeignServerStmt",
    "AlterFunctionStmt",
    "AlterObjectDependsStmt",
    "AlterOpFamilyStmt",
    "AlterOperatorStmt",
    "AlterPublicationStmt",
    "AlterSeqStmt",
    "AlterStatsStmt",
    "AlterSubscriptionStmt",
    "AlterTSConfigurationStmt",
    "AlterTSDictionaryStmt",
    "AlterTableSpaceOptionsStmt",
    "AlterTypeStmt",
):
    _SIMPLE[_kind] = ("ALTER", _D, _M, "ALTER changes the definition of a database object")

# What the walk does under each key of the JSON tree; a key not listed is descended into.
_SKIP: Final = "skip"  # leaves: no table, call or statement can be inside
_RANGE_VAR: Final = "RangeVar"  # keys whose value may be a RangeVar (a table reference)
_CALL: Final = "FuncCall"
_QUERY: Final = "SelectStmt"  # a query body that may carry a WITH clause
_HOOKS: Final[dict[str, str]] = {
    kind: kind for kind in (*_HANDLERS, *_SIMPLE) if kind != "SelectStmt"
}
_HOOKS["setstmt"] = "VariableSetStmt"
_HOOKS.update(dict.fromkeys(("FuncCall", "funccall"), _CALL))
_HOOKS.update(dict.fromkeys(("SelectStmt", "larg", "rarg"), _QUERY))
# Every field pglast types as RangeVar*, plus the RangeVar node itself, except the name of a
# composite type (CompositeTypeStmt.typevar), which is no table.
_RANGE_VAR_KEYS: Final = (
    "RangeVar",
    "relation",
    "rel",
    "view",
    "sequence",
    "table",
    "pktable",
    "identitySequence",
    "constrrel",
    "name",
)
_HOOKS.update(dict.fromkeys(_RANGE_VAR_KEYS, _RANGE_VAR))
_LEAF_KEYS: Final = (
    "A_Const",
    "ColumnRef",
    "String",
    "Integer",
    "Float",
    "Boolean",
    "BitString",
    "A_Star",
    "ParamRef",
    "TypeName",
    "typeName",
    "argType",
    "returnType",
    "Alias",
    "alias",
    "RoleSpec",
    "role",
    "newowner",
    "AccessPriv",
    "SQLValueFunction",
)
_HOOKS.update(dict.fromkeys(_LEAF_KEYS, _SKIP))


def _classify_node(
    kind: str, body: dict[str, Any], ctx: _Context, scope: frozenset[str]
) -> _Result:
    handler = _HANDLERS.get(kind)
    if handler is not None:
        return handler(body, ctx, scope)
    simple = _SIMPLE.get(kind)
    if simple is None:
        res = _Result(
            "OTHER", Category.UNKNOWN, Risk.HIGH, f"statement type {kind} is not known to Backstop"
        )
    else:
        res = _Result(*simple)
    _walk(res, body, scope, ctx)
    return res


# --------------------------------------------------------------------------------------
# SQL embedded in strings: function bodies, DO blocks, query_to_xml() arguments.


def _statements(sql: str, stmts: list[Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(type, body, own text) per statement; locations are byte offsets into UTF-8."""
    if len(stmts) == 1 and "stmt_len" not in stmts[0]:
        ((kind, body),) = stmts[0]["stmt"].items()
        start = stmts[0].get("stmt_location", 0)
        if not start:
            return [(kind, body, sql.strip())]
    out: list[tuple[str, dict[str, Any], str]] = []
    data = None if sql.isascii() else sql.encode("utf-8")
    for stmt in stmts:
        start = stmt.get("stmt_location", 0)
        end = start + stmt["stmt_len"] if "stmt_len" in stmt else None
        own = sql[start:end] if data is None else data[start:end].decode("utf-8", "replace")
        ((kind, body),) = stmt["stmt"].items()
        out.append((kind, body, own.strip()))
    return out


def _absorb_text(
    res: _Result,
    text: str,
    ctx: _Context,
    prefix: str,
    on_error: Risk | None,
    effect: bool = True,
) -> None:
    """Classify SQL found in a string and merge it; on_error None ignores text that is not SQL."""
    if ctx.depth >= _MAX_DEPTH:
        res.flag(Risk.CRITICAL, f"{prefix}SQL nested too deeply for Backstop to follow")
        return
    try:
        stmts = _loads(parse_sql_json(text))["stmts"]
    except (ParseError, ValueError) as exc:
        if on_error is not None:
            res.flag(on_error, f"{prefix}SQL that could not be parsed: {exc}")
        return
    for kind, body, own in _statements(text, stmts):
        sub = _classify_node(kind, body, _Context(ctx.schema, own, ctx.depth + 1), _NO_SCOPE)
        res.absorb(sub, prefix, effect)


_DYNAMIC_SQL: Final = frozenset({"PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors", "dynquery"})


def _absorb_plpgsql(res: _Result, source: str, what: str, ctx: _Context) -> None:
    """Parse a plpgsql function (CREATE FUNCTION text) and classify the SQL inside it."""
    prefix = f"in the {what}: "
    if ctx.depth >= _MAX_DEPTH:
        res.flag(Risk.CRITICAL, f"{prefix}code nested too deeply for Backstop to follow")
        return
    try:
        tree = _loads(parse_plpgsql_json(source))
    except (ParseError, ValueError) as exc:
        res.flag(Risk.CRITICAL, f"the {what} could not be parsed: {exc}")
        return
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if type(node) is list:
            stack.extend(node)
            continue
        if type(node) is not dict:
            continue
        for key, value in node.items():
            if key == "PLpgSQL_expr":
                _absorb_text(res, _plpgsql_expr_sql(value), ctx, prefix, Risk.CRITICAL)
                continue
            if key in _DYNAMIC_SQL:
                res.opaque = True
                res.flag(
                    Risk.HIGH,
                    f"{prefix}EXECUTE of a string runs dynamic SQL that Backstop cannot see",
                )
                expr = value if key == "dynquery" else value.get("query", {})
                literal = _string_literal(expr.get("PLpgSQL_expr", {}).get("query", ""))
                if literal is not None:
                    _absorb_text(res, literal, ctx, f"{prefix}the EXECUTEd string: ", None)
            if type(value) is dict or type(value) is list:
                stack.append(value)


def _plpgsql_expr_sql(expr: dict[str, Any]) -> str:
    """SQL for an embedded plpgsql expression, per its raw parse mode."""
    query: str = expr.get("query", "")
    mode = expr.get("parseMode", 0)
    if mode == 0:  # a whole statement
        return query
    if mode >= 3:  # an assignment "target := expression": keep the expression
        query = query[_assignment_end(query) :]
    return "SELECT " + query


def _assignment_end(assignment: str) -> int:
    """Where the expression of `target := expression` (or `target = expression`) starts."""
    depth = 0
    try:
        tokens = scan(assignment)  # character offsets, end inclusive
    except ParseError:
        return 0  # left whole, it will not parse, and that fails closed
    for token in tokens:
        if token.name in ("ASCII_40", "ASCII_91"):  # ( [
            depth += 1
        elif token.name in ("ASCII_41", "ASCII_93"):  # ) ]
            depth -= 1
        elif depth == 0 and token.name in ("COLON_EQUALS", "ASCII_61"):  # := =
            return int(token.end) + 1
    return 0


def _string_literal(expression: str) -> str | None:
    """The text of an expression that is a single string literal, else None."""
    try:
        stmts = _loads(parse_sql_json("SELECT " + expression))["stmts"]
    except (ParseError, ValueError):
        return None
    if len(stmts) != 1:
        return None
    select = stmts[0]["stmt"].get("SelectStmt", {})
    targets = select.get("targetList") or []
    if len(targets) != 1 or "fromClause" in select:
        return None
    value = _const(targets[0].get("ResTarget", {}).get("val"))
    return value if type(value) is str else None


# --------------------------------------------------------------------------------------
# Entry points.


_SCHEMA_OF_PATH: dict[tuple[str, ...], str] = {}


def _default_schema(search_path: tuple[str, ...]) -> str:
    """The schema an unqualified name resolves to: the first search_path entry but $user."""
    schema = _SCHEMA_OF_PATH.get(search_path)
    if schema is not None:
        return schema
    schema = ""
    for entry in search_path:
        name = entry.strip()
        if len(name) >= 2 and name[0] == '"' and name[-1] == '"':
            name = name[1:-1].replace('""', '"')
        if name and name != "$user":
            schema = name
            break
    if len(_SCHEMA_OF_PATH) < 1024:
        _SCHEMA_OF_PATH[search_path] = schema
    return schema


def _failure(sql: str, reason: str) -> Classification:
    return Classification(
        sql=sql,
        operation="UNPARSEABLE",
        category=Category.UNKNOWN,
        risk=Risk.CRITICAL,
        reasons=(reason,),
    )


def _classify_uncached(
    sql: str, search_path: tuple[str, ...], kinds: list[str] | None = None
) -> tuple[Classification, ...]:
    """Classify `sql`; the statement types are appended to `kinds` when it is given."""
    if "\x00" in sql:
        return (_failure(sql, "could not be parsed: the text contains a NUL character"),)
    try:
        raw = parse_sql_json(sql)
    except ParseError as exc:
        return (_failure(sql, f"could not be parsed: {exc}"),)
    except ValueError as exc:  # text that is not valid UTF-8 (lone surrogates)
        return (_failure(sql, f"could not be parsed: {exc}"),)
    try:
        statements = _statements(sql, _loads(raw)["stmts"])
    except Exception as exc:
        return (_failure(sql, f"classifier error: {exc!r}"),)
    ctx = _Context(_default_schema(search_path), sql, 0)
    out: list[Classification] = []
    if kinds is not None:
        kinds.extend(kind for kind, _, _ in statements)
    for kind, body, text in statements:
        try:
            ctx.text = text
            res = _classify_node(kind, body, ctx, _NO_SCOPE)
            out.append(res.build(text))
            if kind == "VariableSetStmt" and body.get("name") == "search_path":
                # Later statements in the same string resolve names through the new path.
                if body.get("kind") == "VAR_SET_VALUE":
                    values = tuple(_set_value(a) for a in body.get("args") or ())
                    ctx.schema = _default_schema(values)
                else:
                    ctx.schema = _default_schema(search_path)
        except Exception as exc:
            out.append(_failure(text, f"classifier error: {exc!r}"))
    return tuple(out)


class _Unset:
    pass


_UNSET: Final = _Unset()

# Statement types whose classification may be shared by every statement of the same form
# (same text once each literal is replaced by a placeholder), when no literal's value was
# used to classify it. Utility statements are left out: some of their options are strings
# that the classifier reads without going through a literal.
_FORM_KINDS: Final = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt"})

# How a lone statement's own text (Classification.sql) is cut from the string it came in.
_STRIP, _STRIP_SEMICOLON = 1, 2


def _own_text(sql: str, rule: int) -> str:
    text = sql.strip()
    return text if rule == _STRIP else text[:-1].rstrip()


def _own_text_rule(sql: str, own: str) -> int | None:
    text = sql.strip()
    if own == text:
        return _STRIP
    if text.endswith(";") and own == text[:-1].rstrip():
        return _STRIP_SEMICOLON
    return None


class Classifier:
    """Classifies SQL text, caching by (sql, search_path) and by form.

    A statement seen before costs one dict lookup. Clients of the simple protocol send the
    same statement again and again with other literals in it (`... WHERE id = 42`); for a
    SELECT, INSERT, UPDATE or DELETE whose classification did not depend on any literal's
    value, the classification is also kept under the statement's form (`literal_form`:
    every literal replaced by a marker, in one pass over the text), and a
    statement of the same form gets a copy of it with its own text. A literal whose value
    decides something (`WHERE 1 = 1`, `set_config('role', ...)`, `x LIKE '%'`) keeps its
    statement out of the form cache, so such statements are always classified themselves.

    The caches are plain dicts that drop their oldest entry when full. They take no locks:
    the gateway uses them from one event loop, and under the GIL a dict stays consistent if
    threads share it anyway.
    """

    __slots__ = ("_cache", "_cache_size", "_forms")

    def __init__(self, cache_size: int = 20000) -> None:
        self._cache: dict[tuple[str, tuple[str, ...]], tuple[Classification, ...]] = {}
        self._forms: dict[tuple[str, tuple[str, ...]], tuple[Classification, int]] = {}
        self._cache_size = max(0, cache_size)

    def classify(
        self,
        sql: str,
        search_path: Sequence[str] = ("public",),
        *,
        form: str | _Unset | None = _UNSET,
    ) -> tuple[Classification, ...]:
        """One Classification per statement in sql; () for text with no statement.

        Cached by (sql, search_path): a statement seen before costs a dict lookup, no parse.
        `form` is `self.form(sql)` when the caller has it already.
        Never raises: whatever goes wrong comes back as a CRITICAL classification.
        """
        path = search_path if isinstance(search_path, tuple) else tuple(search_path)
        key = (sql, path)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if not self._cache_size:
            return self._classify(sql, path, None)
        if isinstance(form, _Unset):
            form = self.form(sql)
        if form is not None:
            shared = self._forms.get((form, path))
            if shared is not None:
                template, rule = shared
                return (_with_sql(template, _own_text(sql, rule)),)
        result = self._classify(sql, path, form)
        _bounded_put(self._cache, key, result, self._cache_size)
        return result

    def _classify(
        self, sql: str, search_path: tuple[str, ...], form: str | None
    ) -> tuple[Classification, ...]:
        kinds: list[str] = []
        before = next(_LITERAL_READS)
        try:
            result = _classify_uncached(sql, search_path, kinds)
        except Exception as exc:  # never let a classifier bug become an allowed statement
            return (_failure(sql, f"classifier error: {exc!r}"),)
        if (
            form is not None
            and next(_LITERAL_READS) == before + 1  # no literal's value was used
            and len(result) == len(kinds) == 1
            and kinds[0] in _FORM_KINDS
            and result[0].operation != "UNPARSEABLE"
        ):
            rule = _own_text_rule(sql, result[0].sql)
            if rule is not None:
                _bounded_put(self._forms, (form, search_path), (result[0], rule), self._cache_size)
        return result

    def form(self, sql: str) -> str | None:
        """`sql` with every literal replaced by a marker (None when it has none, or when
        `literal_form` leaves it alone): statements of one form whose classification
        `shares` it classify alike whatever their literals."""
        return statement_form(sql)

    def shares(self, form: str, search_path: tuple[str, ...] = ("public",)) -> bool:
        """Whether every statement of `form` classifies alike (as far as this classifier has
        seen one of them and found that no literal's value mattered)."""
        return (form, search_path) in self._forms

    def clear_cache(self) -> None:
        self._cache.clear()
        self._forms.clear()

    def __len__(self) -> int:
        return len(self._cache)


_DEFAULT_CLASSIFIER: Final = Classifier()


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    if len(cache) >= limit:
        # Another thread may have evicted first; the bound then holds give or take one.
        with suppress(KeyError, RuntimeError, StopIteration):
            del cache[next(iter(cache))]
    cache[key] = value


def classify(sql: str, search_path: tuple[str, ...] = ("public",)) -> tuple[Classification, ...]:
    """Classify with the shared default Classifier (and its cache)."""
    return _DEFAULT_CLASSIFIER.classify(sql, search_path)
