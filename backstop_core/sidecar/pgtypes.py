"""PostgreSQL session settings, names and type mappings shared by snapshot and restore.

Both sides read and write every value in its PostgreSQL text form, under the same output
settings, so a value comes back exactly as it went out and the checksum computed on the
restored table can be compared with the one taken at snapshot time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "CHECKSUM_METHOD",
    "TEXT_SETTINGS",
    "arrow_type",
    "checksum_sql",
    "checksum_value",
    "qualified",
    "quote_ident",
    "quote_literal",
    "set_local_sql",
    "storage_for",
]

# Output settings under which every value's text form is exact and re-readable: ISO dates,
# shortest-exact floats, hex bytea, UTC for timestamptz, money without locale decoration,
# and schema-qualified names in every definition PostgreSQL prints (search_path).
TEXT_SETTINGS: Mapping[str, str] = {
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "xmloption": "content",
    "search_path": "pg_catalog",
    # With row-level security on, a read could silently skip rows; off makes it an error.
    "row_security": "off",
    "statement_timeout": "0",
}

# Parquet storage per column: native Arrow types only where the text form round-trips
# exactly; everything else is kept as the PostgreSQL text form in a string column.
_NATIVE = {
    21: "int16",  # int2
    23: "int32",  # int4
    20: "int64",  # int8
    16: "bool",
    25: "string",  # text
    1043: "string",  # varchar
    1042: "string",  # bpchar
}

CHECKSUM_METHOD = "md5-row-text-sum64/1"


def storage_for(type_oid: int) -> str:
    return _NATIVE.get(type_oid, "string")


def arrow_type(storage: str) -> Any:
    import pyarrow as pa

    types = {
        "int16": pa.int16(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "bool": pa.bool_(),
        "string": pa.string(),
    }
    try:
        return types[storage]
    except KeyError:
        raise ValueError(f"unknown column storage {storage!r}") from None


def quote_ident(name: str) -> str:
    """Always quoted: exact whatever the name's case or characters."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def set_local_sql(extra: Mapping[str, str] | None = None) -> str:
    settings = dict(TEXT_SETTINGS)
    settings.update(extra or {})
    return "; ".join(
        f"SET LOCAL {name} = {quote_literal(value)}" for name, value in settings.items()
    )


def checksum_sql(schema: str, table: str, *, only: bool) -> str:
    """The checksum query: see `checksum_value`.

    `(r.*)::text` is the row's composite text form (a column named like the alias cannot
    shadow it). The expression stays in the scan's target list: moving the md5 into a
    subquery (to use both halves of it) makes PostgreSQL twice as slow.
    """
    source = ("ONLY " if only else "") + qualified(schema, table)
    return (
        "SELECT count(*) AS n,"
        " coalesce(sum(('x' || left(md5((r.*)::text), 16))::bit(64)::bigint), 0)::text AS s"
        f" FROM {source} r"
    )


def checksum_value(total: str) -> str:
    """md5-row-text-sum64/1: for every row, md5 of the row's text form under TEXT_SETTINGS;
    the checksum is the sum, modulo 2^64, of the first 8 bytes of those digests (read as
    signed 64-bit integers), as 16 hex digits. A sum does not depend on row order and
    counts duplicate rows; going through the text form makes it exact for every type.
    Together with the exact row count, two tables that differ match by chance with a
    probability of about 2^-64."""
    return f"{int(total) % (1 << 64):016x}"
