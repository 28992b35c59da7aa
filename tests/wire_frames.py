"""Frames built by hand, as a hostile student's process could write them to the judge's socket:
the attacks on tpjudge.wire's decoder, for tests/test_wire.py and bench/wire_bench.py.

`ATTACKS[name](n)` -> (header, buffers): a header tree (or raw header bytes) and the buffers,
`n` the attack's scale; `frame(header, buffers, magic)` frames them (the frame layout is the
same in every version of the wire: magic, header length, buffer count, buffer lengths, header,
buffers, so the bench can feed the same attack to an older decoder).
"""
from __future__ import annotations

import json
import struct

from tpjudge import wire

HASH_MODULUS = 2**61 - 1      # hash(k) == hash(k + HASH_MODULUS) for Python ints


def frame(header, buffers=(), magic=wire.MAGIC) -> bytes:
    if not isinstance(header, bytes):
        header = json.dumps(header, separators=(",", ":")).encode()
    buffers = [bytes(b) for b in buffers]
    return b"".join([struct.pack("!4sII", magic, len(header), len(buffers)),
                     struct.pack(f"!{len(buffers)}Q", *map(len, buffers)), header, *buffers])


def int_key_collisions(n):
    """A dict whose int keys all share one hash: building it costs n**2 key comparisons."""
    return ["d", [[["i", str(1 + k * HASH_MODULUS)], ["n"]] for k in range(n)]], []


def repeated_keys(n):
    """One key n times: every value is decoded, all but the last thrown away."""
    return ["d", [[["s", "k"], ["l", [["n"]] * 8]] for _ in range(n)]], []


def shared_buffer(n):
    """One 64 KiB buffer that n arrays claim: each array copies it (n * 64 KiB of memory)."""
    return ["l", [["a", "<f8", [8192], 0] for _ in range(n)]], [bytes(65536)]


def unused_buffers(n):
    """n buffers of 1 KiB that no value uses."""
    return ["n"], [bytes(1024)] * n


def opaque_names(n):
    """n distinct type names: each one a new class in the judge's process."""
    return ["l", [["x", f"Type{i}"] for i in range(n)]], []


def empty_lists(n):
    """n empty lists: 9 bytes of header each, ~200 bytes of objects each once decoded."""
    return ["l", [["l", []]] * n], []


def many_values(n):
    """n Nones: the cheapest values there are, n of them."""
    return ["l", [["n"]] * n], []


def big_int_strings(n):
    """n ints of 4300 digits (the most Python converts by default): int(str) is quadratic."""
    return ["l", [["i", "9" * 4300]] * n], []


def json_big_numbers(n):
    """n JSON number literals of 4000 digits in the header (a callback's number)."""
    return ("[\"l\",[" + ",".join(["[\"c\"," + "7" * 4000 + "]"] * n) + "]]").encode(), []


def float_string(n):
    """A float as a string of n digits."""
    return ["f", "1" * n], []


def deep_nesting(n):
    """n nested lists in the header."""
    return ("[\"l\",[" * n + "[\"n\"]" + "]]" * n).encode(), []


def huge_shapes(n):
    """n empty arrays whose other dimensions multiply beyond any memory."""
    return ["l", [["a", "<f8", [0, 2**62, 2**62], i] for i in range(n)]], [b""] * n


def shaped_scalars(n):
    """A numpy scalar whose shape says n values."""
    return ["g", "<f8", [n], 0], [bytes(8 * n)]


ATTACKS = {f.__name__.replace("_", "-"): f for f in (
    int_key_collisions, repeated_keys, shared_buffer, unused_buffers, opaque_names, empty_lists,
    many_values, big_int_strings, json_big_numbers, float_string, deep_nesting, huge_shapes,
    shaped_scalars)}
