"""Checks on a restored side table, each with its numbers, before any copy-back is offered.

- row count: the side table holds exactly the rows the manifest recorded;
- checksum: recomputed inside PostgreSQL over the side table by the method the manifest
  records (`hash-record-sum64/2`, with each column in the form the manifest records for it,
  or `md5-row-text-sum64/1` for older snapshots and servers before 14), under the
  manifest's output settings, equals the manifest's. A method this Backstop does not know,
  or one the server cannot compute, fails the check and says so. Both come from one scan
  (`restore.count_and_checksum`); when the restore already made it while it built the
  indexes (`check_data`: `RestoreResult.data_check`), that scan of this very table (same
  oid) is reported, and the table is not read again;
- columns and types: names, order, exact types, NOT NULL and generated columns as recorded;
- primary key unique: proven by the primary key the restore built on the side table (the
  build fails on a duplicated or NULL key), or counted when it could not be built;
- constraints and indexes: every one the snapshot recorded was rebuilt;
- foreign keys (outgoing): rows of the restored data that reference keys missing from the
  tables they point at (the live tables, or the other side tables of a group restore);
- foreign keys (incoming): rows of other tables that reference keys of the live table that
  neither the restored data nor the live table (which copy-back never deletes from) holds.

Any failed check means no copy-back SQL, and the side table is kept for inspection.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from backstop_core.recovery.restore import DataCheck, RestoreResult, count_and_checksum
from backstop_core.sidecar.pgtypes import qualified, quote_ident, set_local_sql
from backstop_core.sidecar.snapshot import ConstraintDef

__all__ = [
    "ForeignKey",
    "ValidationCheck",
    "ValidationReport",
    "fetch_one",
    "iter_checks",
    "live_table_exists",
    "parse_foreign_key",
    "plural",
    "split_identifier_path",
    "validate_restore",
]

_EXAMPLES = 3


def plural(count: int, word: str, words: str | None = None) -> str:
    """`1 row`, `2,000 rows`."""
    return f"{count:,} {word if count == 1 else (words or word + 's')}"


async def fetch_one(conn: asyncpg.Connection, sql: str, *args: Any) -> asyncpg.Record:
    """The first row of a query that scans a whole table. Not `fetchrow`: asyncpg asks for
    one row at a time there, and PostgreSQL plans a query it may have to suspend without
    parallel workers; a full scan wants them."""
    rows = await conn.fetch(sql, *args)
    return rows[0]


@dataclass(frozen=True, slots=True)
class ValidationCheck:
    name: str
    passed: bool
    detail: str
    expected: Any = None
    actual: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "expected": self.expected,
            "actual": self.actual,
        }


@dataclass(frozen=True, slots=True)
class ValidationReport:
    table: str
    side_table: str
    checks: tuple[ValidationCheck, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> tuple[ValidationCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "side_table": self.side_table,
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "checks": [c.as_dict() for c in self.checks],
        }


async def validate_restore(
    conn: asyncpg.Connection,
    result: RestoreResult,
    *,
    foreign_keys: bool = True,
    siblings: Mapping[str, RestoreResult] | None = None,
) -> ValidationReport:
    """Run every check on the side table of `result` (see the module's docstring).
    `siblings` are the other tables of a group restore (by schema.table), whose side
    tables stand in for them in the foreign key checks."""
    started = time.perf_counter()
    checks = [
        c async for c in iter_checks(conn, result, foreign_keys=foreign_keys, siblings=siblings)
    ]
    return ValidationReport(
        result.table, result.restored_table, tuple(checks), time.perf_counter() - started
    )


async def iter_checks(
    conn: asyncpg.Connection,
    result: RestoreResult,
    *,
    foreign_keys: bool = True,
    siblings: Mapping[str, RestoreResult] | None = None,
) -> AsyncIterator[ValidationCheck]:
    """The checks one by one, as each finishes (the TUI shows them as they come)."""
    for check in await _count_and_checksum(conn, result):
        yield check
    yield await _columns(conn, result)
    yield await _primary_key(conn, result)
    yield _rebuilt(result)
    if foreign_keys:
        yield await _outgoing(conn, result, siblings or {})
        yield await _incoming(conn, result)


# --------------------------------------------------------------------------- count, checksum


async def _count_and_checksum(
    conn: asyncpg.Connection, result: RestoreResult
) -> list[ValidationCheck]:
    source = result.source
    method = result.manifest.checksum_method
    data = result.data_check
    early = data is not None and await _same_table(conn, data, result)
    if data is None or not early:
        data = await count_and_checksum(conn, result.manifest, source, result.schema, result.name)
    when = " while the restore built the indexes" if early else ""
    count_check = ValidationCheck(
        "row count",
        data.rows == source.rows,
        f"{data.rows:,} rows restored, the snapshot recorded {source.rows:,}",
        source.rows,
        data.rows,
    )
    if data.checksum is None:
        checksum_check = ValidationCheck(
            "checksum",
            False,
            f"cannot recompute the snapshot's checksum: {data.problem}",
            source.checksum,
            None,
        )
    else:
        same = data.checksum == source.checksum
        checksum_check = ValidationCheck(
            "checksum",
            same,
            f"{data.checksum} ({method}) computed in PostgreSQL over the side table{when}"
            + (" equals the manifest's" if same else f"; the manifest says {source.checksum}"),
            source.checksum,
            data.checksum,
        )
    return [count_check, checksum_check]


async def _same_table(conn: asyncpg.Connection, data: DataCheck, result: RestoreResult) -> bool:
    """Whether `data` was read from the side table `result` names, as it is now (not one
    dropped and created again under that name since)."""
    if data.table != result.qualified:
        return False
    relation = await conn.fetchval("SELECT to_regclass($1)::oid", result.qualified)
    return relation is not None and int(relation) == data.relation


# --------------------------------------------------------------------------- columns


_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attgenerated::text
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


async def _columns(conn: asyncpg.Connection, result: RestoreResult) -> ValidationCheck:
    async with conn.transaction(readonly=True):
        # Types print schema-qualified, as the manifest recorded them.
        await conn.execute(set_local_sql(result.manifest.text_settings))
        rows = await conn.fetch(_COLUMNS_SQL, result.qualified)
    actual = [(r[0], r[1], bool(r[2]), r[3] == "s") for r in rows]
    expected = [
        (c.name, c.type, c.not_null, c.generated is not None) for c in result.source.columns
    ]
    problems: list[str] = []
    names = [a[0] for a in actual]
    wanted = [e[0] for e in expected]
    for name in wanted:
        if name not in names:
            problems.append(f"{name} is missing")
    for name in names:
        if name not in wanted:
            problems.append(f"{name} is not in the snapshot")
    if not problems and names != wanted:
        problems.append("the column order differs")
    by_name = {a[0]: a for a in actual}
    for name, type_, not_null, generated in expected:
        got = by_name.get(name)
        if got is None:
            continue
        if got[1] != type_:
            problems.append(f"{name} is {got[1]}, the snapshot has {type_}")
        if got[2] != not_null:
            state = "NOT NULL" if got[2] else "nullable"
            problems.append(f"{name} is {state}, unlike the snapshot")
        if got[3] != generated:
            problems.append(f"{name} differs in being generated")
    detail = (
        f"{len(expected)} columns with the recorded names, order and types"
        if not problems
        else "; ".join(problems)
    )
    return ValidationCheck(
        "columns and types",
        not problems,
        detail,
        [f"{e[0]} {e[1]}" for e in expected],
        [f"{a[0]} {a[1]}" for a in actual],
    )


# --------------------------------------------------------------------------- primary key


async def _primary_key(conn: asyncpg.Connection, result: RestoreResult) -> ValidationCheck:
    pk = result.source.primary_key
    if pk is None or not pk.columns:
        return ValidationCheck(
            "primary key unique",
            True,
            "the table has no primary key in the snapshot: nothing to check (copy-back"
            " compares whole rows)",
        )
    columns = ", ".join(quote_ident(c) for c in pk.columns)
    built = await conn.fetchval(
        "SELECT count(*) FROM pg_catalog.pg_constraint WHERE conrelid = $1::regclass"
        " AND contype = 'p'",
        result.qualified,
    )
    if built:
        return ValidationCheck(
            "primary key unique",
            True,
            f"({', '.join(pk.columns)}) unique over {result.rows:,} rows: proven by building"
            " the primary key on the side table (the build fails on a duplicated or NULL"
            " key), which enforces it",
            0,
            0,
        )
    duplicates = (
        await fetch_one(
            conn,
            f"SELECT count(*) FROM (SELECT 1 FROM {result.qualified}"
            f" GROUP BY {columns} HAVING count(*) > 1) d",
        )
    )[0]
    nulls = (
        await fetch_one(
            conn,
            f"SELECT count(*) FROM {result.qualified} WHERE "
            + " OR ".join(f"{quote_ident(c)} IS NULL" for c in pk.columns),
        )
    )[0]
    examples = await conn.fetch(
        f"SELECT ROW({columns})::text AS k, count(*) AS n FROM {result.qualified}"
        f" GROUP BY {columns} HAVING count(*) > 1 ORDER BY 1 LIMIT {_EXAMPLES}"
    )
    shown = ", ".join(f"({', '.join(pk.columns)})={r['k']} x{r['n']}" for r in examples)
    return ValidationCheck(
        "primary key unique",
        duplicates == 0 and nulls == 0,
        f"{duplicates:,} duplicated keys and {nulls:,} NULL keys in ({', '.join(pk.columns)})"
        + (f", e.g. {shown}" if shown else ""),
        0,
        int(duplicates) + int(nulls),
    )


def _rebuilt(result: RestoreResult) -> ValidationCheck:
    source = result.source
    wanted = [c for c in source.constraints if c.type != "foreign_key"]
    indexes = [i for i in source.indexes if i.constraint is None]
    if result.skipped:
        return ValidationCheck(
            "constraints and indexes",
            False,
            f"{len(result.skipped)} could not be rebuilt: " + "; ".join(result.skipped),
            len(wanted) + len(indexes),
            len(wanted) + len(indexes) - len(result.skipped),
        )
    return ValidationCheck(
        "constraints and indexes",
        True,
        f"{plural(len(wanted), 'constraint')} and {plural(len(indexes), 'index', 'indexes')}"
        " rebuilt",
        len(wanted) + len(indexes),
        len(wanted) + len(indexes),
    )


# --------------------------------------------------------------------------- foreign keys

_IDENT = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([A-Za-z_\x80-\U0010ffff][\w$\x80-\U0010ffff]*))')


def split_identifier_path(text: str) -> tuple[list[str], str]:
    """`schema."Table"(...)` -> (["schema", "Table"], "(...)"): the dotted identifiers at
    the start of `text`, unquoted, and what follows them."""
    parts: list[str] = []
    rest = text
    while True:
        found = _IDENT.match(rest)
        if found is None:
            break
        quoted, bare = found.groups()
        parts.append(quoted.replace('""', '"') if quoted is not None else bare)
        rest = rest[found.end() :]
        if rest.startswith("."):
            rest = rest[1:]
            continue
        break
    return parts, rest


def _identifier_list(text: str) -> tuple[list[str], str]:
    """`(a, "B c") rest` -> (["a", "B c"], " rest")."""
    text = text.lstrip()
    if not text.startswith("("):
        raise ValueError(f"expected a column list at {text[:30]!r}")
    text = text[1:]
    names: list[str] = []
    while True:
        parts, text = split_identifier_path(text)
        if len(parts) != 1:
            raise ValueError(f"expected a column name at {text[:30]!r}")
        names.append(parts[0])
        text = text.lstrip()
        if text.startswith(","):
            text = text[1:]
            continue
        if text.startswith(")"):
            return names, text[1:]
        raise ValueError(f"unexpected {text[:30]!r} in a column list")


@dataclass(frozen=True, slots=True)
class ForeignKey:
    name: str
    columns: tuple[str, ...]
    ref_schema: str
    ref_table: str
    ref_columns: tuple[str, ...]
    definition: str
    on_delete_cascade: bool = False

    @property
    def ref_name(self) -> str:
        return f"{self.ref_schema}.{self.ref_table}"


def parse_foreign_key(constraint: ConstraintDef, default_schema: str) -> ForeignKey:
    """A foreign key from its `pg_get_constraintdef()` text:
    `FOREIGN KEY (a, b) REFERENCES schema.table(x, y) [ON DELETE ...] ...`."""
    text = constraint.definition
    if not text.startswith("FOREIGN KEY"):
        raise ValueError(f"not a foreign key: {text[:40]!r}")
    columns, rest = _identifier_list(text[len("FOREIGN KEY") :])
    rest = rest.lstrip()
    if not rest.startswith("REFERENCES"):
        raise ValueError(f"no REFERENCES in {text!r}")
    path, rest = split_identifier_path(rest[len("REFERENCES") :])
    if len(path) == 1:
        path = [default_schema, path[0]]
    if len(path) != 2:
        raise ValueError(f"cannot read the referenced table of {text!r}")
    ref_columns, rest = _identifier_list(rest)
    return ForeignKey(
        name=constraint.name,
        columns=tuple(columns),
        ref_schema=path[0],
        ref_table=path[1],
        ref_columns=tuple(ref_columns),
        definition=text,
        on_delete_cascade="ON DELETE CASCADE" in rest,
    )


async def live_table_exists(conn: asyncpg.Connection, schema: str, table: str) -> bool:
    found = await conn.fetchval(
        "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2"
        " AND c.relkind IN ('r', 'p')",
        schema,
        table,
    )
    return found is not None


def _not_in(sources: Sequence[str], ref_columns: Sequence[str], columns: Sequence[str]) -> str:
    """SQL: row `r`'s key (`columns`) is in none of `sources` (keyed by `ref_columns`)."""
    clauses = []
    for source in sources:
        match = " AND ".join(
            f"t.{quote_ident(rc)} = r.{quote_ident(c)}"
            for rc, c in zip(ref_columns, columns, strict=True)
        )
        clauses.append(f"NOT EXISTS (SELECT 1 FROM {source} t WHERE {match})")
    return " AND ".join(clauses)


async def _orphans(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[str],
    sources: Sequence[str],
    ref_columns: Sequence[str],
) -> tuple[int, list[str]]:
    not_null = " AND ".join(f"r.{quote_ident(c)} IS NOT NULL" for c in columns)
    where = f"{not_null} AND {_not_in(sources, ref_columns, columns)}"
    count = (await fetch_one(conn, f"SELECT count(*) FROM {table} r WHERE {where}"))[0]
    keys = ", ".join(f"r.{quote_ident(c)}" for c in columns)
    examples = await conn.fetch(
        f"SELECT DISTINCT ROW({keys})::text FROM {table} r WHERE {where} LIMIT {_EXAMPLES}"
    )
    return int(count), [e[0] for e in examples]


async def _outgoing(
    conn: asyncpg.Connection, result: RestoreResult, siblings: Mapping[str, RestoreResult]
) -> ValidationCheck:
    source = result.source
    keys = [c for c in source.constraints if c.type == "foreign_key"]
    if not keys:
        return ValidationCheck(
            "foreign keys (outgoing)", True, "the table references no other table", 0, 0
        )
    lines: list[str] = []
    total = 0
    passed = True
    for constraint in keys:
        try:
            fk = parse_foreign_key(constraint, source.schema)
        except ValueError as exc:
            passed = False
            lines.append(f"{constraint.name}: cannot read its definition ({exc})")
            continue
        sources: list[str] = []
        live = await live_table_exists(conn, fk.ref_schema, fk.ref_table)
        if live:
            sources.append(qualified(fk.ref_schema, fk.ref_table))
        if fk.ref_name == source.name:
            sources.append(result.qualified)
        elif fk.ref_name in siblings:
            sources.append(siblings[fk.ref_name].qualified)
        if not sources:
            passed = False
            lines.append(
                f"{fk.name}: references {fk.ref_name}, which does not exist: restore it first"
                " (or restore the group)"
            )
            continue
        count, examples = await _orphans(
            conn, result.qualified, fk.columns, sources, fk.ref_columns
        )
        total += count
        target = fk.ref_name + ("" if live else " (restored)")
        if count:
            passed = False
            shown = ", ".join(examples)
            lines.append(
                f"{fk.name}: {count:,} rows reference ({', '.join(fk.ref_columns)}) keys"
                f" missing from {target}, e.g. {shown}"
            )
        else:
            lines.append(f"{fk.name}: every row's key exists in {target}")
    return ValidationCheck("foreign keys (outgoing)", passed, "; ".join(lines), 0, total)


_INCOMING_SQL = """
SELECT con.conname, cn.nspname, cc.relname, con.confdeltype::text,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
             ORDER BY k.o) AS columns,
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n
             ORDER BY k.o) AS ref_columns
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class cc ON cc.oid = con.conrelid
JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
WHERE con.contype = 'f' AND con.confrelid = $1::regclass AND con.conrelid <> con.confrelid
ORDER BY 2, 3, 1
"""


async def _incoming(conn: asyncpg.Connection, result: RestoreResult) -> ValidationCheck:
    source = result.source
    live = qualified(source.schema, source.table)
    if not await live_table_exists(conn, source.schema, source.table):
        return ValidationCheck(
            "foreign keys (incoming)",
            True,
            f"{source.name} no longer exists: foreign keys of other tables that pointed at it"
            " went with it and are not in its snapshot (a group snapshot restores them with"
            " their own tables)",
            0,
            0,
        )
    rows = await conn.fetch(_INCOMING_SQL, live)
    if not rows:
        return ValidationCheck(
            "foreign keys (incoming)", True, "no other table references it", 0, 0
        )
    lines: list[str] = []
    total = 0
    for name, nsp, rel, deltype, columns, ref_columns in rows:
        child = qualified(nsp, rel)
        orphaned, examples = await _orphans(
            conn, child, columns, [result.qualified, live], ref_columns
        )
        total += orphaned
        newer, _ = await _orphans(conn, child, columns, [result.qualified], ref_columns)
        line = f"{nsp}.{rel}.{name}: "
        if orphaned:
            line += (
                f"{orphaned:,} rows reference keys in neither the restored data nor the live"
                f" table, e.g. {', '.join(examples)}"
            )
        else:
            line += "no row would be orphaned"
        if newer:
            line += f" ({newer:,} reference rows added since the snapshot, which stay)"
        if deltype == "c":
            line += (
                f"; ON DELETE CASCADE: rows of {nsp}.{rel} may have been deleted with"
                f" {source.name}'s rows: restore {nsp}.{rel} too"
            )
        lines.append(line)
    return ValidationCheck("foreign keys (incoming)", total == 0, "; ".join(lines), 0, total)
