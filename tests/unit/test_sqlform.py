"""literal_form against PostgreSQL's own scanner: texts of one form lex alike."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast.parser import scan

from backstop_core.sqlform import (
    INTEGER_MARK,
    NUMBER_MARK,
    STRING_MARK,
    literal_form,
    statement_form,
)

LITERAL_TOKENS = {"SCONST": STRING_MARK, "ICONST": INTEGER_MARK, "FCONST": NUMBER_MARK}
# Other literals than the ones in a text, one per marker, to build another text of its form.
OTHER_LITERAL = {STRING_MARK: "'o''ther'", INTEGER_MARK: "999999999", NUMBER_MARK: "0.5e-3"}

PIECES = [
    "'",
    "''",
    '"',
    "e",
    "E",
    "x",
    "b",
    "n",
    "U&",
    "&",
    "1",
    "12",
    "0",
    ".",
    "5",
    "e5",
    "e+",
    "-",
    "--",
    "/",
    "*",
    "/*",
    "*/",
    "\\",
    "\n",
    " ",
    "\t",
    "SELECT",
    "a",
    "_",
    "é",
    ";",
    "(",
    ")",
    "=",
    "$",
    "::",
    "'abc'",
    '"q""d"',
    "0x1F",
    "1_000",
    "1.5",
    "3e-2",
    "'it''s'",
]


def shape(sql: str) -> list[str] | None:
    """The scanner's tokens, each literal by its kind and the rest by its text (None: the
    scanner refuses the text)."""
    try:
        tokens = scan(sql)
    except Exception:
        return None
    return [LITERAL_TOKENS.get(t.name) or sql[t.start : t.end + 1] for t in tokens]


def other_text(form: str) -> str:
    out = form
    for mark, literal in OTHER_LITERAL.items():
        out = out.replace(mark, literal)
    return out


# Without the pieces that end most texts' forms at once (a lone quote usually leaves one
# unterminated), so that more of the generated texts have one.
BALANCED = [p for p in PIECES if p not in ("$", "\\", "--", "/*", "'", '"')]


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.lists(st.sampled_from(PIECES), min_size=1, max_size=24),
        st.lists(st.sampled_from(BALANCED), min_size=1, max_size=24),
    ).map("".join)
)
def test_texts_of_one_form_lex_alike(sql: str) -> None:
    """Whatever a text holds, if it has a form, another text of that form (other literals
    in the same places) is read by the scanner as the same tokens but for literal values."""
    form = literal_form(sql)
    if form is None:
        return
    other = other_text(form)
    assert literal_form(other) == form
    assert shape(sql) == shape(other), (sql, other)


@pytest.mark.parametrize(
    ("sql", "form"),
    [
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $i;",
        ),
        (
            "SELECT * FROM t1 WHERE x = 'it''s' AND y > 1.5e3",
            "SELECT * FROM t1 WHERE x = $s AND y > $n",
        ),
        (
            'SELECT "col 1" FROM "we""ird" WHERE a = -4',
            'SELECT "col 1" FROM "we""ird" WHERE a = -$i',
        ),
        ("SELECT 'a'\n'b'", "SELECT $s\n$s"),
    ],
)
def test_literals_are_replaced(sql: str, form: str) -> None:
    assert literal_form(sql) == form


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 -- '",
        "SELECT /* 1 */ 2",
        "SELECT E'a\\'' ",
        "SELECT x'ff'",
        "SELECT U&'d\\0061t'",
        "SELECT $1",
        "SELECT $$a$$",
        "SELECT 0x1F",
        "SELECT 1_000",
        "SELECT .5",
        "SELECT 1.",
        "SELECT 'unterminated",
        "SELECT a FROM t",  # no literal: nothing to share
        "SELECT 'a\x00'",
        "SELECT '\udc80'",  # not valid text
        "SELECT 2147483648",  # past int4: the scanner's other kind of number
    ],
)
def test_what_it_cannot_delimit_exactly_has_no_form(sql: str) -> None:
    assert literal_form(sql) is None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select 1",
        "  \n\tSeLeCt 'a'",
        "INSERT INTO t VALUES (1)",
        "update t SET a = 2",
        "DELETE FROM t WHERE id = 3",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SELECT(1)",
    ],
)
def test_a_statement_of_a_shared_kind_has_its_literal_form(sql: str) -> None:
    assert statement_form(sql) == literal_form(sql) is not None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECTED 1",
        "select1 + 1",
        "WITH_x 1",
        "with2 1",
        "SELECTé 1",
        "VALUES (1)",
        "EXPLAIN SELECT 1",
        "TRUNCATE t",
        "SELEC 1",
        "(SELECT 1)",
        'SELECT "" FROM t WHERE a = 1',
        "",
        "   ",
    ],
)
def test_any_other_statement_has_no_form(sql: str) -> None:
    assert statement_form(sql) is None


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([*PIECES, "with", "Insert", "DELETE", "UPDATE", "1"]), max_size=8))
def test_the_form_is_given_exactly_when_the_first_word_is_a_shared_kind(pieces: list[str]) -> None:
    sql = "".join(pieces)
    try:
        tokens = scan(sql)
    except Exception:
        tokens = []
    first = tokens[0] if tokens else None
    kinds = {"SELECT", "INSERT", "UPDATE", "DELETE_P", "WITH"}  # the grammar's token names
    leading = len(sql) - len(sql.lstrip())
    starts = first is not None and first.name in kinds and first.start == leading
    if not starts:
        assert statement_form(sql) is None
    else:
        assert statement_form(sql) == literal_form(sql)
