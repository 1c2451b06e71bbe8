"""The journal writer: the records it appends are the JSON the ingest reads."""

from __future__ import annotations

import json
import os
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstop_core.journal import AuditTemplate, JournalWriter


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


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_a_duration_reads_back_as_the_exact_number_of_milliseconds(elapsed_ns: int) -> None:
    writer = JournalWriter("unused", "abc-", lambda: -1, lambda: None, WriteFailed)
    writer.forwarded("abc-1", elapsed_ns)
    (line,) = writer.pending
    exact = float(Decimal(elapsed_ns).scaleb(-6))
    # orjson is the ingest's parser; the standard library reads the line alike.
    assert orjson.loads(line)[3] == exact == json.loads(line)[3]


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
    assert lines[1] == ["f", first, "forwarded", 1.234567, None]
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


def test_a_template_is_journaled_once_before_the_records_that_name_it(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    writer, opened = writer_at(path)
    template = AuditTemplate(',"s1","agent","client",', ',"select",[]]\t[]\n', "abc-t1")
    first = writer.begin_sql(template, 'SELECT "x"\n')
    second = writer.begin_tail(template, template.tail("SELECT 2"))
    lines = [json.loads(line.split("\t")[0]) for line in path.read_text().splitlines()]
    assert lines[0] == ["t", "abc-t1", 0, "s1", "agent", "client", None, "select", []]
    assert [line[:2] for line in lines[1:]] == [["c", first], ["c", second]]
    assert [line[3:] for line in lines[1:]] == [["abc-t1", 'SELECT "x"\n'], ["abc-t1", "SELECT 2"]]

    # A write that fails may have taken a template with it: each is journaled again.
    os.close(opened[0])
    with pytest.raises(WriteFailed):
        writer.begin_sql(AuditTemplate(",", "]\n", "abc-t2"), "SELECT 3")
    writer.fd = -1
    writer.begin_sql(template, "SELECT 4")
    lines = [line for line in path.read_text().splitlines() if line]
    assert [json.loads(line.split("\t")[0])[:2] for line in lines[-2:]] == [
        ["t", "abc-t1"],
        ["c", "abc-4"],
    ]


def test_a_template_without_a_ref_journals_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    writer, _ = writer_at(path)
    key = writer.begin_sql(
        AuditTemplate(',"s1","agent","client",', ',"select",[]]\t[]\n'), "SELECT 1"
    )
    [line] = path.read_text().splitlines()
    assert json.loads(line.split("\t")[0])[:2] == ["b", key]
