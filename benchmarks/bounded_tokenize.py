"""One 32 Mi-character text without whitespace at max_length=8192: time and peak RSS growth of M3Tokenizer.encode.

Usage: python -m m3rt.benchmarks.bounded_tokenize TOKENIZER_JSON
"""

import random
import resource
import sys
import time

from m3rt.tokenizer import M3Tokenizer

rng = random.Random(1)
block = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzабвгд的一是") for _ in range(1 << 16))
text = block * 512
tok = M3Tokenizer(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
ids = tok.encode([text], max_length=8192).ids[0]
dt = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"bounded: {dt:.3f} s, {len(ids)} ids, peak RSS growth {(after - before) / 1024:.0f} MiB")
