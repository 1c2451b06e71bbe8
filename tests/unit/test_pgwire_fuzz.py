"""Hostile bytes: realistic traffic, mutated tens of thousands of times.

Whatever a peer sends, the codec may only answer with ProtocolViolation (the gateway turns
that into a FATAL error and a closed connection); any other exception would drop the
connection without telling the client why. Every loop is seeded, so a failure names the
iteration and the input that reproduces it.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backstop_core.gateway.pgwire import (
    CLIENT_MESSAGE_TYPES,
    BackendScanner,
    Bind,
    FrameReader,
    ProtocolViolation,
    StartupReader,
    decode_bind,
    decode_close,
    decode_describe,
    decode_error_fields,
    decode_execute,
    decode_parse,
    decode_query,
    decode_startup_packet,
)
from backstop_core.gateway.session import PassThroughHook, Phase, Session
from tests.unit import pgwire_traffic as t

SEED = 0x5EED_BA5E
MUTATIONS = 20_000
SESSION_MUTATIONS = 10_000
MAX = 512  # a small max_message_size, so corrupted lengths cross it often

DECODERS: dict[int, Callable[[bytes], object]] = {
    ord("Q"): decode_query,
    ord("P"): decode_parse,
    ord("B"): decode_bind,
    ord("E"): decode_execute,
    ord("D"): decode_describe,
    ord("C"): decode_close,
}

FRONTEND_STREAM = b"".join(t.CLIENT_FRAMES)
STARTUP_STREAMS = [
    t.CLIENT_STARTUP,
    t.ssl_request() + t.CLIENT_STARTUP,
    t.gssenc_request() + t.startup([("user", "agent")], t.PROTOCOL_3_2),
    t.cancel_request(4242, b"\x0b\xad\xca\xfe"),
    t.cancel_request(4242, bytes(range(32))),
]


def frame_starts(stream: bytes, typed: bool) -> list[int]:
    """Offsets of the length words in well-formed traffic (before mutation)."""
    starts, pos = [], 0
    head = 1 if typed else 0
    while pos + head + 4 <= len(stream):
        starts.append(pos + head)
        pos += head + int.from_bytes(stream[pos + head : pos + head + 4], "big")
    return starts


def mutate(rng: random.Random, data: bytes, length_words: list[int]) -> bytes:
    """One to three random edits of the kinds a broken or hostile peer produces."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        size = len(buf)
        if op == 0 and size:  # bit flips
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(size)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            at = rng.randint(0, size)
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 2 and size:  # delete a range
            at = rng.randrange(size)
            del buf[at : at + rng.randint(1, 16)]
        elif op == 3 and length_words:  # corrupt a length word
            at = rng.choice(length_words)
            if at + 4 <= size:
                old = int.from_bytes(buf[at : at + 4], "big", signed=True)
                special = [0, 3, 4, 5, -1, -(2**31), 2**31 - 1, MAX, MAX + 1, old - 1, old + 1]
                new = rng.choice([*special, rng.randint(-(2**31), 2**31 - 1)])
                new = max(-(2**31), min(2**31 - 1, new))
                buf[at : at + 4] = new.to_bytes(4, "big", signed=True)
        elif op == 4 and size:  # truncate
            del buf[rng.randrange(size) :]
        elif op == 5 and size:  # duplicate a slice
            at = rng.randrange(size)
            piece = buf[at : at + rng.randint(1, 64)]
            where = rng.randint(0, size)
            buf[where:where] = piece
        elif op == 6 and size:  # type byte or whole-byte noise
            buf[rng.randrange(size)] = rng.randrange(256)
    return bytes(buf)


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """Random split points, empty chunks included: TCP may deliver any of these."""
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 8)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def mutations(stream: bytes, typed: bool, seed: int) -> Iterator[tuple[int, bytes, list[bytes]]]:
    rng = random.Random(seed)
    words = frame_starts(stream, typed)
    for i in range(MUTATIONS):
        data = mutate(rng, stream, words)
        yield i, data, chunks(rng, data)


def only_protocol_violations(i: int, data: bytes, run: Callable[[], None]) -> bool:
    """Run one input; True when it was rejected with ProtocolViolation."""
    try:
        run()
    except ProtocolViolation as exc:
        assert exc.sqlstate in ("08P01", "0A000", "22021"), exc.sqlstate
        return True
    except Exception as exc:  # the bug this file exists to find
        pytest.fail(f"iteration {i}: {type(exc).__name__}: {exc}; input {data!r}")
    return False


def assert_both_outcomes(rejected: int) -> None:
    """The corpus must exercise both paths, or the loop proves nothing."""
    assert MUTATIONS // 20 < rejected < MUTATIONS - MUTATIONS // 20, rejected


# --- seeded mutation loops -------------------------------------------------------------


def test_startup_reader_and_decoder_survive_mutations() -> None:
    rng = random.Random(SEED)
    rejected = 0
    for i in range(MUTATIONS):
        stream = rng.choice(STARTUP_STREAMS)
        data = mutate(rng, stream, frame_starts(stream, typed=False))
        parts = chunks(rng, data)

        def run(data: bytes = data, parts: list[bytes] = parts) -> None:
            reader = StartupReader()
            fed = 0
            for part in parts:
                reader.feed(part)
                fed += len(part)
                # Watchdog: each packet taken consumes its bytes; the loop cannot spin.
                for _ in range(len(data) + 1):
                    before = reader.pending
                    body = reader.next_packet()
                    if body is None:
                        break
                    assert reader.pending == before - len(body) - 4
                    decode_startup_packet(body)
                else:
                    pytest.fail("next_packet kept returning packets")
                assert reader.pending <= fed
            decode_startup_packet(data[4:])

        rejected += only_protocol_violations(i, data, run)
    assert_both_outcomes(rejected)


def test_frame_reader_and_decoders_survive_mutations() -> None:
    rejected = 0
    for i, data, parts in mutations(FRONTEND_STREAM, typed=True, seed=SEED + 1):

        def run(parts: list[bytes] = parts) -> None:
            reader = FrameReader(MAX)
            fed = taken = 0
            for part in parts:
                frames = reader.feed(part)
                fed += len(part)
                for kind, raw in frames:
                    assert kind in CLIENT_MESSAGE_TYPES
                    assert raw[0] == kind
                    assert len(raw) == 1 + int.from_bytes(raw[1:5], "big")
                    taken += len(raw)
                    decoder = DECODERS.get(kind)
                    if decoder is not None:
                        decoder(raw[5:])
                # Every byte is either handed out or buffered, and the buffer is bounded.
                assert taken + reader.pending == fed
                assert reader.pending <= MAX + 5

        rejected += only_protocol_violations(i, data, run)
    assert_both_outcomes(rejected)


def test_backend_scanner_survives_mutations() -> None:
    rejected = 0
    for i, data, parts in mutations(t.SERVER_TRAFFIC, typed=True, seed=SEED + 2):

        def run(data: bytes = data, parts: list[bytes] = parts) -> None:
            scanner = BackendScanner(MAX)
            relayed = b""
            fed = 0
            for part in parts:
                out, events = scanner.feed(part)
                fed += len(part)
                for kind, start, stop in events:
                    assert kind in t.WATCHED
                    assert out[start] == kind
                    assert stop - start == 1 + int.from_bytes(out[start + 1 : start + 5], "big")
                    assert stop - start <= MAX + 1
                    if kind == ord("E"):
                        decode_error_fields(out[start + 5 : stop])
                relayed += out
                # What is relayed is exactly the input, in order; what is held is small.
                assert data[: len(relayed)] == relayed
                assert fed - len(relayed) <= MAX + 5

        rejected += only_protocol_violations(i, data, run)
    assert_both_outcomes(rejected)


def test_huge_declared_length_raises_instead_of_buffering() -> None:
    reader = FrameReader(64 * 1024 * 1024)
    with pytest.raises(ProtocolViolation, match="outside"):
        reader.feed(b"Q" + (2**31 - 1).to_bytes(4, "big"))
    assert reader.pending == 0
    scanner = BackendScanner(64 * 1024 * 1024)
    with pytest.raises(ProtocolViolation, match="too large"):
        scanner.feed(b"E" + (2**31 - 1).to_bytes(4, "big"))
    # An unwatched message that large is streamed, never buffered.
    scanner = BackendScanner(1024)
    out, _ = scanner.feed(b"D" + (2**31 - 1).to_bytes(4, "big") + b"x" * 4096)
    assert len(out) == 5 + 4096
    assert scanner.feed(b"y" * 4096)[0] == b"y" * 4096


# --- property-based -------------------------------------------------------------------

FAST = settings(max_examples=500, deadline=None)


@FAST
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=200))
def test_decoders_raise_only_protocol_violation(kind: int, body: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        DECODERS[kind](body)


@FAST
@given(st.binary(max_size=120))
def test_startup_decoder_raises_only_protocol_violation(body: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        decode_startup_packet(body)


names = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=12)
values = st.one_of(st.none(), st.binary(max_size=20))


@st.composite
def bind_messages(draw: st.DrawFn) -> Bind:
    params = tuple(draw(st.lists(values, max_size=5)))
    formats = tuple(draw(st.lists(st.sampled_from([0, 1]), max_size=len(params))))
    results = tuple(draw(st.lists(st.sampled_from([0, 1]), max_size=4)))
    return Bind(draw(names), draw(names), formats, params, results)


@FAST
@given(st.lists(bind_messages(), min_size=1, max_size=6), st.data())
def test_frames_come_out_whole_however_the_stream_is_split(
    binds: list[Bind], data: st.DataObject
) -> None:
    messages = [
        t.bind(b.portal, b.statement, b.params, b.param_formats, b.result_formats) for b in binds
    ]
    stream = b"".join(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader(MAX)
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got.extend(reader.feed(stream[a:b]))
    assert [raw for _, raw in got] == messages
    assert [decode_bind(raw[5:]) for _, raw in got] == binds


@FAST
@given(
    st.lists(st.sampled_from(range(len(t.SERVER_FRAMES))), min_size=1, max_size=20),
    st.data(),
)
def test_backend_events_do_not_depend_on_the_split(picks: list[int], data: st.DataObject) -> None:
    messages = [t.SERVER_FRAMES[i] for i in picks]
    stream = b"".join(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    scanner = BackendScanner(MAX)
    relayed = b""
    watched = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out, events = scanner.feed(stream[a:b])
        watched.extend(out[start:stop] for _, start, stop in events)
        relayed += out
    assert relayed == stream
    assert watched == [m for m in messages if m[0] in t.WATCHED]
    assert scanner.at_boundary


# --- a whole session ---------------------------------------------------------------------


class RecordingPeer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "wrote to a closed peer"
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


class FakeIO:
    def __init__(self) -> None:
        self.client = RecordingPeer()

    def start_client_tls(self) -> None:
        return None

    async def open_upstream(self, session: Session) -> RecordingPeer:
        raise AssertionError("the session is already connected")

    def cancel(self, pid: int, secret: bytes) -> None:
        pass

    def register_backend(self, session: Session, pid: int, secret: bytes) -> None:
        pass

    def unregister_backend(self, session: Session) -> None:
        pass


def ready_session() -> tuple[Session, FakeIO, RecordingPeer]:
    """A session past authentication, as the server leaves it after ReadyForQuery."""
    io = FakeIO()
    session = Session(
        io=io,
        hook=PassThroughHook(),
        session_id="fuzz",
        client_address="test",
        max_message_size=MAX,
    )
    upstream = RecordingPeer()
    session.phase = Phase.READY
    session.upstream = upstream
    return session, io, upstream


def frames_of(stream: bytes) -> list[bytes]:
    """Split well-framed traffic; fails if the gateway sent anything that is not."""
    reader = FrameReader(2**31 - 1)
    frames = [raw for _, raw in reader.feed(stream)]
    assert reader.pending == 0, f"half a message sent upstream: {stream!r}"
    return frames


def assert_closed_properly(io: FakeIO, upstream: RecordingPeer) -> None:
    assert io.client.closed
    said_goodbye = bool(upstream.writes) and upstream.writes[-1].endswith(t.terminate())
    told_client = b"SFATAL\x00VFATAL\x00C08P01\x00" in io.client.data
    assert said_goodbye or told_client, "connection dropped without a FATAL error"


def test_session_relays_or_closes_on_mutated_client_bytes() -> None:
    rng = random.Random(SEED + 3)
    words = frame_starts(FRONTEND_STREAM, typed=True)
    for i in range(SESSION_MUTATIONS):
        data = mutate(rng, FRONTEND_STREAM, words)
        session, io, upstream = ready_session()
        try:
            for part in chunks(rng, data):
                session.client_data(part)
                if session.phase is Phase.CLOSED:
                    assert_closed_properly(io, upstream)
                    break
        except Exception as exc:
            pytest.fail(f"iteration {i}: {type(exc).__name__} escaped client_data; input {data!r}")
        # Whatever reached the server is whole messages, and never a fast-path call.
        sent = frames_of(upstream.data)
        assert not any(raw[:1] == b"F" for raw in sent), f"iteration {i}: FunctionCall relayed"


def test_session_relays_or_closes_on_mutated_server_bytes() -> None:
    rng = random.Random(SEED + 4)
    words = frame_starts(t.SERVER_TRAFFIC, typed=True)
    for i in range(SESSION_MUTATIONS):
        data = mutate(rng, t.SERVER_TRAFFIC, words)
        session, io, _ = ready_session()
        try:
            for part in chunks(rng, data):
                session.server_data(part)
                if session.phase is Phase.CLOSED:
                    assert io.client.closed
                    break
        except Exception as exc:
            pytest.fail(f"iteration {i}: {type(exc).__name__} escaped server_data; input {data!r}")


# Well-formed extended-protocol and simple-query messages, sent in any order, duplicated or
# dropped: a pass-through session must relay each of them exactly once and nothing else.
CHAOS_FRAMES = [
    t.query("SELECT 1"),
    t.parse("s1", "SELECT $1", (23,)),
    t.parse("", "SELECT 2"),
    t.bind("", "s1", (b"7",)),
    t.bind("p1", "", ()),
    t.describe("S", "s1"),
    t.describe("P", ""),
    t.execute(""),
    t.execute("p1", 5),
    t.close("S", "s1"),
    t.close("P", "p1"),
    t.flush(),
    t.sync(),
]
CHAOS_SERVER = [
    t.parse_complete(),
    t.bind_complete(),
    t.row_description("a"),
    t.data_row(b"1"),
    t.command_complete("SELECT 1"),
    t.notice_response("hi"),
    t.parameter_status("TimeZone", "UTC"),
    t.error_response("boom", "42P01"),
    t.ready("I"),
    t.ready("T"),
]


def test_session_relays_reordered_duplicated_and_dropped_frames_exactly_once() -> None:
    rng = random.Random(SEED + 5)
    for i in range(SESSION_MUTATIONS):
        frames = [rng.choice(CHAOS_FRAMES) for _ in range(rng.randint(1, 12))] + [t.sync()]
        server = b"".join(rng.choice(CHAOS_SERVER) for _ in range(rng.randint(0, 10)))
        session, io, upstream = ready_session()
        client_parts = chunks(rng, b"".join(frames))
        server_parts = chunks(rng, server)
        for n in range(max(len(client_parts), len(server_parts))):
            if n < len(client_parts):
                session.client_data(client_parts[n])
            if n < len(server_parts):
                session.server_data(server_parts[n])
        assert session.phase is Phase.READY, f"iteration {i}"
        assert Counter(frames_of(upstream.data)) == Counter(frames), f"iteration {i}"
        assert io.client.data == server, f"iteration {i}"
