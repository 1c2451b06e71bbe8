"""The audit journal's writer: the one piece of the state store on every statement's path.

A statement is journaled (one `write(2)` of one line, or in the gateway a copy into its
memory-mapped spool) before the gateway forwards it, and its outcome is buffered until the
next record. `Store` owns the files (opening, rotation, ingest into SQLite); this module
only appends, and is compiled with the gateway's hot path (see `backstop_core.native`), so
it imports nothing of the store and stays free of async code, which the compiler does not
take.

A record is a JSON array on one line. Times are written as an integer count of nanoseconds
with an exponent (`1765046400123456789e-9` seconds, `1234567e-6` milliseconds): a JSON
number the ingest reads as the same float, for the cost of printing one integer. Formatting
a float, or a decimal fraction, costs several times that on every statement.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# Begins written since the last ingest after which the ingest is woken before its timer.
INGEST_WAKE_RECORDS: Final = 4096
# Buffered audit outcomes written without waiting for the next begin.
PENDING_FINISH_LIMIT: Final = 256
# Template refs a writer remembers having journaled; past this it forgets them all and
# journals each template again before its next use.
DEFINED_TEMPLATES_LIMIT: Final = 65536
# A writer journals each template it uses again at least this often (`renew_templates`):
# the state database keeps a template only while it was journaled in the last
# `store.TEMPLATE_KEEP_SECONDS`, so a session idle for weeks still finds its own.
TEMPLATE_RENEW_SECONDS: Final = 86400.0

# Ends a spool's records: JSON escapes it in every string. An int, not b"\x00": testing
# bytes for a one-byte bytes value first tries it as an int and formats an exception.
_NUL: Final = 0

encode_string: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


@dataclass(frozen=True, slots=True)
class AuditTemplate:
    """An AuditStart encoded for the journal, all but its key, time and SQL text
    (`Store.audit_template`): the record is ["b", key, time] + head + SQL + rest.

    With a `ref` (unique in the journal), `JournalWriter.begin_sql` journals a statement as
    a short ["c", key, time, ref, SQL] record instead, after writing the template itself
    once as ["t", ref, 0] + head + null + rest: most of a record (the session, the decision
    and the classification JSON) is the same for every statement a session's lane forwards.
    """

    head: str
    rest: str
    ref: str = ""

    def with_sql(self, sql: str) -> str:
        """The record after its key and time, for `JournalWriter.begin`."""
        return self.head + encode_string(sql) + self.rest

    def tail(self, sql: str) -> str:
        """A "c" record after its key and time, for `JournalWriter.begin_tail`: a statement
        run again and again (a prepared one) is encoded once."""
        return f',"{self.ref}",{encode_string(sql)}]\n'


class JournalWriter:
    """Appends records to the journal through a descriptor that `opener` provides.

    `begin` returns once its record is in the kernel's page cache, so a killed process
    loses none; outcomes (`forwarded`, `append`) wait in `pending` for the next begin, the
    ingest timer or `PENDING_FINISH_LIMIT`. Single-threaded: the event loop's thread only.
    """

    def __init__(
        self,
        path: str,
        tag: str,
        opener: Callable[[], int],
        wake: Callable[[], None],
        failure: Callable[[str], Exception],
    ) -> None:
        self.path = path
        self.tag = tag  # key prefix; the store re-draws it until unused
        self.fd = -1  # opened on first write by `opener`, which sets it
        self.needs_newline = False  # the file ends inside a line a dead process left
        self.pending: list[str] = []
        self.defined: set[str] = set()  # refs of the templates already journaled
        self.defined_since = time.time()  # when `defined` was last emptied
        self.begins = 0  # since the ingest last ran or was woken
        self.closed = False
        # A memory-mapped spool (`attach_spool`) that records are copied into instead of
        # each costing a write to the journal; `spill` moves its contents to the journal.
        self.spool: mmap.mmap | None = None
        self.spool_size = 0
        self.spool_end = 0  # bytes of records in the spool; all after them are NUL
        self._zeros = memoryview(b"")  # as many NUL bytes as the spool holds
        self._seq = 0
        self._opener = opener
        self._wake = wake
        self._failure = failure

    def begin(self, record: str) -> str:
        """Journal a statement about to be forwarded (`record` from
        `AuditTemplate.with_sql`) and return its key."""
        key = self._next_key()
        # A key is hex, '-' and digits, and the time (in seconds: nanoseconds, then "e-9")
        # is digits: neither needs escaping. The SQL in `record` is escaped as the record
        # encoder escapes strings. Compiled, an f-string is built in one allocation.
        self._emit(f'["b","{key}",{time.time_ns()}e-9{record}')
        return key

    def begin_sql(self, template: AuditTemplate, sql: str) -> str:
        """Journal `sql` with the rest of its record from `template`, and return its key:
        `begin_tail(template, template.tail(sql))` built in one allocation, for statements of
        a shared form, whose texts differ each time."""
        if not template.ref:
            return self.begin(template.with_sql(sql))
        key = self._key_naming(template)
        # A ref is made like a key: nothing in it needs escaping.
        self._emit(f'["c","{key}",{time.time_ns()}e-9,"{template.ref}",{encode_string(sql)}]\n')
        return key

    def begin_tail(self, template: AuditTemplate, tail: str) -> str:
        """Journal a statement whose record after its key and time is `tail` (from
        `template.tail`), and return its key."""
        key = self._key_naming(template)
        self._emit(f'["c","{key}",{time.time_ns()}e-9{tail}')
        return key

    def _next_key(self) -> str:
        self._seq += 1
        return f"{self.tag}{self._seq}"

    def _key_naming(self, template: AuditTemplate) -> str:
        """The next key, for a record naming `template`, which is journaled first if this
        writer has not journaled it yet."""
        if template.ref not in self.defined:
            self._define(template)
        return self._next_key()

    def _define(self, template: AuditTemplate) -> None:
        """Write `template` before the first record that refers to it (buffered: the record
        goes out in the same write). Written again once forgotten: the ingest keeps one."""
        defined = self.defined
        if len(defined) >= DEFINED_TEMPLATES_LIMIT:
            defined.clear()
        defined.add(template.ref)
        self.pending.append(f'["t","{template.ref}",0{template.head}null{template.rest}')

    def renew_templates(self, now: float) -> None:
        """Forget which templates were journaled once `TEMPLATE_RENEW_SECONDS` have passed
        since it was last done, so each is journaled again before its next use. Called from
        the store's timer, never on the statement path."""
        if now - self.defined_since >= TEMPLATE_RENEW_SECONDS or now < self.defined_since:
            self.defined.clear()
            self.defined_since = now

    def _emit(self, line: str) -> None:
        """Write a begin record, after the outcomes buffered before it."""
        pending = self.pending
        if pending:
            pending.append(line)
            line = "".join(pending)
            pending.clear()
        try:
            self.write(line.encode())
        except Exception:
            self.defined.clear()  # a template in this write is not in the journal
            raise
        self.begins += 1
        if self.begins >= INGEST_WAKE_RECORDS:
            self.begins = 0  # once per so many records, however soon the wakee runs
            self._wake()

    def forwarded(self, key: str, elapsed_ns: int) -> None:
        """The outcome of nearly every statement: forwarded, after `elapsed_ns` (written in
        milliseconds: nanoseconds, then "e-6")."""
        self.append(f'["f","{key}","forwarded",{elapsed_ns}e-6,null]\n')

    def append(self, line: str) -> None:
        """Buffer one encoded record (ending in a newline) for the next write."""
        pending = self.pending
        pending.append(line)
        if len(pending) >= PENDING_FINISH_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records now."""
        if self.pending and not self.closed:
            data = "".join(self.pending).encode()
            self.pending.clear()
            self.write(data)

    def attach_spool(self, spool: mmap.mmap) -> None:
        """Copy records into `spool`, a shared mapping of a file of NUL bytes, from now on.

        A record copied into it is in the kernel's page cache like one written with
        `write(2)`, so a killed process loses none, for the cost of a memory copy instead of
        a system call and the file system's work for a small append. `spill` moves the
        spool's records to the journal, in order; the store calls it often, and whoever
        finds the spool of a dead process moves what it holds."""
        self.spool = spool
        self.spool_size = len(spool)
        self.spool_end = 0
        self._zeros = memoryview(bytes(len(spool)))

    def spill(self) -> None:
        """Move the spool's records to the journal (one write) and empty the spool. Zeroed
        from its start: a process killed meanwhile leaves records already in the journal
        after a NUL, where no reader looks."""
        spool = self.spool
        used = self.spool_end
        if spool is None or not used:
            return
        # Written from the mapping and zeroed from a buffer made once: a bytes copy of the
        # records, or of as many zeros, is an allocation too large for the heap, and its new
        # pages fault while the kernel copies them (measured: 1.6 µs a statement).
        with memoryview(spool) as view:
            self.write_journal(view[:used])
            view[:used] = self._zeros[:used]
        self.spool_end = 0

    def detach_spool(self) -> mmap.mmap | None:
        """Move what is buffered and spooled to the journal and stop spooling; returns the
        spool for its owner to release."""
        self.flush()
        self.spill()
        spool, self.spool = self.spool, None
        self._zeros = memoryview(b"")
        return spool

    def write(self, data: bytes) -> None:
        spool = self.spool
        if spool is not None and not self.closed:
            start = self.spool_end
            end = start + len(data)
            if end <= self.spool_size and _NUL not in data:
                spool[start:end] = data
                self.spool_end = end
                return
            # Full (or a record no spool may hold): the spool goes first, keeping the order.
            self.spill()
        self.write_journal(data)

    def write_journal(self, data: bytes | memoryview) -> None:
        """Append `data` to the journal file itself."""
        fd = self.fd
        if fd < 0:
            fd = self._opener()
        if self.needs_newline:
            # A process died in the middle of a line: end that fragment so it cannot swallow
            # this record.
            data = b"\n" + data
            self.needs_newline = False
        try:
            written = os.write(fd, data)
        except OSError as exc:
            self.needs_newline = True
            raise self._failure(f"cannot write the audit journal {self.path}: {exc}") from exc
        if written != len(data):
            self.needs_newline = True
            raise self._failure(f"cannot write the audit journal {self.path}: short write")
