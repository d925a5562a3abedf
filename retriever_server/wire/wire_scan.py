"""The protocol-buffer wire format read by hand: varints and the fields of a message, for readers that
look at a message's bytes before protobuf's parser does (a request's counts, `request.check_wire_counts`)
or instead of it (answers read in place, `response_reader`)."""

from __future__ import annotations

import numpy as np

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # wire types


class WireError(Exception):
    """Bytes a hand reading leaves to protobuf's parser: damage, merged fields, over-long varints."""


class TooManyFields(WireError):
    """More fields than the reading's budget allows."""


def varint(raw: memoryview, at: int, most: int = 10) -> tuple[int, int]:
    """The varint at `at` (unsigned 64-bit; at most `most` bytes) and the position after it."""
    value, end = 0, min(at + most, len(raw))
    for position in range(at, end):
        byte = raw[position]
        value |= (byte & 0x7F) << (7 * (position - at))
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, position + 1
    raise WireError


def fields(raw: memoryview, start: int, end: int, budget: list[int]):
    """(field number, wire type, value) of each field of the message in raw[start:end]: a varint's
    value, the (start, end) of a length-delimited field, None for a fixed-size one. Keys and lengths
    take at most 5 bytes, field numbers under 2^29, as protobuf's parser requires. `budget` holds how
    many more fields the whole message may have (TooManyFields past it)."""
    at = start
    while at < end:
        key, at = varint(raw, at, 5)
        number, wire = key >> 3, key & 7
        budget[0] -= 1
        if budget[0] < 0:
            raise TooManyFields
        if number == 0 or number >= 1 << 29:
            raise WireError
        value = None
        if wire == VARINT:
            value, at = varint(raw, at)
        elif wire == LENGTH:
            size, at = varint(raw, at, 5)
            if size >= 1 << 31:
                raise WireError
            value, at = (at, at + size), at + size
        elif wire in (FIXED64, FIXED32):
            at += 8 if wire == FIXED64 else 4
        else:
            raise WireError  # a group, or no wire type at all
        if at > end:
            raise WireError
        yield number, wire, value


def varint_count(raw: memoryview, span: tuple[int, int]) -> int:
    """How many varints the packed field raw[span] holds: its bytes that end one (high bit clear)."""
    return int(np.count_nonzero(np.frombuffer(raw[span[0]:span[1]], dtype=np.uint8) < 0x80))
