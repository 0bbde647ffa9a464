"""Benchmark of annotation matching (difyapi.vectors): one query against 1,000 annotations' question embeddings of
1,536 dimensions (OpenAI's text-embedding-3-small), pure Python. Prints the match time p50/p95 (goal: under 20 ms)
and the one-off cost of building a worker's index after the app's annotations changed.

Standalone: `.venv/bin/python bench/annotations_match.py [--annotations 1000] [--dimensions 1536] [--runs 50]`."""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from difyapi.vectors import VectorIndex, vector_from_bytes, vector_to_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=1000)
    parser.add_argument("--dimensions", type=int, default=1536)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(1)
    # As stored: float32 bytes per annotation, read back when a worker builds its index.
    stored = [(i, vector_to_bytes([rng.gauss(0, 1) for _ in range(args.dimensions)]))
              for i in range(args.annotations)]
    started = time.perf_counter()
    index = VectorIndex([(key, vector_from_bytes(data)) for key, data in stored])
    build_ms = (time.perf_counter() - started) * 1000
    timings = []
    for _ in range(args.runs):
        query = [rng.gauss(0, 1) for _ in range(args.dimensions)]
        started = time.perf_counter()
        index.best(query)
        timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    p95 = timings[min(len(timings) - 1, int(len(timings) * 0.95))]
    p50 = statistics.median(timings)
    print(f"{args.annotations} annotations x {args.dimensions} dimensions: match p50 {p50:.2f} ms, "
          f"p95 {p95:.2f} ms, min {timings[0]:.2f} ms; index build {build_ms:.0f} ms (once per change, per worker)")


if __name__ == "__main__":
    main()
