"""The journal writer: the records it appends are the JSON the ingest reads."""

from __future__ import annotations

import json
import os
import time
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstop_core.journal import AuditTemplate, JournalWriter, decimal_fraction


class WriteFailed(Exception):
    pass


def writer_at(path: Path) -> tuple[JournalWriter, list[int]]:
    opened: list[int] = []
    wakes: list[int] = []

    def opener() -> int:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        opened.append(fd)
        writer.fd = fd
        return fd

    writer = JournalWriter(str(path), "abc-", opener, lambda: wakes.append(1), WriteFailed)
    return writer, opened


@given(st.integers(min_value=0, max_value=10**18), st.integers(min_value=1, max_value=9))
def test_decimal_fraction_is_the_exact_json_number(value: int, digits: int) -> None:
    text = decimal_fraction(value, digits)
    assert Decimal(text) == Decimal(value).scaleb(-digits)
    assert len(text.split(".")[1]) == digits
    assert json.loads(text) == pytest.approx(value / 10**digits)


def test_small_values_keep_their_leading_zeros() -> None:
    assert decimal_fraction(0, 3) == "0.000"
    assert decimal_fraction(7, 3) == "0.007"
    assert decimal_fraction(1_000, 3) == "1.000"
    assert decimal_fraction(1_765_046_400_000_001, 6) == "1765046400.000001"


def test_begin_writes_one_line_after_the_buffered_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    writer, opened = writer_at(path)
    template = AuditTemplate(',"s1","agent","client",', ',"select",[]]\t[]\n')
    before = time.time()
    first = writer.begin(template.with_sql('SELECT "x"\n'))
    writer.forwarded(first, 1_234_567)
    assert path.read_bytes().count(b"\n") == 1  # the outcome waits for the next write
    second = writer.begin(template.with_sql("SELECT 2"))
    after = time.time()
    writer.flush()

    lines = [json.loads(line.split("\t")[0]) for line in path.read_text().splitlines()]
    assert [line[:2] for line in lines] == [["b", first], ["f", first], ["b", second]]
    assert first != second and first.startswith("abc-")
    assert before - 1e-6 <= lines[0][2] <= after + 1e-6
    assert lines[0][6] == 'SELECT "x"\n'
    assert lines[1] == ["f", first, "forwarded", 1.234, None]
    assert len(opened) == 1 and writer.begins == 2


def test_a_failed_write_raises_the_stores_error_and_ends_the_fragment(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    writer, opened = writer_at(path)
    writer.begin("]\n")
    os.close(opened[0])  # the descriptor goes bad under the writer
    with pytest.raises(WriteFailed, match="cannot write the audit journal"):
        writer.begin("]\n")
    assert writer.needs_newline
    writer.fd = -1
    writer.begin("]\n")
    lines = path.read_text().splitlines()
    # The failed record is not in the file; an empty line ends whatever it may have left.
    assert [line[:13] for line in lines] == ['["b","abc-1",', "", '["b","abc-3",']
