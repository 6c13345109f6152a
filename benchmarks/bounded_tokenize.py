"""One 32 Mi-character text without whitespace at max_length=8192: time and peak RSS growth of
`M3Tokenizer.encode`.

Usage: python -m m3rt.benchmarks.bounded_tokenize TOKENIZER_JSON
"""

import random
import resource
import sys
import time

from m3rt.tokenizer import M3Tokenizer


def main() -> None:
    rng = random.Random(1)
    block = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzабвгд的一是") for _ in range(1 << 16))
    text = block * 512
    tok = M3Tokenizer(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    ids = tok.encode([text], max_length=8192).ids[0]
    elapsed = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"bounded: {elapsed:.3f} s, {len(ids)} ids, peak RSS growth {grown:.0f} MiB")


if __name__ == "__main__":
    main()
