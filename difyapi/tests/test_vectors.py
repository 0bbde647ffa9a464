"""The pure-Python cosine index behind annotation replies: the best match and its score as exact arithmetic gives
them, whatever the vectors' length or scale; vectors that cannot be compared are left out."""
from __future__ import annotations

import math
import random

from difyapi.vectors import VectorIndex, vector_from_bytes, vector_to_bytes


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_best_match_and_score_agree_with_exact_cosine():
    rng = random.Random(7)
    for dimension in (3, 8, 1536):
        items = [(i, [rng.gauss(0, 1) * rng.choice((0.01, 1, 300)) for _ in range(dimension)]) for i in range(60)]
        index = VectorIndex(items)
        for _ in range(5):
            query = [rng.gauss(0, 1) for _ in range(dimension)]
            exact = {key: cosine(vector, query) for key, vector in items}
            match = index.best(query)
            assert match.key == max(exact, key=exact.get)
            assert abs(match.score - exact[match.key]) < 1e-3


def test_scores_span_minus_one_to_one():
    index = VectorIndex([("same", [2.0, 0.0]), ("opposite", [-1.0, 0.0])])
    assert index.best([5.0, 0.0]).key == "same" and abs(index.best([5.0, 0.0]).score - 1) < 1e-3
    only_opposite = VectorIndex([("opposite", [-1.0, 0.0])])
    assert abs(only_opposite.best([1.0, 0.0]).score + 1) < 1e-3


def test_vectors_that_cannot_be_compared_are_left_out():
    index = VectorIndex([("zero", [0.0, 0.0]), ("short", [1.0]), ("ok", [0.0, 1.0]), ("nan", [math.nan, 1.0])])
    assert index.keys == ("ok",)
    assert index.best([1.0]) is None and index.best([0.0, 0.0]) is None
    assert VectorIndex([]).best([1.0, 0.0]) is None


def test_vectors_are_stored_as_float32_bytes():
    data = vector_to_bytes([0.5, -2.0, 3.25])
    assert len(data) == 12 and list(vector_from_bytes(data)) == [0.5, -2.0, 3.25]
