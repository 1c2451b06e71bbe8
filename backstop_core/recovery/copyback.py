"""What differs between a validated side table and the live table, and the SQL that puts the
snapshot's rows back.

Cases, decided per table when the SQL is written:

- dropped: the live table is gone. The side table is renamed into its place; its
  constraints, indexes and sequences get their original names back; foreign keys are added
  NOT VALID, then validated (the long check runs without blocking the tables it points at).
- emptied: the live table exists and holds no rows. Every restored row is inserted back
  (a guard stops the transaction if rows arrived since the SQL was written).
- rows: rows were deleted or changed. By primary key: rows missing from the live table are
  re-inserted and changed rows get the snapshot's values back (`UPDATE ... FROM`); rows
  added since the snapshot are left untouched. Without a primary key, rows are compared
  whole, and the ones missing from the live table are inserted back.
- unchanged: nothing to do.

Everything runs in one transaction that first takes `LOCK TABLE ... IN ACCESS EXCLUSIVE
MODE` on the tables involved (the live tables that exist and the side tables), so no one
writes in between. The diff is computed in SQL, comparing rows by their text form under the
snapshot's output settings (exact for every type, including those without an equality
operator, such as json).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from backstop_core.recovery.restore import RestoreResult
from backstop_core.recovery.validate import (
    ForeignKey,
    fetch_one,
    live_table_exists,
    parse_foreign_key,
    plural,
    split_identifier_path,
)
from backstop_core.sidecar.pgtypes import qualified, quote_ident, quote_literal, set_local_sql
from backstop_core.sidecar.snapshot import ColumnDef
from backstop_core.store import AuditStart, StateStore

__all__ = [
    "AppliedCopyBack",
    "CopyBack",
    "DiffSummary",
    "apply_copy_back",
    "build_copy_back",
    "copy_back_path",
    "diff_table",
    "write_copy_back",
]

CASES = ("dropped", "emptied", "rows", "unchanged")
_EXAMPLES = 3
_LOCK_TIMEOUT = "30s"
_VALUE_WIDTH = 40


@dataclass(frozen=True, slots=True)
class DiffSummary:
    """The live table against the side table, by primary key (or whole rows without one)."""

    table: str
    side_table: str
    case: str  # dropped, emptied, rows, unchanged
    restored_rows: int
    live_rows: int | None  # None: the live table does not exist
    only_in_restored: int  # rows the live table lost since the snapshot
    only_in_current: int  # rows added since the snapshot (left alone)
    changed: int  # same key, different values
    unchanged: int
    key: tuple[str, ...]  # primary key columns; () when rows are compared whole
    columns: tuple[str, ...]  # columns compared and copied back
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def sample(self) -> tuple[str, ...]:
        """A few human-readable example lines."""
        lines: list[str] = []
        for kind, label in (
            ("missing", "missing from the live table"),
            ("changed", "changed since the snapshot"),
            ("added", "added since the snapshot (kept)"),
        ):
            lines.extend(f"{label}: {e}" for e in self.examples.get(kind, ()))
        return tuple(lines)

    def describe(self) -> str:
        if self.case == "dropped":
            return f"{self.table} was dropped: all {self.restored_rows:,} rows come back"
        if self.case == "emptied":
            return f"{self.table} is empty: all {self.restored_rows:,} rows come back"
        if self.case == "unchanged":
            return f"{self.table} already holds every row of the snapshot, unchanged"
        text = (
            f"{plural(self.only_in_restored, 'row')} missing from {self.table},"
            f" {self.changed:,} changed, {self.only_in_current:,} added since (kept),"
            f" {self.unchanged:,} unchanged"
        )
        if not self.key:
            text += " (no primary key: whole rows compared; a changed row counts as one"
            text += " missing and one added)"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "side_table": self.side_table,
            "case": self.case,
            "restored_rows": self.restored_rows,
            "live_rows": self.live_rows,
            "only_in_restored": self.only_in_restored,
            "only_in_current": self.only_in_current,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "key": list(self.key),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "notes": list(self.notes),
            "summary": self.describe(),
        }


# --------------------------------------------------------------------------- the diff


async def _live_columns(conn: asyncpg.Connection, schema: str, table: str) -> dict[str, bool]:
    """Live column -> whether it is generated."""
    rows = await conn.fetch(
        "SELECT a.attname, a.attgenerated::text FROM pg_catalog.pg_attribute a"
        " WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        qualified(schema, table),
    )
    return {r[0]: r[1] == "s" for r in rows}


def _row(alias: str, columns: Sequence[str]) -> str:
    return "ROW(" + ", ".join(f"{alias}.{quote_ident(c)}" for c in columns) + ")::text"


def _match(columns: Sequence[str], left: str = "l", right: str = "r") -> str:
    return " AND ".join(f"{left}.{quote_ident(c)} = {right}.{quote_ident(c)}" for c in columns)


def _short(value: str | None) -> str:
    if value is None:
        return "NULL"
    return value if len(value) <= _VALUE_WIDTH else value[: _VALUE_WIDTH - 1] + "…"


async def diff_table(conn: asyncpg.Connection, result: RestoreResult) -> DiffSummary:
    """Compare the side table of `result` with the live table; computed in SQL."""
    source = result.source
    live = qualified(source.schema, source.table)
    base: dict[str, Any] = {
        "table": source.name,
        "side_table": result.restored_table,
        "restored_rows": result.rows,
    }
    if not await live_table_exists(conn, source.schema, source.table):
        return DiffSummary(
            **base,
            case="dropped",
            live_rows=None,
            only_in_restored=result.rows,
            only_in_current=0,
            changed=0,
            unchanged=0,
            key=_key(result),
            columns=tuple(c.name for c in source.columns),
        )
    live_columns = await _live_columns(conn, source.schema, source.table)
    columns, notes = _common_columns(source.columns, live_columns)
    key = tuple(c for c in _key(result) if c in live_columns)
    if len(key) != len(_key(result)):
        notes.append("the live table lacks primary key columns: rows are compared whole")
        key = ()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(set_local_sql(result.manifest.text_settings))
        live_rows = int((await fetch_one(conn, f"SELECT count(*) FROM {live}"))[0])
        if live_rows == 0:
            return DiffSummary(
                **base,
                case="emptied",
                live_rows=0,
                only_in_restored=result.rows,
                only_in_current=0,
                changed=0,
                unchanged=0,
                key=key,
                columns=columns,
                notes=tuple(notes),
            )
        if key:
            counts, examples = await _diff_by_key(conn, result, live, key, columns)
        else:
            counts, examples = await _diff_whole_rows(conn, result, live, columns)
    missing, added, changed, unchanged = counts
    case = "rows" if missing or changed else "unchanged"
    return DiffSummary(
        **base,
        case=case,
        live_rows=live_rows,
        only_in_restored=missing,
        only_in_current=added,
        changed=changed,
        unchanged=unchanged,
        key=key,
        columns=columns,
        examples=examples,
        notes=tuple(notes),
    )


def _key(result: RestoreResult) -> tuple[str, ...]:
    pk = result.source.primary_key
    return tuple(pk.columns) if pk is not None else ()


def _common_columns(
    columns: Sequence[ColumnDef], live: Mapping[str, bool]
) -> tuple[tuple[str, ...], list[str]]:
    notes: list[str] = []
    common = tuple(c.name for c in columns if c.name in live)
    gone = [c.name for c in columns if c.name not in live]
    new = [name for name in live if name not in {c.name for c in columns}]
    if gone:
        notes.append(
            "columns in the snapshot but no longer in the live table (not copied back): "
            + ", ".join(gone)
        )
    if new:
        notes.append(
            "columns added to the live table since the snapshot (re-inserted rows get their"
            " defaults): " + ", ".join(new)
        )
    return common, notes


async def _diff_by_key(
    conn: asyncpg.Connection,
    result: RestoreResult,
    live: str,
    key: Sequence[str],
    columns: Sequence[str],
) -> tuple[tuple[int, int, int, int], dict[str, tuple[str, ...]]]:
    side = result.qualified
    differs = f"{_row('r', columns)} IS DISTINCT FROM {_row('l', columns)}"
    row = await fetch_one(
        conn,
        "SELECT count(*) FILTER (WHERE l.ctid IS NULL) AS missing,"
        " count(*) FILTER (WHERE r.ctid IS NULL) AS added,"
        f" count(*) FILTER (WHERE r.ctid IS NOT NULL AND l.ctid IS NOT NULL AND {differs})"
        " AS changed, count(*) FILTER (WHERE r.ctid IS NOT NULL AND l.ctid IS NOT NULL"
        f" AND NOT ({differs})) AS unchanged"
        f" FROM {side} r FULL JOIN {live} l ON {_match(key)}",
    )
    keys_r = ", ".join(f"r.{quote_ident(c)}" for c in key)
    keys_l = ", ".join(f"l.{quote_ident(c)}" for c in key)
    label = "(" + ", ".join(key) + ")="
    examples: dict[str, tuple[str, ...]] = {}
    if row["missing"]:
        found = await conn.fetch(
            f"SELECT ROW({keys_r})::text FROM {side} r WHERE NOT EXISTS"
            f" (SELECT 1 FROM {live} l WHERE {_match(key)}) ORDER BY {keys_r} LIMIT {_EXAMPLES}"
        )
        examples["missing"] = tuple(label + f[0] for f in found)
    if row["added"]:
        found = await conn.fetch(
            f"SELECT ROW({keys_l})::text FROM {live} l WHERE NOT EXISTS"
            f" (SELECT 1 FROM {side} r WHERE {_match(key)}) ORDER BY {keys_l} LIMIT {_EXAMPLES}"
        )
        examples["added"] = tuple(label + f[0] for f in found)
    if row["changed"]:
        was = ", ".join(f"r.{quote_ident(c)}::text" for c in columns)
        now = ", ".join(f"l.{quote_ident(c)}::text" for c in columns)
        found = await conn.fetch(
            f"SELECT ROW({keys_r})::text, ARRAY[{was}]::text[], ARRAY[{now}]::text[]"
            f" FROM {side} r JOIN {live} l ON {_match(key)} WHERE {differs}"
            f" ORDER BY {keys_r} LIMIT {_EXAMPLES}"
        )
        lines = []
        for k, before, after in found:
            changes = [
                f"{name} {_short(a)} -> {_short(b)}"
                for name, a, b in zip(columns, after, before, strict=True)
                if a != b
            ]
            lines.append(label + k + ": " + ", ".join(changes) + " (live -> snapshot)")
        examples["changed"] = tuple(lines)
    counts = (int(row["missing"]), int(row["added"]), int(row["changed"]), int(row["unchanged"]))
    return counts, examples


async def _diff_whole_rows(
    conn: asyncpg.Connection, result: RestoreResult, live: str, columns: Sequence[str]
) -> tuple[tuple[int, int, int, int], dict[str, tuple[str, ...]]]:
    side = result.qualified
    as_text_r = _row("r", columns)
    as_text_l = _row("l", columns)
    missing = int(
        (
            await fetch_one(
                conn,
                f"SELECT count(*) FROM (SELECT {as_text_r} FROM {side} r"
                f" EXCEPT ALL SELECT {as_text_l} FROM {live} l) d",
            )
        )[0]
    )
    added = int(
        (
            await fetch_one(
                conn,
                f"SELECT count(*) FROM (SELECT {as_text_l} FROM {live} l"
                f" EXCEPT ALL SELECT {as_text_r} FROM {side} r) d",
            )
        )[0]
    )
    examples: dict[str, tuple[str, ...]] = {}
    if missing:
        found = await conn.fetch(
            f"SELECT * FROM (SELECT {as_text_r} FROM {side} r EXCEPT ALL"
            f" SELECT {as_text_l} FROM {live} l) d ORDER BY 1 LIMIT {_EXAMPLES}"
        )
        examples["missing"] = tuple(_short(f[0]) for f in found)
    if added:
        found = await conn.fetch(
            f"SELECT * FROM (SELECT {as_text_l} FROM {live} l EXCEPT ALL"
            f" SELECT {as_text_r} FROM {side} r) d ORDER BY 1 LIMIT {_EXAMPLES}"
        )
        examples["added"] = tuple(_short(f[0]) for f in found)
    unchanged = result.rows - missing
    return (missing, added, 0, unchanged), examples


# --------------------------------------------------------------------------- the SQL


@dataclass(frozen=True, slots=True)
class CopyBack:
    """The copy-back SQL for one table or a group, restored from one snapshot."""

    snapshot_id: str
    tables: tuple[str, ...]
    cases: Mapping[str, str]  # table -> case
    side_tables: Mapping[str, str]  # table -> schema.side_table
    sql: str
    manifest_sha256: str = ""

    @property
    def has_work(self) -> bool:
        return any(case != "unchanged" for case in self.cases.values())


@dataclass(slots=True)
class _Phases:
    """Statements by phase; a group's tables contribute to each phase in dependency order."""

    place: list[str] = field(default_factory=list)  # rename into place, insert, update
    add_keys: list[str] = field(default_factory=list)  # foreign keys, NOT VALID
    validate: list[str] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # comments after COMMIT


async def build_copy_back(
    conn: asyncpg.Connection,
    results: Sequence[RestoreResult],
    diffs: Mapping[str, DiffSummary],
) -> CopyBack:
    """The copy-back SQL for validated side tables (all from one snapshot) and their diffs
    (by schema.table). Reads the catalog for names; changes nothing."""
    if not results:
        raise ValueError("nothing to copy back")
    manifest = results[0].manifest
    if any(r.manifest.id != manifest.id for r in results):
        raise ValueError("a copy-back covers tables restored from one snapshot")
    ordered = _dependency_order(results)
    phases = _Phases()
    cases: dict[str, str] = {}
    locks: list[str] = []
    for result in ordered:
        diff = diffs[result.table]
        cases[result.table] = diff.case
        if diff.case == "unchanged":
            continue
        locks.append(result.qualified)
        if diff.case != "dropped":
            locks.insert(0, qualified(result.source.schema, result.source.table))
        if diff.case == "dropped":
            await _dropped(conn, result, phases)
        elif diff.case == "emptied":
            _emptied(result, diff, phases)
        elif diff.key:
            _merge_by_key(result, diff, phases)
        else:
            _merge_whole_rows(result, diff, phases)
    lines = _header(ordered, diffs)
    if any(case != "unchanged" for case in cases.values()):
        lines += [
            "BEGIN;",
            "-- Give up rather than queue behind a long transaction (and block everyone).",
            f"SET LOCAL lock_timeout = {quote_literal(_LOCK_TIMEOUT)};",
            f"LOCK TABLE {', '.join(locks)} IN ACCESS EXCLUSIVE MODE;",
            "",
        ]
        for block in (phases.place, phases.add_keys, phases.validate, phases.sequences):
            lines += block
        lines += ["COMMIT;", ""]
        lines += phases.after
    else:
        lines.append("-- Nothing to copy back: the live tables match the snapshot.")
    sql = "\n".join(lines).rstrip() + "\n"
    return CopyBack(
        snapshot_id=manifest.id,
        tables=tuple(r.table for r in ordered),
        cases=cases,
        side_tables={r.table: r.restored_table for r in ordered},
        sql=sql,
        manifest_sha256=manifest.sha256,
    )


def _header(results: Sequence[RestoreResult], diffs: Mapping[str, DiffSummary]) -> list[str]:
    manifest = results[0].manifest
    taken = manifest.started_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"-- Backstop copy-back from snapshot {manifest.id}",
        f"--   taken {taken}, WAL {manifest.wal_lsn or 'unknown'},"
        f" manifest sha256 {manifest.sha256[:16] or 'unknown'}",
    ]
    for result in results:
        diff = diffs[result.table]
        lines.append(
            f"-- {result.table}: restored into {result.restored_table} ({result.rows:,} rows,"
            f" checksum {result.source.checksum}, validated)"
        )
        lines.append(f"--   {diff.describe()}")
        lines.extend(f"--   note: {note}" for note in diff.notes)
    lines += [
        "-- Review it, then run it as one script (psql -v ON_ERROR_STOP=1 -f FILE), or let",
        "-- `backstop recover --apply` run it. It runs in one transaction: all or nothing.",
        "",
    ]
    return lines


def _dependency_order(results: Sequence[RestoreResult]) -> list[RestoreResult]:
    """Referenced tables before the tables that reference them (within the group)."""
    by_name = {r.table: r for r in results}
    needs: dict[str, set[str]] = {}
    for result in results:
        refs: set[str] = set()
        for fk in _foreign_keys(result):
            if fk.ref_name in by_name and fk.ref_name != result.table:
                refs.add(fk.ref_name)
        needs[result.table] = refs
    ordered: list[RestoreResult] = []
    done: set[str] = set()
    while len(ordered) < len(results):
        ready = [r for r in results if r.table not in done and needs[r.table] <= done]
        if not ready:  # a cycle: keep the given order for the rest
            ready = [r for r in results if r.table not in done]
        for result in ready:
            ordered.append(result)
            done.add(result.table)
    return ordered


def _foreign_keys(result: RestoreResult) -> list[ForeignKey]:
    keys = []
    for constraint in result.source.constraints:
        if constraint.type != "foreign_key":
            continue
        with contextlib.suppress(ValueError):
            keys.append(parse_foreign_key(constraint, result.source.schema))
    return keys


async def _dropped(conn: asyncpg.Connection, result: RestoreResult, phases: _Phases) -> None:
    source = result.source
    live = qualified(source.schema, source.table)
    side = result.qualified
    out = phases.place
    out.append(f"-- {source.name} was dropped: {result.restored_table} takes its place.")
    if source.kind == "partitioned":
        out.append(
            f"-- It was partitioned ({source.partition_key}); the restored table is a plain"
            " table holding every row: partition it again if you need to."
        )
    if result.schema != source.schema:
        out.append(f"ALTER TABLE {side} SET SCHEMA {quote_ident(source.schema)};")
        side = qualified(source.schema, result.name)
    out.append(f"ALTER TABLE {side} RENAME TO {quote_ident(source.table)};")
    constraint_names = {c.name for c in source.constraints}
    for original, now in result.renamed.items():
        if original == now:
            continue
        if original in constraint_names:
            # Renaming a primary key, unique or exclusion constraint renames its index too.
            out.append(
                f"ALTER TABLE {live} RENAME CONSTRAINT {quote_ident(now)}"
                f" TO {quote_ident(original)};"
            )
        else:
            out.append(
                f"ALTER INDEX {qualified(source.schema, now)} RENAME TO {quote_ident(original)};"
            )
    for column in source.columns:
        sequence = column.sequence
        if sequence is None:
            continue
        current = result.sequences.get(column.name)
        if current is None and column.identity is not None:
            current = await conn.fetchval(
                "SELECT pg_get_serial_sequence($1, $2)", result.qualified, column.name
            )
        if current is None:
            continue
        path, _ = split_identifier_path(sequence.name)
        current_path, _ = split_identifier_path(current)
        if len(path) != 2 or len(current_path) != 2 or path[1] == current_path[1]:
            continue
        if path[0] != current_path[0]:
            out.append(f"-- the sequence of {column.name} was {sequence.name}; it is now {current}")
            continue
        out.append(f"ALTER SEQUENCE {qualified(*current_path)} RENAME TO {quote_ident(path[1])};")
    for fk in _foreign_keys(result):
        valid = "NOT VALID" not in fk.definition
        definition = fk.definition if not valid else f"{fk.definition} NOT VALID"
        phases.add_keys.append(
            f"ALTER TABLE {live} ADD CONSTRAINT {quote_ident(fk.name)} {definition};"
        )
        if valid:
            phases.validate.append(
                f"ALTER TABLE {live} VALIDATE CONSTRAINT {quote_ident(fk.name)};"
            )
    out.append("")
    phases.after += [
        f"-- Not in the snapshot, so not recreated for {source.name}: its owner, grants,",
        "-- triggers, row-level security policies, comments, views and foreign keys of",
        "-- other tables that pointed at it (DROP ... CASCADE removed them). Reapply them.",
    ]


def _insert_columns(result: RestoreResult, diff: DiffSummary) -> tuple[list[str], bool, list[str]]:
    """Columns to insert (not generated), whether OVERRIDING SYSTEM VALUE is needed, and
    the identity-always columns (which UPDATE cannot set)."""
    by_name = {c.name: c for c in result.source.columns}
    names = [n for n in diff.columns if by_name[n].generated is None]
    always = [n for n in names if by_name[n].identity == "always"]
    return names, bool(always), always


def _sequence_bumps(result: RestoreResult, diff: DiffSummary) -> list[str]:
    """Move serial and identity sequences past the largest key copied back, when behind."""
    source = result.source
    live = qualified(source.schema, source.table)
    out: list[str] = []
    for column in source.columns:
        s = column.sequence
        if s is None or column.name not in diff.columns or s.increment <= 0:
            continue
        out.append(
            "SELECT setval(s.seq::regclass, s.top) FROM (SELECT pg_get_serial_sequence("
            f"{quote_literal(live)}, {quote_literal(column.name)}) AS seq,"
            f" (SELECT max({quote_ident(column.name)}) FROM {live}) AS top) s"
            " WHERE s.seq IS NOT NULL AND s.top IS NOT NULL"
            " AND s.top > coalesce(pg_sequence_last_value(s.seq::regclass), 0);"
        )
    return out


def _emptied(result: RestoreResult, diff: DiffSummary, phases: _Phases) -> None:
    source = result.source
    live = qualified(source.schema, source.table)
    columns, overriding, _ = _insert_columns(result, diff)
    listed = ", ".join(quote_ident(c) for c in columns)
    message = (
        f"backstop: {source.name} is no longer empty; run backstop recover again for a"
        " copy-back that merges"
    )
    phases.place += [
        f"-- {source.name} is empty: all {result.rows:,} rows go back.",
        f"DO $guard$ BEGIN IF EXISTS (SELECT 1 FROM {live}) THEN"
        f" RAISE EXCEPTION {quote_literal(message)}; END IF; END $guard$;",
        f"INSERT INTO {live} ({listed})"
        + (" OVERRIDING SYSTEM VALUE" if overriding else "")
        + f" SELECT {listed} FROM {result.qualified};",
        "",
    ]
    phases.sequences += _sequence_bumps(result, diff)


def _merge_by_key(result: RestoreResult, diff: DiffSummary, phases: _Phases) -> None:
    source = result.source
    live = qualified(source.schema, source.table)
    side = result.qualified
    columns, overriding, always = _insert_columns(result, diff)
    key = diff.key
    out = phases.place
    out.append(
        f"-- {source.name}: {plural(diff.only_in_restored, 'row')} to re-insert,"
        f" {plural(diff.changed, 'row')} to set back to the snapshot's values;"
        f" {plural(diff.only_in_current, 'row')} added since stay untouched."
    )
    settable = [c for c in columns if c not in key and c not in always]
    if always:
        out.append(f"-- {', '.join(always)}: GENERATED ALWAYS identity, which UPDATE cannot set.")
    if diff.changed and settable:
        assignments = ", ".join(f"{quote_ident(c)} = r.{quote_ident(c)}" for c in settable)
        out.append(
            f"UPDATE {live} AS l SET {assignments} FROM {side} AS r WHERE {_match(key)}"
            f" AND {_row('l', diff.columns)} IS DISTINCT FROM {_row('r', diff.columns)};"
        )
    if diff.only_in_restored:
        listed = ", ".join(quote_ident(c) for c in columns)
        selected = ", ".join(f"r.{quote_ident(c)}" for c in columns)
        out.append(
            f"INSERT INTO {live} ({listed})"
            + (" OVERRIDING SYSTEM VALUE" if overriding else "")
            + f" SELECT {selected} FROM {side} AS r"
            f" WHERE NOT EXISTS (SELECT 1 FROM {live} AS l WHERE {_match(key)});"
        )
    out.append("")
    phases.sequences += _sequence_bumps(result, diff)
    phases.after.append(f"-- When satisfied: DROP TABLE {side};")


def _merge_whole_rows(result: RestoreResult, diff: DiffSummary, phases: _Phases) -> None:
    source = result.source
    live = qualified(source.schema, source.table)
    side = result.qualified
    columns, overriding, _ = _insert_columns(result, diff)
    listed = ", ".join(quote_ident(c) for c in columns)
    selected = ", ".join(f"r.{quote_ident(c)}" for c in columns)
    text_r = _row("r", diff.columns)
    text_l = _row("l", diff.columns)
    phases.place += [
        f"-- {source.name} has no primary key: the {diff.only_in_restored:,} rows of the"
        " snapshot that the live table lacks (compared whole, duplicates counted) go back;",
        "-- rows changed since cannot be told from rows added, so both versions stay.",
        f"INSERT INTO {live} ({listed})"
        + (" OVERRIDING SYSTEM VALUE" if overriding else "")
        + f" SELECT {selected} FROM (SELECT r.*, {text_r} AS t_,"
        f" row_number() OVER (PARTITION BY {text_r}) AS n_ FROM {side} AS r) AS r"
        f" LEFT JOIN (SELECT {text_l} AS t_, count(*) AS m_ FROM {live} AS l GROUP BY 1) AS l"
        " ON l.t_ = r.t_ WHERE r.n_ > coalesce(l.m_, 0);",
        "",
    ]
    phases.sequences += _sequence_bumps(result, diff)
    phases.after.append(f"-- When satisfied: DROP TABLE {side};")


# --------------------------------------------------------------------------- files, apply


def copy_back_path(state_dir: Path, tables: Iterable[str], snapshot_id: str) -> Path:
    """`<state_dir>/recovery/<table>-<snapshot>.sql` (tables joined with '+' for a group)."""
    name = "+".join(tables).replace("/", "_")
    return Path(state_dir) / "recovery" / f"{name}-{snapshot_id}.sql"


def write_copy_back(copy_back: CopyBack, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(copy_back.sql)
    os.replace(temporary, path)
    return path


@dataclass(frozen=True, slots=True)
class AppliedCopyBack:
    audit_key: str | None
    seconds: float
    wal_lsn: str | None


async def apply_copy_back(
    conn: asyncpg.Connection,
    copy_back: CopyBack,
    *,
    state: StateStore | None,
    operator: str,
    client: str = "backstop recover",
) -> AppliedCopyBack:
    """Run the copy-back SQL (its own transaction) and record it in the audit trail as a
    RECOVER decided by the operator. Raises asyncpg errors unchanged (the transaction is
    then rolled back) after recording the failure."""
    if conn.is_in_transaction():
        raise ValueError("the copy-back runs its own transaction; the connection is in one")
    wal_lsn: str | None = None
    with contextlib.suppress(asyncpg.PostgresError):
        wal_lsn = await conn.fetchval(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END"
        )
    key = None
    if state is not None:
        key = state.audit_begin(
            AuditStart(
                session_id=f"recover-{os.getpid()}",
                agent=operator,
                client=client,
                sql=copy_back.sql,
                operation="RECOVER",
                risk="HIGH",
                tables=copy_back.tables,
                classification_json="[]",
                decision="operator",
                rule="recover",
                reason=(
                    f"copy-back of {', '.join(copy_back.tables)} from snapshot"
                    f" {copy_back.snapshot_id} after validation"
                ),
                snapshot_id=copy_back.snapshot_id,
                snapshot_manifest_sha256=copy_back.manifest_sha256 or None,
                wal_lsn=wal_lsn,
            )
        )
    started = time.perf_counter()
    try:
        await conn.execute(copy_back.sql)
    except BaseException as exc:
        elapsed = (time.perf_counter() - started) * 1000
        if conn.is_in_transaction() and not conn.is_closed():
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        if state is not None and key is not None:
            state.audit_finish(key, "error", elapsed, str(exc) or type(exc).__name__)
        raise
    elapsed = (time.perf_counter() - started) * 1000
    if state is not None and key is not None:
        state.audit_finish(key, "forwarded", elapsed)
    return AppliedCopyBack(key, elapsed / 1000, wal_lsn)
