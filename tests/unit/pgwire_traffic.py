"""PostgreSQL v3 traffic built byte by byte, the way libpq and PostgreSQL 17 write it.

The builders here do not use the codec under test: each one spells out the layout from the
protocol documentation, so a test that compares codec output with them compares two
independent writings of the same message.
"""

from __future__ import annotations

import struct

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = 3 << 16 | 2


def i16(value: int) -> bytes:
    return struct.pack("!h", value)


def i32(value: int) -> bytes:
    return struct.pack("!i", value)


def cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\x00"


def frame(kind: bytes, body: bytes) -> bytes:
    """A typed message: one type byte, an Int32 length that counts itself, the body."""
    return kind + i32(len(body) + 4) + body


def packet(body: bytes) -> bytes:
    """An untyped startup-phase packet."""
    return i32(len(body) + 4) + body


# --- frontend: startup phase -----------------------------------------------------------


def startup(params: list[tuple[str, str]], protocol: int = PROTOCOL_3_0) -> bytes:
    body = i32(protocol) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\x00"
    return packet(body)


def ssl_request() -> bytes:
    return packet(i32(80877103))


def gssenc_request() -> bytes:
    return packet(i32(80877104))


def cancel_request(pid: int, key: bytes) -> bytes:
    return packet(i32(80877102) + i32(pid) + key)


# --- frontend: after startup ------------------------------------------------------------


def query(sql: str) -> bytes:
    return frame(b"Q", cstr(sql))


def parse(name: str | bytes, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return frame(b"P", cstr(name) + cstr(sql) + i16(len(types)) + b"".join(map(i32, types)))


def bind(
    portal: str | bytes,
    statement: str | bytes,
    params: tuple[bytes | None, ...] = (),
    formats: tuple[int, ...] = (),
    result_formats: tuple[int, ...] = (),
) -> bytes:
    body = cstr(portal) + cstr(statement)
    body += i16(len(formats)) + b"".join(map(i16, formats))
    body += i16(len(params))
    for value in params:
        body += i32(-1) if value is None else i32(len(value)) + value
    body += i16(len(result_formats)) + b"".join(map(i16, result_formats))
    return frame(b"B", body)


def describe(kind: str, name: str | bytes = "") -> bytes:
    return frame(b"D", kind.encode() + cstr(name))


def execute(portal: str | bytes = "", max_rows: int = 0) -> bytes:
    return frame(b"E", cstr(portal) + i32(max_rows))


def close(kind: str, name: str | bytes = "") -> bytes:
    return frame(b"C", kind.encode() + cstr(name))


def sync() -> bytes:
    return frame(b"S", b"")


def flush() -> bytes:
    return frame(b"H", b"")


def copy_data(data: bytes) -> bytes:
    return frame(b"d", data)


def copy_done() -> bytes:
    return frame(b"c", b"")


def copy_fail(message: str) -> bytes:
    return frame(b"f", cstr(message))


def password(secret: str) -> bytes:
    return frame(b"p", cstr(secret))


def function_call(oid: int, args: tuple[bytes, ...] = ()) -> bytes:
    body = i32(oid) + i16(0) + i16(len(args))
    body += b"".join(i32(len(a)) + a for a in args)
    body += i16(0)
    return frame(b"F", body)


def terminate() -> bytes:
    return frame(b"X", b"")


# --- backend ---------------------------------------------------------------------------


def auth_ok() -> bytes:
    return frame(b"R", i32(0))


def auth_md5(salt: bytes = b"\x01\x02\x03\x04") -> bytes:
    return frame(b"R", i32(5) + salt)


def auth_sasl(*mechanisms: str) -> bytes:
    return frame(b"R", i32(10) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    return frame(b"K", i32(pid) + key)


def ready(status: str = "I") -> bytes:
    return frame(b"Z", status.encode())


def row_description(*columns: str) -> bytes:
    body = i16(len(columns))
    for name in columns:
        # table oid, column number, type oid (text), size, modifier, format
        body += cstr(name) + i32(0) + i16(0) + i32(25) + i16(-1) + i32(-1) + i16(0)
    return frame(b"T", body)


def data_row(*values: bytes | None) -> bytes:
    body = i16(len(values))
    for value in values:
        body += i32(-1) if value is None else i32(len(value)) + value
    return frame(b"D", body)


def command_complete(tag: str) -> bytes:
    return frame(b"C", cstr(tag))


def error_response(message: str, sqlstate: str, severity: str = "ERROR") -> bytes:
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    fields += [("F", "parse_relation.c"), ("L", "1449"), ("R", "parserOpenTable")]
    return frame(b"E", b"".join(k.encode() + cstr(v) for k, v in fields) + b"\x00")


def notice_response(message: str) -> bytes:
    fields = [("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", message)]
    return frame(b"N", b"".join(k.encode() + cstr(v) for k, v in fields) + b"\x00")


def notification(pid: int, channel: str, payload: str) -> bytes:
    return frame(b"A", i32(pid) + cstr(channel) + cstr(payload))


def parse_complete() -> bytes:
    return frame(b"1", b"")


def bind_complete() -> bytes:
    return frame(b"2", b"")


def close_complete() -> bytes:
    return frame(b"3", b"")


def no_data() -> bytes:
    return frame(b"n", b"")


def copy_in_response(columns: int) -> bytes:
    return frame(b"G", b"\x00" + i16(columns) + i16(0) * columns)


# --- whole conversations ---------------------------------------------------------------

CLIENT_STARTUP = startup([("user", "agent"), ("database", "shop"), ("application_name", "psql")])

# What a client sends after the startup packet: a simple query, a prepared statement run
# through the extended protocol, a COPY, and the goodbye.
CLIENT_FRAMES: list[bytes] = [
    query("SELECT id, name FROM customers WHERE id = 1"),
    parse("s1", "SELECT * FROM orders WHERE customer_id = $1", (23,)),
    bind("", "s1", (b"42",), (0,), (1,)),
    describe("P"),
    execute("", 0),
    sync(),
    bind("p1", "s1", (None,)),
    execute("p1", 10),
    flush(),
    close("P", "p1"),
    close("S", "s1"),
    sync(),
    query("COPY orders FROM STDIN"),
    copy_data(b"1\t42\t9.99\n"),
    copy_data(b"2\t42\t19.99\n"),
    copy_done(),
    terminate(),
]
CLIENT_TRAFFIC = CLIENT_STARTUP + b"".join(CLIENT_FRAMES)

SERVER_STARTUP: list[bytes] = [
    auth_ok(),
    parameter_status("application_name", "psql"),
    parameter_status("client_encoding", "UTF8"),
    parameter_status("server_version", "17.2"),
    parameter_status("TimeZone", "UTC"),
    backend_key_data(4242, b"\x0b\xad\xca\xfe"),
    ready("I"),
]
SERVER_FRAMES: list[bytes] = [
    *SERVER_STARTUP,
    row_description("id", "name"),
    data_row(b"1", b"Ada"),
    command_complete("SELECT 1"),
    ready("I"),
    parse_complete(),
    bind_complete(),
    row_description("id", "customer_id", "total"),
    data_row(b"7", b"42", None),
    data_row(b"8", b"42", b"x" * 300),
    command_complete("SELECT 2"),
    ready("I"),
    notice_response("there is no transaction in progress"),
    error_response('relation "nope" does not exist', "42P01"),
    ready("E"),
    notification(4242, "jobs", "done"),
    copy_in_response(3),
    command_complete("COPY 2"),
    ready("I"),
]
SERVER_TRAFFIC = b"".join(SERVER_FRAMES)

# Message types BackendScanner holds back until whole.
WATCHED = frozenset(b"ZESKR1")
