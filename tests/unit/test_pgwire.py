"""The pgwire codec and framing, bytes in and bytes out.

Every expected byte string is spelled out from the protocol documentation (see
pgwire_traffic), not produced by the code under test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from backstop_core.gateway.pgwire import (
    MAX_STARTUP_PACKET,
    BackendScanner,
    Bind,
    CancelRequest,
    Close,
    Describe,
    Execute,
    FrameReader,
    GSSEncRequest,
    Parse,
    ProtocolViolation,
    Query,
    SSLRequest,
    StartupMessage,
    StartupReader,
    decode_bind,
    decode_close,
    decode_describe,
    decode_error_fields,
    decode_execute,
    decode_parse,
    decode_query,
    decode_startup_packet,
    encode_backend_key_data,
    encode_cancel_request,
    encode_error,
    encode_notice,
    encode_parse,
    encode_query,
    encode_ready_for_query,
    encode_startup,
    encode_sync,
)
from tests.unit import pgwire_traffic as t


def body_of(packet: bytes) -> bytes:
    """The body of a startup-phase packet (after its length word)."""
    return packet[4:]


def typed_body(message: bytes) -> bytes:
    """The body of a typed message (after its type byte and length word)."""
    return message[5:]


# --- startup packets --------------------------------------------------------------------


def test_startup_3_0_with_params() -> None:
    raw = t.startup([("user", "alice"), ("database", "shop"), ("application_name", "psql")])
    assert raw == (
        b"\x00\x00\x00\x38\x00\x03\x00\x00user\x00alice\x00database\x00shop\x00"
        b"application_name\x00psql\x00\x00"
    )
    packet = decode_startup_packet(body_of(raw))
    assert packet == StartupMessage(
        t.PROTOCOL_3_0, (("user", "alice"), ("database", "shop"), ("application_name", "psql"))
    )
    assert packet.get("database") == "shop"
    assert packet.get("options", "none") == "none"


def test_startup_3_2_protocol_number() -> None:
    packet = decode_startup_packet(body_of(t.startup([("user", "bob")], t.PROTOCOL_3_2)))
    assert packet == StartupMessage(196610, (("user", "bob"),))


def test_startup_keeps_empty_values_and_protocol_options() -> None:
    raw = t.startup([("user", "bob"), ("options", ""), ("_pq_.command_trace", "on")])
    packet = decode_startup_packet(body_of(raw))
    assert isinstance(packet, StartupMessage)
    assert packet.params == (("user", "bob"), ("options", ""), ("_pq_.command_trace", "on"))


def test_startup_without_params_is_just_the_terminator() -> None:
    assert decode_startup_packet(b"\x00\x03\x00\x00\x00") == StartupMessage(t.PROTOCOL_3_0, ())


def test_encode_startup_writes_what_libpq_writes() -> None:
    params = (("user", "alice"), ("database", "shop"))
    assert encode_startup(t.PROTOCOL_3_2, params) == t.startup(list(params), t.PROTOCOL_3_2)
    assert decode_startup_packet(body_of(encode_startup(t.PROTOCOL_3_0, params))) == (
        StartupMessage(t.PROTOCOL_3_0, params)
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (b"user\x00alice\x00", "not terminated"),  # no final empty name
        (b"user\x00alice", "not terminated"),
        (b"", "not terminated"),
        (b"user\x00alice\x00\x00trailing", "not terminated"),
        (b"user\x00alice\x00database\x00\x00", "without a value"),
        (b"user\x00alice\x00\x00\x00", "without a value"),
        (b"\x00alice\x00\x00", "empty parameter name"),
        (b"user\x00al\xffice\x00\x00", "UTF-8"),
    ],
)
def test_malformed_startup_params_are_protocol_violations(params: bytes, message: str) -> None:
    with pytest.raises(ProtocolViolation, match=message) as caught:
        decode_startup_packet(t.i32(t.PROTOCOL_3_0) + params)
    assert caught.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("protocol", "shown"), [(2 << 16, "2.0"), (4 << 16, "4.0"), (1234 << 16 | 5677, "1234.5677")]
)
def test_unsupported_major_version_is_feature_not_supported(protocol: int, shown: str) -> None:
    with pytest.raises(ProtocolViolation, match=f"unsupported frontend protocol {shown}") as caught:
        decode_startup_packet(t.i32(protocol) + b"user\x00alice\x00\x00")
    assert caught.value.sqlstate == "0A000"


def test_startup_body_shorter_than_a_protocol_number() -> None:
    with pytest.raises(ProtocolViolation, match="too short"):
        decode_startup_packet(b"\x00\x03\x00")


def test_ssl_and_gssenc_requests() -> None:
    assert t.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert decode_startup_packet(body_of(t.ssl_request())) == SSLRequest()
    assert t.gssenc_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert decode_startup_packet(body_of(t.gssenc_request())) == GSSEncRequest()


@pytest.mark.parametrize("code", [80877103, 80877104])
def test_ssl_or_gssenc_request_with_extra_bytes(code: int) -> None:
    with pytest.raises(ProtocolViolation, match="malformed"):
        decode_startup_packet(t.i32(code) + b"\x00")


@pytest.mark.parametrize(
    "key",
    [b"\xde\xad\xbe\xef", bytes(range(32)), b"\x07" * 256],
    ids=["3.0-four-bytes", "3.2-32-bytes", "3.2-longest"],
)
def test_cancel_request_keys(key: bytes) -> None:
    raw = t.cancel_request(4242, key)
    assert decode_startup_packet(body_of(raw)) == CancelRequest(4242, key)
    assert encode_cancel_request(4242, key) == raw


@pytest.mark.parametrize("key", [b"", b"\x01\x02\x03", b"\x07" * 257])
def test_cancel_request_key_of_bad_size(key: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="malformed CancelRequest"):
        decode_startup_packet(body_of(t.cancel_request(4242, key)))


# --- frontend messages ------------------------------------------------------------------


def test_query() -> None:
    raw = t.query("SELECT 1")
    assert raw == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert decode_query(typed_body(raw)) == Query("SELECT 1")
    assert decode_query(memoryview(raw)[5:]) == Query("SELECT 1")
    assert encode_query("SELECT 1") == raw


def test_query_utf8_text() -> None:
    raw = encode_query("SELECT 'café ☕'")
    assert raw == t.query("SELECT 'café ☕'")
    assert decode_query(typed_body(raw)).sql == "SELECT 'café ☕'"


@pytest.mark.parametrize(
    ("body", "message", "sqlstate"),
    [
        (b"SELECT 1", "not NUL-terminated", "08P01"),
        (b"SELECT 1\x00DROP TABLE t\x00", "trailing bytes", "08P01"),
        (b"SELECT '\xff'\x00", "UTF-8", "22021"),
    ],
)
def test_malformed_query(body: bytes, message: str, sqlstate: str) -> None:
    with pytest.raises(ProtocolViolation, match=message) as caught:
        decode_query(body)
    assert caught.value.sqlstate == sqlstate


def test_parse() -> None:
    raw = t.parse("s1", "SELECT $1::int + $2", (23, 0))
    assert decode_parse(typed_body(raw)) == Parse("s1", "SELECT $1::int + $2", (23, 0))


def test_encode_parse_unnamed_without_types() -> None:
    raw = encode_parse("", "SELECT 1")
    assert raw == b"P\x00\x00\x00\x10\x00SELECT 1\x00\x00\x00"
    assert decode_parse(typed_body(raw)) == Parse("", "SELECT 1", ())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"s1\x00SELECT 1\x00\xff\xff", "message too short"),
        (b"s1\x00SELECT 1\x00\x00\x02\x00\x00\x00\x17", "too short"),  # two types, one sent
        (b"s1\x00SELECT 1\x00\x00", "too short"),  # half a count
        (b"s1\x00SELECT 1", "not NUL-terminated"),
        (b"s1\x00SELECT 1\x00\x00\x00\x00", "trailing bytes"),
    ],
)
def test_malformed_parse(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolViolation, match=message):
        decode_parse(body)


def test_bind_text_params_with_null() -> None:
    raw = t.bind("", "s1", (b"42", None, b""))
    assert raw == (
        b"B\x00\x00\x00\x1c\x00s1\x00\x00\x00\x00\x03"
        b"\x00\x00\x00\x0242\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00"
    )
    assert decode_bind(typed_body(raw)) == Bind("", "s1", (), (b"42", None, b""), ())


def test_bind_binary_formats() -> None:
    raw = t.bind("p1", "s1", (b"\x00\x00\x00\x2a", b"abc"), (1, 0), (1,))
    assert decode_bind(memoryview(raw)[5:]) == Bind(
        "p1", "s1", (1, 0), (b"\x00\x00\x00\x2a", b"abc"), (1,)
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00s1\x00\xff\xff\x00\x00\x00\x00", "message too short"),
        (b"\x00s1\x00\x00\x00\xff\xfe\x00\x00", "message too short"),
        (b"\x00s1\x00\x00\x00\x00\x00\xff\xff", "message too short"),
        (b"\x00s1\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00", "invalid parameter length"),
        (b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x05ab", "too short"),  # value truncated
        (b"\x00s1\x00\x00\x00\x00\x02\x00\x00\x00\x0142", "too short"),  # second value missing
        (b"\x00s1\x00\x00\x00\x00\x00", "too short"),  # result count missing
        (b"\x00s1\x00\x00\x00\x00\x00\x00\x00\x00", "trailing bytes"),
        (b"\x00s1", "not NUL-terminated"),
    ],
)
def test_malformed_bind(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolViolation, match=message):
        decode_bind(body)


def test_bind_with_more_than_32767_params_decodes_like_postgresql() -> None:
    # PostgreSQL (exec_bind_message) reads the counts with pq_getmsgint(msg, 2), which is
    # unsigned, and libpq and pgjdbc send up to 65535 parameters in one bulk INSERT.
    count = 40000
    body = b"\x00s1\x00" + t.i16(0) + b"\x9c\x40" + (t.i32(1) + b"7") * count + t.i16(0)
    assert len(decode_bind(body).params) == count


def test_parse_with_more_than_32767_types_decodes_like_postgresql() -> None:
    body = b"s1\x00INSERT INTO t VALUES ($1)\x00" + b"\x9c\x40" + t.i32(0) * 40000
    assert len(decode_parse(body).param_types) == 40000


def test_execute() -> None:
    raw = t.execute("p1", 100)
    assert raw == b"E\x00\x00\x00\x0bp1\x00\x00\x00\x00\x64"
    assert decode_execute(typed_body(raw)) == Execute("p1", 100)
    assert decode_execute(typed_body(t.execute())) == Execute("", 0)


@pytest.mark.parametrize(
    "body", [b"p1\x00\x00\x00", b"p1\x00", b"p1", b"p1\x00\x00\x00\x00\x00\x00"]
)
def test_malformed_execute(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode_execute(body)


@pytest.mark.parametrize("kind", ["S", "P"])
def test_describe_and_close(kind: str) -> None:
    assert decode_describe(typed_body(t.describe(kind, "s1"))) == Describe(kind, "s1")
    assert decode_close(typed_body(t.close(kind, ""))) == Close(kind, "")


@pytest.mark.parametrize("decode", [decode_describe, decode_close])
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"Xs1\x00", "target 'X'"),
        (b"s\x00", "target 's'"),
        (b"", "too short"),
        (b"S", "not NUL-terminated"),
        (b"Ss1\x00\x00", "trailing bytes"),
    ],
)
def test_malformed_describe_and_close(
    decode: Callable[[bytes], object], body: bytes, message: str
) -> None:
    with pytest.raises(ProtocolViolation, match=message):
        decode(body)


def test_sync() -> None:
    assert encode_sync() == t.sync() == b"S\x00\x00\x00\x04"


# --- backend messages the gateway writes ------------------------------------------------


def test_encode_error_field_layout_as_postgresql_writes_it() -> None:
    raw = encode_error(
        "backstop: DROP TABLE is not allowed",
        "42501",
        detail="policy rule no-drops",
        hint="ask an operator",
    )
    body = (
        b"SERROR\x00VERROR\x00C42501\x00Mbackstop: DROP TABLE is not allowed\x00"
        b"Dpolicy rule no-drops\x00Hask an operator\x00\x00"
    )
    assert raw == b"E" + t.i32(len(body) + 4) + body


def test_encode_error_without_detail_or_hint() -> None:
    assert encode_error("no", "08006", severity="FATAL") == t.frame(
        b"E", b"SFATAL\x00VFATAL\x00C08006\x00Mno\x00\x00"
    )
    assert encode_error("no") == t.frame(b"E", b"SERROR\x00VERROR\x00C42501\x00Mno\x00\x00")


def test_encode_notice() -> None:
    assert encode_notice("waiting for approval", detail="ticket 7") == t.frame(
        b"N", b"SNOTICE\x00VNOTICE\x00C00000\x00Mwaiting for approval\x00Dticket 7\x00\x00"
    )
    assert encode_notice("hi", code="01000") == t.frame(
        b"N", b"SNOTICE\x00VNOTICE\x00C01000\x00Mhi\x00\x00"
    )


def test_decode_error_fields_round_trip() -> None:
    raw = encode_error("déjà vu", "23505", detail="Key (id)=(1) exists.", hint="use upsert")
    assert decode_error_fields(typed_body(raw)) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "23505",
        "M": "déjà vu",
        "D": "Key (id)=(1) exists.",
        "H": "use upsert",
    }


def test_decode_error_fields_of_a_server_error() -> None:
    fields = decode_error_fields(memoryview(t.error_response("boom", "42P01"))[5:])
    assert fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42P01",
        "M": "boom",
        "F": "parse_relation.c",
        "L": "1449",
        "R": "parserOpenTable",
    }


def test_decode_error_fields_tolerates_garbage() -> None:
    assert decode_error_fields(b"Mhalf") == {}
    assert decode_error_fields(b"M\xff\xfe\x00\x00") == {"M": "\ufffd\ufffd"}
    assert decode_error_fields(b"") == {}


def test_ready_for_query_and_backend_key_data() -> None:
    assert encode_ready_for_query("T") == b"Z\x00\x00\x00\x05T" == t.ready("T")
    assert encode_backend_key_data(7, b"\x01\x02\x03\x04") == t.backend_key_data(
        7, b"\x01\x02\x03\x04"
    )
    assert encode_backend_key_data(7, bytes(32)) == t.backend_key_data(7, bytes(32))


# --- StartupReader ----------------------------------------------------------------------


def test_startup_reader_one_byte_at_a_time() -> None:
    raw = t.CLIENT_STARTUP
    reader = StartupReader()
    for i, byte in enumerate(raw[:-1]):
        reader.feed(bytes([byte]))
        assert reader.next_packet() is None
        assert reader.pending == i + 1
    reader.feed(raw[-1:])
    assert reader.next_packet() == body_of(raw)
    assert reader.pending == 0
    assert reader.next_packet() is None


def test_startup_reader_ssl_request_then_startup_in_one_chunk() -> None:
    reader = StartupReader()
    reader.feed(t.ssl_request() + t.CLIENT_STARTUP + b"Q\x00")
    assert reader.next_packet() == body_of(t.ssl_request())
    assert reader.pending == len(t.CLIENT_STARTUP) + 2
    assert reader.next_packet() == body_of(t.CLIENT_STARTUP)
    assert reader.take_rest() == b"Q\x00"
    assert reader.pending == 0


def test_startup_reader_accepts_the_longest_packet() -> None:
    reader = StartupReader()
    value = "x" * (MAX_STARTUP_PACKET - 4 - 4 - len("options") - 3)
    raw = t.startup([("options", value)])
    assert len(raw) == MAX_STARTUP_PACKET
    reader.feed(raw)
    assert reader.next_packet() == body_of(raw)


@pytest.mark.parametrize("length", [MAX_STARTUP_PACKET + 1, 2**31 - 1, 7, 4, 0, -1])
def test_startup_reader_rejects_bad_length_from_the_length_word_alone(length: int) -> None:
    reader = StartupReader()
    reader.feed(t.i32(length)[:3])
    with pytest.raises(ProtocolViolation, match=f"invalid startup packet length {length}"):
        reader.feed(t.i32(length)[3:])


# --- FrameReader ------------------------------------------------------------------------

FRAMES = [t.query("SELECT 1"), t.parse("", "SELECT 2"), t.bind("", ""), t.execute(), t.sync()]


def test_frame_reader_one_byte_at_a_time() -> None:
    stream = b"".join(FRAMES)
    reader = FrameReader(1024)
    got: list[tuple[int, bytes]] = []
    boundaries = {sum(map(len, FRAMES[: i + 1])) for i in range(len(FRAMES))}
    for i in range(len(stream)):
        frames = reader.feed(stream[i : i + 1])
        if i + 1 in boundaries:
            assert len(frames) == 1
        else:
            assert frames == []
        assert reader.whole is False
        got.extend(frames)
    assert got == [(f[0], f) for f in FRAMES]
    assert reader.pending == 0


def test_frame_reader_many_frames_in_one_chunk_is_whole() -> None:
    stream = b"".join(FRAMES)
    reader = FrameReader(1024)
    frames = reader.feed(stream)
    assert frames == [(f[0], f) for f in FRAMES]
    assert reader.whole is True
    # A chunk that is exactly one frame hands back the chunk itself.
    sync = t.sync()
    assert reader.feed(sync)[0][1] is sync
    assert reader.whole is True


def test_frame_reader_whole_is_false_with_a_partial_frame_before_or_after() -> None:
    reader = FrameReader(1024)
    q = t.query("SELECT 1")
    assert reader.feed(q + q[:3]) == [(ord("Q"), q)]
    assert reader.whole is False
    assert reader.pending == 3
    assert reader.feed(q[3:] + q) == [(ord("Q"), q), (ord("Q"), q)]
    assert reader.whole is False  # the first frame began in the previous chunk
    assert reader.feed(q) == [(ord("Q"), q)]
    assert reader.whole is True


@pytest.mark.parametrize("byte", [b"A", b"\x00", b"Z", b"q", b"\xff"])
def test_frame_reader_rejects_unknown_type_on_its_first_byte(byte: bytes) -> None:
    reader = FrameReader(1024)
    with pytest.raises(ProtocolViolation, match="invalid frontend message type"):
        reader.feed(byte)
    reader = FrameReader(1024)
    with pytest.raises(ProtocolViolation, match="invalid frontend message type"):
        reader.feed(t.sync() + byte)


def test_frame_reader_rejects_oversized_length_before_the_body() -> None:
    reader = FrameReader(1024)
    assert reader.feed(b"Q\x00\x00\x04") == []
    with pytest.raises(ProtocolViolation, match=r"message length 1025 is outside 4\.\.1024"):
        reader.feed(b"\x01")


def test_frame_reader_accepts_exactly_max_message_size() -> None:
    msg = t.query("x" * (1024 - 4 - 1))
    assert len(msg) == 1025
    assert FrameReader(1024).feed(msg) == [(ord("Q"), msg)]


@pytest.mark.parametrize("length", [3, 0, -1, -(2**31)])
def test_frame_reader_rejects_length_below_four(length: int) -> None:
    with pytest.raises(ProtocolViolation, match=f"message length {length} is outside"):
        FrameReader(1024).feed(b"S" + t.i32(length))


def test_frame_reader_huge_declared_length_raises_instead_of_buffering() -> None:
    reader = FrameReader(64 * 1024 * 1024)
    with pytest.raises(ProtocolViolation):
        reader.feed(b"d" + t.i32(2**31 - 1) + b"x" * 100)


# --- BackendScanner ---------------------------------------------------------------------

BACKEND = [
    t.auth_ok(),
    t.parameter_status("TimeZone", "UTC"),
    t.backend_key_data(4242, b"\x0b\xad\xca\xfe"),
    t.ready("I"),
    t.row_description("id"),
    t.data_row(b"1"),
    t.command_complete("SELECT 1"),
    t.error_response("boom", "42P01"),
    t.notice_response("hello"),
    t.ready("E"),
]
BACKEND_STREAM = b"".join(BACKEND)
WATCHED_MESSAGES = [m for m in BACKEND if m[0] in t.WATCHED]
OFFSETS = [sum(map(len, BACKEND[:i])) for i in range(len(BACKEND) + 1)]


def scan(scanner: BackendScanner, chunks: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Feed chunks; return every `out` and every watched message cut out of its `out`."""
    outs: list[bytes] = []
    messages: list[bytes] = []
    for chunk in chunks:
        out, events = scanner.feed(chunk)
        outs.append(out)
        for kind, start, stop in events:
            assert out[start] == kind
            messages.append(out[start:stop])
    return outs, messages


@pytest.mark.parametrize("cut", range(len(BACKEND_STREAM) + 1))
def test_backend_scanner_split_anywhere(cut: int) -> None:
    scanner = BackendScanner(1024)
    outs, messages = scan(scanner, [BACKEND_STREAM[:cut], BACKEND_STREAM[cut:]])
    assert b"".join(outs) == BACKEND_STREAM
    assert messages == WATCHED_MESSAGES
    assert scanner.at_boundary
    # The first `out` stops before any watched message the cut falls into (held back) and
    # before an incomplete header; the rest of an unwatched message streams.
    index = max(i for i, off in enumerate(OFFSETS) if off <= cut)
    if cut in OFFSETS:
        assert outs[0] == BACKEND_STREAM[:cut]
    elif BACKEND[index][0] in t.WATCHED or cut - OFFSETS[index] < 5:
        assert outs[0] == BACKEND_STREAM[: OFFSETS[index]]
    else:
        assert outs[0] == BACKEND_STREAM[:cut]


def test_backend_scanner_one_byte_at_a_time() -> None:
    scanner = BackendScanner(1024)
    outs, messages = scan(scanner, [bytes([b]) for b in BACKEND_STREAM])
    assert b"".join(outs) == BACKEND_STREAM
    assert messages == WATCHED_MESSAGES


def test_backend_scanner_unwatched_message_streams_without_being_held() -> None:
    row = t.data_row(b"x" * 100_000)
    scanner = BackendScanner(1024)  # far smaller than the row: it is never buffered
    out, events = scanner.feed(row[:20])
    assert out == row[:20]
    assert events == []
    assert not scanner.at_boundary
    out, _ = scanner.feed(row[20:50_000])
    assert out == row[20:50_000]
    out, events = scanner.feed(row[50_000:] + t.ready("I"))
    assert out == row[50_000:] + t.ready("I")
    assert events == [(ord("Z"), len(row) - 50_000, len(row) - 50_000 + 6)]
    assert scanner.at_boundary


def test_backend_scanner_returns_the_input_itself_when_nothing_is_held() -> None:
    chunk = t.row_description("id") + t.data_row(b"1") + t.ready("I")
    out, events = BackendScanner(1024).feed(chunk)
    assert out is chunk
    assert events == [(ord("Z"), len(chunk) - 6, len(chunk))]


def test_backend_scanner_at_boundary() -> None:
    scanner = BackendScanner(1024)
    assert scanner.at_boundary
    scanner.feed(b"Z\x00")  # partial header
    assert not scanner.at_boundary
    scanner.feed(b"\x00\x00\x05")  # header whole, status byte missing
    assert not scanner.at_boundary
    out, events = scanner.feed(b"I")
    assert out == t.ready("I")
    assert events == [(ord("Z"), 0, 6)]
    assert scanner.at_boundary


def test_backend_scanner_rejects_oversized_watched_message() -> None:
    scanner = BackendScanner(1024)
    with pytest.raises(ProtocolViolation, match="too large"):
        scanner.feed(b"E" + t.i32(2**31 - 1) + b"SERROR\x00")


@pytest.mark.parametrize("kind", [b"Z", b"D"])
def test_backend_scanner_rejects_length_below_four(kind: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="length 3"):
        BackendScanner(1024).feed(kind + t.i32(3))
