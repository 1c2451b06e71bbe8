"""Message values and their encoding/decoding. Pure functions over bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PROTOCOL_3_0 = 196608  # 3 << 16
PROTOCOL_3_2 = 196610  # 3 << 16 | 2
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
# PostgreSQL refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000
# Protocol 3.2 allows cancel keys up to 256 bytes.
MAX_CANCEL_KEY = 256

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_HEADER = struct.Struct("!ci")


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid v3 message. The connection must close."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# --- startup-phase packets (no type byte) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    params: tuple[tuple[str, str], ...]

    def get(self, name: str, default: str = "") -> str:
        for key, value in self.params:
            if key == name:
                return value
        return default


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSEncRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes


StartupPacket = StartupMessage | SSLRequest | GSSEncRequest | CancelRequest


def decode_startup_packet(body: bytes) -> StartupPacket:
    """Decode a startup-phase packet body (everything after the length word)."""
    if len(body) < 4:
        raise ProtocolViolation("startup packet too short")
    (code,) = _I32.unpack_from(body, 0)
    if code == SSL_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolViolation("malformed SSLRequest")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolViolation("malformed GSSENCRequest")
        return GSSEncRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(body) < 8 + 4 or len(body) > 8 + MAX_CANCEL_KEY:
            raise ProtocolViolation("malformed CancelRequest")
        (pid,) = _I32.unpack_from(body, 4)
        return CancelRequest(pid, bytes(body[8:]))
    major = code >> 16
    if major != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0 to 3.2",
            sqlstate="0A000",
        )
    return StartupMessage(code, _decode_params(body[4:]))


def _decode_params(raw: bytes) -> tuple[tuple[str, str], ...]:
    parts = bytes(raw).split(b"\x00")
    # A well-formed list ends with an empty name, i.e. b"k\0v\0\0" -> [k, v, "", ""].
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"":
        raise ProtocolViolation("startup packet is not terminated")
    items = parts[:-2]
    if len(items) % 2:
        raise ProtocolViolation("startup packet has a parameter without a value")
    try:
        decoded = [p.decode("utf-8") for p in items]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("startup parameters are not valid UTF-8") from exc
    pairs = tuple(zip(decoded[0::2], decoded[1::2], strict=True))
    if any(not name for name, _ in pairs):
        raise ProtocolViolation("startup packet has an empty parameter name")
    return pairs


def encode_startup(protocol: int, params: tuple[tuple[str, str], ...]) -> bytes:
    body = _I32.pack(protocol)
    for name, value in params:
        body += name.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return _I32.pack(len(body) + 4) + body


def encode_cancel_request(pid: int, secret: bytes) -> bytes:
    body = _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(pid) + secret
    return _I32.pack(len(body) + 4) + body


# --- frontend messages the gateway reads ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    sql: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int


@dataclass(frozen=True, slots=True)
class Describe:
    kind: str  # "S" statement or "P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Close:
    kind: str  # "S" statement or "P" portal
    name: str


class _Reader:
    """Cursor over one message body; every read is bounds-checked."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = bytes(buf)
        self.pos = 0

    def cstring(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise ProtocolViolation("string is not NUL-terminated")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("string is not valid UTF-8", sqlstate="22021") from exc

    def int16(self) -> int:
        if self.pos + 2 > len(self.buf):
            raise ProtocolViolation("message too short")
        (value,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def uint16(self) -> int:
        # Counts are unsigned on the wire: PostgreSQL reads them with pq_getmsgint(msg, 2).
        if self.pos + 2 > len(self.buf):
            raise ProtocolViolation("message too short")
        (value,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def int32(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise ProtocolViolation("message too short")
        (value,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolViolation("message too short")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw

    def byte(self) -> str:
        return self.take(1).decode("latin-1")

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolViolation("message has trailing bytes")


def decode_query(body: bytes | memoryview) -> Query:
    r = _Reader(body)
    sql = r.cstring()
    r.end()
    return Query(sql)


def decode_parse(body: bytes | memoryview) -> Parse:
    r = _Reader(body)
    name = r.cstring()
    sql = r.cstring()
    count = r.uint16()
    types = tuple(r.int32() for _ in range(count))
    r.end()
    return Parse(name, sql, types)


def decode_bind(body: bytes | memoryview) -> Bind:
    r = _Reader(body)
    portal = r.cstring()
    statement = r.cstring()
    nformats = r.uint16()
    formats = tuple(r.int16() for _ in range(nformats))
    nparams = r.uint16()
    params: list[bytes | None] = []
    for _ in range(nparams):
        size = r.int32()
        if size == -1:
            params.append(None)
        elif size < -1:
            raise ProtocolViolation("invalid parameter length")
        else:
            params.append(r.take(size))
    nresults = r.uint16()
    results = tuple(r.int16() for _ in range(nresults))
    r.end()
    return Bind(portal, statement, formats, tuple(params), results)


def decode_execute(body: bytes | memoryview) -> Execute:
    r = _Reader(body)
    portal = r.cstring()
    max_rows = r.int32()
    r.end()
    return Execute(portal, max_rows)


def _decode_kind_name(body: bytes | memoryview, what: str) -> tuple[str, str]:
    r = _Reader(body)
    kind = r.byte()
    if kind not in ("S", "P"):
        raise ProtocolViolation(f"invalid {what} target {kind!r}")
    name = r.cstring()
    r.end()
    return kind, name


def decode_describe(body: bytes | memoryview) -> Describe:
    return Describe(*_decode_kind_name(body, "Describe"))


def decode_close(body: bytes | memoryview) -> Close:
    return Close(*_decode_kind_name(body, "Close"))


def encode_query(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + _I32.pack(len(body) + 4) + body


def encode_parse(name: str, sql: str) -> bytes:
    body = name.encode() + b"\x00" + sql.encode() + b"\x00" + _I16.pack(0)
    return b"P" + _I32.pack(len(body) + 4) + body


def encode_sync() -> bytes:
    return b"S\x00\x00\x00\x04"


# --- backend messages the gateway writes or reads -------------------------------------


def _encode_fields(kind: bytes, fields: list[tuple[str, str]]) -> bytes:
    body = b"".join(code.encode() + value.encode() + b"\x00" for code, value in fields) + b"\x00"
    return kind + _I32.pack(len(body) + 4) + body


def encode_error(
    message: str,
    sqlstate: str = "42501",
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse as PostgreSQL writes one (S, V, C, M, then D/H when given)."""
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    return _encode_fields(b"E", fields)


def encode_notice(message: str, *, detail: str | None = None, code: str = "00000") -> bytes:
    fields = [("S", "NOTICE"), ("V", "NOTICE"), ("C", code), ("M", message)]
    if detail:
        fields.append(("D", detail))
    return _encode_fields(b"N", fields)


def encode_ready_for_query(status: str) -> bytes:
    return b"Z\x00\x00\x00\x05" + status.encode("latin-1")


def encode_backend_key_data(pid: int, secret: bytes) -> bytes:
    body = _I32.pack(pid) + secret
    return b"K" + _I32.pack(len(body) + 4) + body


def decode_error_fields(body: bytes | memoryview) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, by their one-letter code."""
    fields: dict[str, str] = {}
    raw = bytes(body)
    pos = 0
    while pos < len(raw) and raw[pos] != 0:
        code = chr(raw[pos])
        end = raw.find(b"\x00", pos + 1)
        if end < 0:
            break
        fields[code] = raw[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields
