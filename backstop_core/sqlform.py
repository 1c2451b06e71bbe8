"""A statement's form: its text with each literal replaced by a marker, as a cache key.

`Classifier` reuses one classification for every statement of a form once classifying one
of them read no literal's value (see `classify._LITERAL_READS`). pglast's `normalize`
computes such a form, at the cost of a full parse; `literal_form` computes it in one pass
over the text, compiled with the gateway's hot path, for about a tenth of that.

It is not a second SQL lexer. It recognizes only what it can delimit exactly as
PostgreSQL's scanner does, with `standard_conforming_strings` on (the gateway refuses every
statement while it is not): plain quoted strings ('it''s', with no prefix letter),
unsigned decimal numbers standing on their own, and double-quoted identifiers. For any
text with something else in it (a comment, a backslash, a dollar sign, an escape, bit or
national string, a number with a suffix or of ten digits or more, an unterminated quote, a
NUL, text that is not valid Unicode) it answers None, and the statement is classified on its
own. So two texts of one form differ only inside literals that PostgreSQL reads as literals
of the same kind, with everything between them identical: their parse trees differ only in
those literals' values.

Unlike `normalize`, it does not parse: a literal whose value PostgreSQL's grammar itself
refuses (`float(99)`, a precision out of range) gives a text of a shared form that the
server, with the same grammar, refuses when it arrives. Nothing of such a text runs.
"""

from __future__ import annotations

from typing import Final

# No form holds a "$" but in its markers: text with one has no form.
STRING_MARK: Final = "$s"  # a quoted string
INTEGER_MARK: Final = "$i"  # digits only
NUMBER_MARK: Final = "$n"  # digits with a fraction or an exponent
_STRING: Final = STRING_MARK.encode()
_INTEGER: Final = INTEGER_MARK.encode()
_NUMBER: Final = NUMBER_MARK.encode()

# By byte, as PostgreSQL's scanner reads bytes: 1 for what may continue an identifier or
# keyword (letters, digits, '_', every byte of a multibyte character), 2 for a digit, 3 for
# a quote. '$' is left out: text with one has no form.
_IDENT: Final = 1
_DIGIT: Final = 2
_QUOTE: Final = 3
_CLASS: Final = bytes(
    _DIGIT
    if 0x30 <= b <= 0x39
    else _QUOTE
    if b in (0x22, 0x27)
    else _IDENT
    if b >= 0x80 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A or b == 0x5F
    else 0
    for b in range(256)
)
_DOT: Final = 0x2E
_SINGLE: Final = 0x27
_AMPERSAND: Final = 0x26
_E: Final = 0x65
_UPPER_E: Final = 0x45
_PLUS: Final = 0x2B
_MINUS: Final = 0x2D


def _digits_end(data: bytes, i: int, end: int) -> int:
    while i < end and _CLASS[data[i]] == _DIGIT:
        i += 1
    return i


# What a statement of the kinds whose classifications are shared starts with (a cheap look,
# to spare the scan for text that cannot be one; the parse tree decides), in lower case.
_STARTS: Final = (b"select", b"insert", b"update", b"delete", b"with")
_TO_LOWER: Final = 0x20  # set in an ASCII letter's byte, it is the lower-case letter
# By byte: 1 for the whitespace PostgreSQL's scanner skips, 2 for an ASCII letter.
_SPACE: Final = 1
_LETTER: Final = 2
_LEAD: Final = bytes(
    _SPACE if b in b" \t\n\r\f\v" else _LETTER if 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A else 0
    for b in range(256)
)


def statement_form(sql: str) -> str | None:
    """`literal_form(sql)` for text that starts with SELECT, INSERT, UPDATE, DELETE or WITH;
    None for any other."""
    data = _scannable(sql)
    if data is None:
        return None
    end = len(data)
    i = 0
    while i < end and _LEAD[data[i]] == _SPACE:
        i += 1
    j = i
    while j < end and _LEAD[data[j]] == _LETTER:
        j += 1
    # Byte tests, not str methods: compiled, indexing bytes is native where each str method
    # (or a slice, upper-cased and hashed to look it up) is a generic call.
    if j - i != 6 and j - i != 4:
        return None
    if j < end and (_CLASS[data[j]] == _IDENT or _CLASS[data[j]] == _DIGIT):
        return None  # a longer word: SELECTED, WITH_x, select1
    if not _starts_shared(data, i, j - i):
        return None
    return _form(data)


def _starts_shared(data: bytes, start: int, size: int) -> bool:
    """Whether the ASCII letters data[start:start + size] spell one of `_STARTS`, in any
    case."""
    for word in _STARTS:
        if len(word) == size:
            k = 0
            while k < size and data[start + k] | _TO_LOWER == word[k]:
                k += 1
            if k == size:
                return True
    return False


def literal_form(sql: str) -> str | None:
    """`sql` with each literal replaced by a marker; None when it has no literal or holds
    anything this function does not delimit exactly (see the module's docstring)."""
    data = _scannable(sql)
    return None if data is None else _form(data)


def _scannable(sql: str) -> bytes | None:
    """`sql` as UTF-8, or None when it holds what no form may: a dollar sign, a backslash, a
    NUL, a comment, or text that is not valid Unicode."""
    if "$" in sql or "\\" in sql or "\x00" in sql or "--" in sql or "/*" in sql:
        return None
    try:
        return sql.encode()
    except UnicodeEncodeError:
        return None  # not valid text (a lone surrogate): it does not parse


def _form(data: bytes) -> str | None:
    parts: list[bytes] = []
    end = len(data)
    start = 0  # of the text not yet copied into parts
    i = 0
    while i < end:
        kind = _CLASS[data[i]]
        if kind == 0 or kind == _IDENT:
            i += 1
        elif kind == _QUOTE:
            quote = data[i]
            if i > 0:
                before = data[i - 1]
                if before == _AMPERSAND or _CLASS[before] == _IDENT or _CLASS[before] == _DIGIT:
                    return None  # E'', B'', X'', N'', U&'': prefixed strings and identifiers
            j = i + 1
            while True:
                j = data.find(quote, j)
                if j < 0:
                    return None  # unterminated
                if j + 1 < end and data[j + 1] == quote:
                    j += 2  # a doubled quote stands for one
                    continue
                break
            if j == i + 1 and quote != _SINGLE:
                return None  # "": a zero-length identifier, which does not parse
            if quote == _SINGLE:
                parts.append(data[start:i])
                parts.append(_STRING)
                start = j + 1
            i = j + 1
        else:  # a digit
            if i > 0:
                before = data[i - 1]
                if before == _DOT:
                    return None  # .5, a.1
                if _CLASS[before] == _IDENT or _CLASS[before] == _DIGIT:
                    i += 1  # a digit inside an identifier (t1)
                    continue
            j = _digits_end(data, i, end)
            if j - i > 9:
                return None  # past 2**31 the scanner reads a number of another kind
            mark = _INTEGER
            if j + 1 < end and data[j] == _DOT and _CLASS[data[j + 1]] == _DIGIT:
                j = _digits_end(data, j + 1, end)
                mark = _NUMBER
            if j + 1 < end and (data[j] == _E or data[j] == _UPPER_E):
                k = j + 1
                if data[k] == _PLUS or data[k] == _MINUS:
                    k += 1
                if k < end and _CLASS[data[k]] == _DIGIT:
                    j = _digits_end(data, k, end)
                    mark = _NUMBER
            if j < end:
                after = data[j]
                if after == _DOT or _CLASS[after] == _IDENT or _CLASS[after] == _DIGIT:
                    return None  # 1.e5, 1., 0x1F, 1_000, 12abc: left to PostgreSQL
            parts.append(data[start:i])
            parts.append(mark)
            start = i = j
    if not parts:
        return None
    parts.append(data[start:])
    return b"".join(parts).decode()
