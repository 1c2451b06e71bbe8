"""The checksum expression builder: which columns are hashed as they are, which through
their text form, and the SQL each form becomes. (That the SQL computes what it should is
tested against PostgreSQL in tests/integration/test_snapshot_checksum.py.)"""

from __future__ import annotations

import pytest

from backstop_core.sidecar.pgtypes import (
    CHECKSUM_FORMS,
    CHECKSUM_HASH,
    CHECKSUM_MD5,
    ChecksumColumn,
    checksum_form,
    checksum_method_for,
    checksum_sql,
    checksum_unavailable,
    checksum_value,
)

# Built-in type OIDs (fixed in every PostgreSQL version).
INT2, INT4, INT8, BOOL, CHAR, NAME, TEXT, OID, BYTEA = 21, 23, 20, 16, 18, 19, 25, 26, 17
VARCHAR, BPCHAR, DATE, TIME, TIMESTAMP, TIMESTAMPTZ = 1043, 1042, 1082, 1083, 1114, 1184
UUID, INET, CIDR, MACADDR = 2950, 869, 650, 829
NUMERIC, FLOAT4, FLOAT8, INTERVAL, JSON, JSONB, XML, POINT = (
    1700,
    700,
    701,
    1186,
    114,
    3802,
    142,
    600,
)
MONEY, TIMETZ, MACADDR8, INT4RANGE, INT2VECTOR = 790, 1266, 774, 3904, 22
USER_TYPE = 16_500  # an enum, composite or extension type: anything created later


@pytest.mark.parametrize(
    ("oid", "form"),
    [
        (INT2, "value"),
        (INT4, "value"),
        (BOOL, "value"),
        (CHAR, "value"),
        (OID, "value"),
        (BYTEA, "value"),
        (DATE, "value"),
        (UUID, "value"),
        (INET, "value"),
        (CIDR, "value"),
        (MACADDR, "value"),
        # Collatable: hashed by their bytes, whatever the column's collation.
        (TEXT, "value_c"),
        (VARCHAR, "value_c"),
        (BPCHAR, "value_c"),
        (NAME, "value_c"),
        # 64-bit: their binary form, because PostgreSQL's own hash folds them to 32 bits.
        (INT8, "int8send"),
        (TIME, "time_send"),
        (TIMESTAMP, "timestamp_send"),
        (TIMESTAMPTZ, "timestamptz_send"),
    ],
)
def test_types_whose_equal_values_print_alike_are_hashed_natively(oid: int, form: str) -> None:
    assert checksum_form(oid, is_array=False) == form


@pytest.mark.parametrize(
    "oid",
    [
        NUMERIC,  # 1.0 = 1.00
        FLOAT4,  # -0 = 0
        FLOAT8,
        INTERVAL,  # '1 day' = '24 hours'
        JSONB,  # its numbers are numerics
        JSON,  # no hash function
        XML,
        POINT,
        MONEY,
        TIMETZ,
        MACADDR8,
        INT4RANGE,
        INT2VECTOR,
        USER_TYPE,  # enums hash by OID, which changes when the type is created again
    ],
)
def test_every_other_type_goes_through_its_text_form(oid: int) -> None:
    assert checksum_form(oid, is_array=False) == "text"
    assert checksum_form(oid, is_array=True) == "text"


def test_arrays_follow_their_element_type_and_add_their_dimensions() -> None:
    assert checksum_form(INT4, is_array=True) == "array"
    assert checksum_form(TEXT, is_array=True) == "array_c"
    # Arrays are hashed element by element: no binary form for 64-bit elements.
    assert checksum_form(INT8, is_array=True) == "array"
    assert checksum_form(TIMESTAMPTZ, is_array=True) == "array"
    assert CHECKSUM_FORMS["array"] == "{c}, array_dims({c})"


def test_the_row_takes_every_column_in_order_in_its_form() -> None:
    columns = [
        ChecksumColumn("id", "int8send"),
        ChecksumColumn("Name", "value_c"),
        ChecksumColumn("amount", "text"),
        ChecksumColumn("tags", "array_c"),
        ChecksumColumn('we"ird', "value"),
    ]
    sql = checksum_sql("s", "t", only=True, method=CHECKSUM_HASH, columns=columns)
    assert sql == (
        "SELECT count(*) AS n, coalesce(sum(hashint4extended(0, hash_record_extended(ROW("
        'int8send(r."id"), r."Name" COLLATE "C", (r."amount")::text COLLATE "C",'
        ' r."tags" COLLATE "C", array_dims(r."tags"), r."we""ird"'
        '), 0))), 0)::text AS s FROM ONLY "s"."t" r'
    )


def test_a_table_without_columns_hashes_an_empty_row_per_row() -> None:
    sql = checksum_sql("s", "t", only=False, method=CHECKSUM_HASH, columns=[])
    assert "hash_record_extended(ROW(), 0)" in sql and 'FROM "s"."t" r' in sql


def test_the_md5_method_is_unchanged() -> None:
    assert checksum_sql("s", "t", only=True, method=CHECKSUM_MD5) == (
        "SELECT count(*) AS n,"
        " coalesce(sum(('x' || left(md5((r.*)::text), 16))::bit(64)::bigint), 0)::text AS s"
        ' FROM ONLY "s"."t" r'
    )


def test_unknown_methods_and_forms_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown checksum method 'crc32/9'"):
        checksum_sql("s", "t", only=True, method="crc32/9")
    with pytest.raises(ValueError, match="column 'x': unknown checksum form 'raw'"):
        checksum_sql(
            "s", "t", only=True, method=CHECKSUM_HASH, columns=[ChecksumColumn("x", "raw")]
        )


def test_every_form_is_one_expression_list_over_the_column() -> None:
    for form, template in CHECKSUM_FORMS.items():
        sql = template.format(c='r."c"')
        assert 'r."c"' in sql, form
        assert sql.count("(") == sql.count(")"), form


def test_the_method_follows_the_server_version() -> None:
    assert checksum_method_for(140000) == CHECKSUM_HASH
    assert checksum_method_for(170002) == CHECKSUM_HASH
    assert checksum_method_for(130012) == CHECKSUM_MD5
    assert checksum_unavailable(CHECKSUM_HASH, 150004) is None
    assert checksum_unavailable(CHECKSUM_MD5, 120000) is None
    old = checksum_unavailable(CHECKSUM_HASH, 130012)
    assert old is not None and "needs PostgreSQL 14 or later" in old and "PostgreSQL 13" in old
    unknown = checksum_unavailable("crc32/9", 150004)
    assert unknown is not None and "'crc32/9' is unknown" in unknown


def test_checksum_value_is_the_sum_modulo_2_64_in_hex() -> None:
    assert checksum_value("0") == "0000000000000000"
    assert checksum_value("-1") == "ffffffffffffffff"
    assert checksum_value(str((1 << 64) + 255)) == "00000000000000ff"
