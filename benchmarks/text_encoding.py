"""Sentence encoding: all-MiniLM-L6-v2's speed on this machine, and a rerun from the cache.

Encodes the first ``--sentences`` BANKING77 training sentences into an empty cache (timed:
sentences per second of the encoder), then embeds the same sentences again (timed: the
lookup that every later run of a text suite pays instead), ``--repeats`` times each in
fresh temporary caches, alternating, medians. The baseline is the encoder itself; the figure
is how many times faster the cached rerun is. Needs ``pip install "metalab[text]"`` and
BANKING77 under ``METALAB_DATA``.

    python benchmarks/text_encoding.py [--sentences 2000] [--repeats 3] [--threads 2] [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import harness
from metalab.data import banking77
from metalab.text import DEFAULT_ENCODER, EmbeddingCache, embed, load_encoder

FULL = {"sentences": 2000, "repeats": 3, "threads": None}
QUICK = {"sentences": 256, "repeats": 1}


def main() -> None:
    args = harness.Options(__doc__, "text_encoding", FULL, QUICK).parse()
    sentences = [text for text, _ in banking77.read("train")][:args.sentences]
    encoder = load_encoder(DEFAULT_ENCODER)
    embed(sentences[:64], encoder, EmbeddingCache(Path(tempfile.mkdtemp()) / "warm.sqlite"),
          progress=False)  # loads the weights and warms the kernels, untimed
    encode, cached = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder, \
                EmbeddingCache(Path(folder) / "cache.sqlite") as cache:
            start = time.perf_counter()
            embed(sentences, encoder, cache, progress=False)
            encode.append(time.perf_counter() - start)
            start = time.perf_counter()
            embed(sentences, encoder, cache, progress=False)
            cached.append(time.perf_counter() - start)
    encode_s, cached_s = statistics.median(encode), statistics.median(cached)
    print(f"{args.sentences} sentences: encoded in {encode_s:.2f} s "
          f"({args.sentences / encode_s:.0f} sentences/s), from the cache in {cached_s:.3f} s "
          f"({encode_s / cached_s:.0f}x faster)")
    harness.write_json(args.out, "text_encoding", {
        "encoder": encoder.name, "sentences": args.sentences, "repeats": args.repeats,
        "encode_s": encode, "cached_s": cached, "encode_median_s": encode_s,
        "cached_median_s": cached_s, "sentences_per_s": args.sentences / encode_s,
        "cache_speedup": encode_s / cached_s})


if __name__ == "__main__":
    main()
