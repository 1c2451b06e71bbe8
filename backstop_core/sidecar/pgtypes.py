"""PostgreSQL session settings, names, type mappings and table checksums shared by snapshot
and restore.

Both sides read and write every value in its PostgreSQL text form, under the same output
settings, so a value comes back exactly as it went out and the checksum computed on the
restored table can be compared with the one taken at snapshot time.

Two checksum methods exist; a manifest records which one it used (`checksum_method`), and a
restored table is always checked with that one:

- `hash-record-sum64/2` (CHECKSUM_HASH, PostgreSQL 14 and later): each row is hashed with
  `hash_record_extended` over its columns, most of them by their own hash functions, so no
  text form has to be built; see `checksum_form` for which columns and `checksum_value`
  for the formula. About 3 times cheaper than the md5 method.
- `md5-row-text-sum64/1` (CHECKSUM_MD5): md5 of each row's text form; used for servers
  before 14 (no `hash_record_extended`) and for validating manifests that recorded it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHECKSUM_FORMS",
    "CHECKSUM_HASH",
    "CHECKSUM_MD5",
    "CHECKSUM_METHODS",
    "HASH_MIN_SERVER_VERSION",
    "TEXT_SETTINGS",
    "ChecksumColumn",
    "arrow_type",
    "checksum_form",
    "checksum_method_for",
    "checksum_sql",
    "checksum_unavailable",
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

CHECKSUM_MD5 = "md5-row-text-sum64/1"
CHECKSUM_HASH = "hash-record-sum64/2"
CHECKSUM_METHODS = (CHECKSUM_HASH, CHECKSUM_MD5)
# hash_record_extended came with PostgreSQL 14.
HASH_MIN_SERVER_VERSION = 140000


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


# --------------------------------------------------------------------------- checksums

# Types whose hash is taken as is by `hash-record-sum64/2`: for each, two values that are
# equal also have the same text form, so hashing the value is as strict as hashing its text
# (by OID, which PostgreSQL keeps the same in every version). Every other type goes through
# its text form: numeric (1.0 = 1.00), float (-0 = 0), interval ('1 day' = '24 hours'),
# jsonb (its numbers are numerics), money, enums (hashed by OID, which changes when the type
# is created again), json, xml and point (no hash function), ranges, composites, and any
# type of an extension.
_NATIVE_HASH = {
    21: "int2",
    23: "int4",
    20: "int8",
    16: "bool",
    25: "text",
    1043: "varchar",
    1042: "bpchar",
    19: "name",
    18: "char",
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1184: "timestamptz",
    2950: "uuid",
    17: "bytea",
    26: "oid",
    869: "inet",
    650: "cidr",
    829: "macaddr",
}
# Collatable ones: hashed under COLLATE "C", so by their bytes. Under a nondeterministic
# collation their hash would follow the collation ('abc' = 'ABC' case-insensitively).
_COLLATABLE = frozenset({25, 1043, 1042, 19})
# 64-bit ones: PostgreSQL's hash of an int8 (and of time and the timestamps, which hash as
# int8) folds the two 32-bit halves into one before hashing, so 1 and 4294967296, or
# 0x00000001_00000002 and 0x00000002_00000001, hash alike. Their 8-byte binary form is
# hashed whole instead (send functions are plain SQL functions; the cost is small).
_SEND = {
    20: "int8send",
    1083: "time_send",
    1114: "timestamp_send",
    1184: "timestamptz_send",
}

# How a column enters the row of `hash-record-sum64/2`; `{c}` is the quoted column. The form
# is recorded per column in the manifest, so validation builds the very same row.
CHECKSUM_FORMS: Mapping[str, str] = {
    "value": "{c}",
    "value_c": '{c} COLLATE "C"',
    # hash_array ignores the bounds and the shape ('[0:1]={1,2}' = '{1,2}' = '{{1},{2}}'):
    # array_dims (NULL for NULL and for an empty array) adds them.
    "array": "{c}, array_dims({c})",
    "array_c": '{c} COLLATE "C", array_dims({c})',
    "int8send": "int8send({c})",
    "time_send": "time_send({c})",
    "timestamp_send": "timestamp_send({c})",
    "timestamptz_send": "timestamptz_send({c})",
    # The text form under TEXT_SETTINGS, hashed by its bytes whatever collation it inherits.
    "text": '({c})::text COLLATE "C"',
}


@dataclass(frozen=True, slots=True)
class ChecksumColumn:
    """One column of a table as `hash-record-sum64/2` hashes it (see CHECKSUM_FORMS)."""

    name: str
    form: str


def checksum_form(base_type_oid: int, is_array: bool) -> str:
    """The form a column takes in `hash-record-sum64/2`, from its type with domains looked
    through: `base_type_oid` is the type of its values, or of its elements for an array.

    Known limits of the native forms: char(n) values are padded to n, but a `bpchar` column
    without a length keeps trailing spaces its hash ignores; and elements of arrays of the
    64-bit types hash folded to 32 bits (see _SEND), so a changed element escapes with a
    probability of 2^-32 rather than 2^-64."""
    if base_type_oid not in _NATIVE_HASH:
        return "text"
    collate = base_type_oid in _COLLATABLE
    if is_array:
        return "array_c" if collate else "array"
    if base_type_oid in _SEND:
        return _SEND[base_type_oid]
    return "value_c" if collate else "value"


def checksum_method_for(server_version_num: int) -> str:
    """The method new snapshots use on a server of this `server_version_num`."""
    return CHECKSUM_HASH if server_version_num >= HASH_MIN_SERVER_VERSION else CHECKSUM_MD5


def checksum_unavailable(method: str, server_version_num: int) -> str | None:
    """Why a server of this version cannot compute `method`; None when it can."""
    if method not in CHECKSUM_METHODS:
        return (
            f"checksum method {method!r} is unknown to this Backstop (it computes"
            f" {' and '.join(repr(m) for m in CHECKSUM_METHODS)})"
        )
    if method == CHECKSUM_HASH and server_version_num < HASH_MIN_SERVER_VERSION:
        major = server_version_num // 10000
        return (
            f"checksum method {method!r} needs PostgreSQL 14 or later (hash_record_extended);"
            f" this server is PostgreSQL {major}"
        )
    return None


def checksum_sql(
    schema: str,
    table: str,
    *,
    only: bool,
    method: str = CHECKSUM_MD5,
    columns: Sequence[ChecksumColumn] = (),
) -> str:
    """The checksum query, with the row count (`n`) and the unreduced sum (`s`, text): see
    `checksum_value`. `columns` (every live column, in attnum order) is what
    `hash-record-sum64/2` hashes; `md5-row-text-sum64/1` takes the whole row.

    The per-row expression stays in the scan's target list: a subquery that names the row
    hash twice (to mix it with itself) is flattened into two evaluations of it, and moving
    md5 into a subquery makes PostgreSQL twice as slow. Run it with `fetch`, not `fetchrow`:
    a portal executed with a row limit gets no parallel workers."""
    source = ("ONLY " if only else "") + qualified(schema, table)
    if method == CHECKSUM_MD5:
        # `(r.*)::text` is the row's composite text form (a column named like the alias
        # cannot shadow it).
        total = "sum(('x' || left(md5((r.*)::text), 16))::bit(64)::bigint)"
    elif method == CHECKSUM_HASH:
        total = f"sum(hashint4extended(0, hash_record_extended({_row_sql(columns)}, 0)))"
    else:
        raise ValueError(f"unknown checksum method {method!r}")
    return f"SELECT count(*) AS n, coalesce({total}, 0)::text AS s FROM {source} r"


def _row_sql(columns: Sequence[ChecksumColumn]) -> str:
    parts = []
    for column in columns:
        template = CHECKSUM_FORMS.get(column.form)
        if template is None:
            raise ValueError(f"column {column.name!r}: unknown checksum form {column.form!r}")
        parts.append(template.format(c="r." + quote_ident(column.name)))
    return "ROW(" + ", ".join(parts) + ")"


def checksum_value(total: str) -> str:
    """The checksum from the query's sum: modulo 2^64, as 16 hex digits. A sum does not
    depend on row order and counts duplicate rows; together with the exact row count, two
    tables that differ match by chance with a probability of about 2^-64.

    md5-row-text-sum64/1: per row, md5 of the row's text form under TEXT_SETTINGS; the
    first 8 bytes of each digest, read as a signed 64-bit integer, are summed. Going
    through the text form makes it exact for every type.

    hash-record-sum64/2: per row, h = hash_record_extended(ROW(e1, ..., en), 0) over the
    live columns in attnum order, each in its CHECKSUM_FORMS form (its value when equal
    values of its type have equal text forms, its text form under TEXT_SETTINGS
    otherwise); then hashint4extended(0, h), which runs h, as the seed, through the mix and
    final steps of PostgreSQL's hash (lookup3); the results are summed. The mixing step is
    what makes it a row checksum: hash_record_extended is h = 31 * h + hash(column) over the
    columns, linear, so the plain sum of h over the rows would only be a weighted sum of
    per-column sums, blind to values moved between rows. PostgreSQL keeps its hash
    functions stable across versions (hash partitioning depends on it), so the checksum
    can be recomputed on another server version."""
    return f"{int(total) % (1 << 64):016x}"
