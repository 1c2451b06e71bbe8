"""Splitting byte streams into messages, in both directions, with bounded memory.

`StartupReader` reads the untyped packets a client sends before the session starts,
`FrameReader` the typed messages a client sends afterwards, and `BackendScanner` walks the
server's stream without copying it: it only stops on the few message types the gateway
must see (ReadyForQuery, ErrorResponse, ParameterStatus, BackendKeyData, Authentication,
ParseComplete)
and streams everything else straight through.
"""

from __future__ import annotations

import struct

from backstop_core.gateway.pgwire.codec import MAX_STARTUP_PACKET, ProtocolViolation

_I32 = struct.Struct("!i")
_unpack_i32 = _I32.unpack_from

# Every message type a v3 frontend may send once the session has started.
# Q simple query; P B D E C H S extended protocol; d c f COPY; p password/SASL;
# F function call; X terminate.
CLIENT_MESSAGE_TYPES = frozenset(b"QPBDECHSdcfpFX")

# Backend messages the gateway inspects; all others are relayed unread.
_WATCHED = frozenset(b"ZESKR1")
_WATCHED_TABLE = bytes(kind in _WATCHED for kind in range(256))


def read_i32(data: bytes, at: int) -> int:
    """The signed big-endian Int32 at `at` (caller checks the four bytes are there).

    Four byte reads rather than `struct`: compiled (setup.py) they are native integer
    operations, where a `struct` call boxes its result in a tuple; per message that is most
    of what the gateway's framing costs."""
    value = (data[at] << 24) | (data[at + 1] << 16) | (data[at + 2] << 8) | data[at + 3]
    return value - 0x100000000 if value & 0x80000000 else value


class StartupReader:
    """Collects startup-phase packets: Int32 length (self-inclusive), then the body."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 4:
            (length,) = _unpack_i32(self._buf, 0)
            if length < 8 or length > MAX_STARTUP_PACKET:
                raise ProtocolViolation(f"invalid startup packet length {length}")

    def next_packet(self) -> bytes | None:
        if len(self._buf) < 4:
            return None
        (length,) = _unpack_i32(self._buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return body

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def pending(self) -> int:
        return len(self._buf)


class FrameReader:
    """Splits the frontend stream into whole messages `(type, raw_bytes)`.

    A declared length above `max_message_size`, or an unknown type byte, raises
    ProtocolViolation before anything of that message is buffered, so memory stays bounded
    whatever a peer declares. A large message arriving in many reads is collected as a
    list of chunks and joined once, not copied again on every read.
    """

    __slots__ = ("_allowed_table", "_buf", "_have", "_need", "_parts", "max_message_size", "whole")

    def __init__(self, max_message_size: int, allowed: frozenset[int] = CLIENT_MESSAGE_TYPES):
        self.max_message_size = max_message_size
        self._allowed_table = bytes(kind in allowed for kind in range(256))
        self._buf = b""
        self._parts: list[bytes] = []  # chunks of one large incomplete message
        self._have = 0
        self._need = 0
        # True when the last feed's frames are exactly the bytes fed, nothing before or after.
        self.whole = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                self.whole = False
                return []
            data = b"".join(self._parts)
            self._parts = []
            self._have = self._need = 0
            carried = True
        else:
            carried = bool(self._buf)
            if carried:
                data = self._buf + data
        buf = data
        frames: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        allowed = self._allowed_table
        limit = self.max_message_size
        while end - pos >= 5:
            kind = buf[pos]
            if not allowed[kind]:
                raise ProtocolViolation(f"invalid frontend message type {kind}")
            length = read_i32(buf, pos + 1)
            if length < 4 or length > limit:
                raise ProtocolViolation(
                    f"message length {length} is outside 4..{limit}", sqlstate="08P01"
                )
            stop = pos + 1 + length
            if stop > end:
                if length > 65536:
                    self._parts = [buf[pos:]]
                    self._have = end - pos
                    self._need = length + 1
                    self._buf = b""
                    self.whole = False
                    return frames
                break
            frames.append((kind, buf[pos:stop] if (pos or stop != end) else buf))
            pos = stop
        if pos < end and not allowed[buf[pos]]:
            raise ProtocolViolation(f"invalid frontend message type {buf[pos]}")
        self._buf = buf[pos:] if pos < end else b""
        self.whole = not carried and pos == end
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf) + self._have


class BackendScanner:
    """Walks the backend stream, holding back only watched messages until they are whole.

    `feed(data)` returns `(out, events)`: `out` is the bytes that may be relayed now (the
    input itself when nothing was held back, so the common case copies nothing) and
    `events` lists `(type, start, end)` of each whole watched message inside `out`.
    """

    __slots__ = ("_held", "_skip", "max_message_size")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._skip = 0  # bytes of an unwatched message still to stream through
        self._held = b""  # an incomplete header, or an incomplete watched message

    @property
    def at_boundary(self) -> bool:
        return self._skip == 0 and not self._held

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
        events: list[tuple[int, int, int]] = []
        held = self._held
        if held:
            data = held + data
            self._held = b""
        end = len(data)
        pos = self._skip
        if pos >= end:
            self._skip = pos - end
            return data, events
        self._skip = 0
        while True:
            if end - pos < 5:
                if pos < end:
                    self._held = data[pos:]
                    return data[:pos], events
                return data, events
            kind = data[pos]
            length = read_i32(data, pos + 1)
            if length < 4:
                raise ProtocolViolation(f"server sent a message with length {length}")
            stop = pos + 1 + length
            if _WATCHED_TABLE[kind]:
                if length > self.max_message_size:
                    raise ProtocolViolation(f"server message of {length} bytes is too large")
                if stop > end:
                    self._held = data[pos:]
                    return data[:pos], events
                events.append((kind, pos, stop))
            elif stop > end:
                self._skip = stop - end
                return data, events
            pos = stop
            if pos == end:
                return data, events
