"""Cosine similarity of one query vector against many stored vectors, fast in pure Python (no numpy).

The stored vectors are normalised and quantised to small integers once, when the index is built, and laid out by
dimension: for each dimension one Python integer holds that component of every vector, each in a fixed-width bit
field. A query then costs one big-integer multiply-add per dimension (`acc += q_j * column_j`), which CPython does
in C over all vectors at once, instead of one Python-level multiplication per component per vector (1,000 vectors of
1,536 dimensions: bench/annotations_match.py, docs/benchmarks.md).

Quantisation keeps scores within about 1e-3 of the exact cosine: stored components are 12-bit, query components
16-bit, and every field is 40 bits wide, more than any sum of products needs, so fields never carry into each other.
"""
from __future__ import annotations

import array
import math
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

STORED_SCALE = 2047  # stored components: round(x * 2047), offset by 2048 to make them non-negative
QUERY_SCALE = 32767  # query components: round(x * 32767), signed
OFFSET = STORED_SCALE + 1
FIELD_BYTES = 5
FIELD_BIAS = 1 << (8 * FIELD_BYTES - 1)  # added to every field so that each reads back as a non-negative number


def vector_to_bytes(vector: Sequence[float]) -> bytes:
    """How a vector is stored (float32, little-endian)."""
    return struct.pack(f"<{len(vector)}f", *vector)


def vector_from_bytes(data: bytes) -> array.array:
    vector = array.array("f")
    vector.frombytes(data)
    if sys.byteorder == "big":
        vector.byteswap()
    return vector


def _quantised(vector: Sequence[float], scale: int) -> Iterator[int] | None:
    """The vector's unit vector times `scale`, rounded (None for a zero or non-finite vector)."""
    norm = math.hypot(*vector)
    if not norm or not math.isfinite(norm):
        return None
    return map(round, map((scale / norm).__mul__, vector))


@dataclass(frozen=True)
class Match:
    key: object
    score: float


class VectorIndex:
    """An immutable index of (key, vector) pairs of one dimension. Vectors of another dimension, or of zero length,
    are left out (they cannot be compared)."""

    def __init__(self, items: Sequence[tuple[object, Sequence[float]]]):
        self.dimension = len(items[0][1]) if items else 0
        keys: list[object] = []
        stored = array.array("q")
        for key, vector in items:
            quantised = _quantised(vector, STORED_SCALE) if len(vector) == self.dimension else None
            if quantised is None:
                continue
            keys.append(key)
            stored.extend(map(OFFSET.__add__, quantised))
        self.keys = tuple(keys)
        count = len(keys)
        self._columns = [self._packed(stored[j::self.dimension]) for j in range(self.dimension)] if count else []
        self._bias = int.from_bytes(FIELD_BIAS.to_bytes(FIELD_BYTES, "little") * count, "little")

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def _packed(column: array.array) -> int:
        """One dimension's components of every vector (non-negative, under 2**12) as one integer of 40-bit fields."""
        if sys.byteorder == "big":
            column = array.array("q", column)
            column.byteswap()
        raw = bytearray(column.tobytes())
        # Each 8-byte little-endian value keeps its low FIELD_BYTES bytes; the rest are zero.
        for width in range(8, FIELD_BYTES, -1):
            del raw[width - 1::width]
        return int.from_bytes(raw, "little")

    def best(self, query: Sequence[float]) -> Match | None:
        """The stored vector with the highest cosine similarity to `query` (None when nothing can be compared)."""
        if not self.keys or len(query) != self.dimension:
            return None
        quantised = _quantised(query, QUERY_SCALE)
        if quantised is None:
            return None
        weights = list(quantised)
        total = self._bias
        for weight, column in zip(weights, self._columns, strict=True):
            if weight:
                total += weight * column
        # Each field now holds FIELD_BIAS + sum_j (stored_ij * weight_j), with stored_ij = component + OFFSET.
        shift = FIELD_BIAS + OFFSET * sum(weights)
        raw = total.to_bytes(FIELD_BYTES * len(self.keys), "little")
        best_index, best_value = 0, None
        for index in range(len(self.keys)):
            start = index * FIELD_BYTES
            value = int.from_bytes(raw[start:start + FIELD_BYTES], "little")
            if best_value is None or value > best_value:
                best_index, best_value = index, value
        return Match(key=self.keys[best_index], score=(best_value - shift) / (STORED_SCALE * QUERY_SCALE))

