"""Peak memory and time of the C library's tokenisation on one very long text (benchmarks/RESULTS.md).

usage: python measure_long_text.py LIBM3RT TOKENIZER_JSON CASE MEGABYTES [MAX_LENGTH]
CASE: ascii (one run of 'abcdefgh...' without whitespace), cjk (Chinese characters, no whitespace),
words (English words separated by spaces). MAX_LENGTH > 0 tokenises with truncation.
Prints one line: case, size, outcome, ids, seconds, and the peak RSS the call added (MiB) and per byte.
Run each case in a process of its own (the peak RSS of a process only grows).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from capi_binding import CapiError, Library, Tokenizer  # noqa: E402


def make_text(case: str, size: int) -> bytes:
    if case == "ascii":
        unit = b"abcdefghijklmnopqrstuvwxyz0123456789"
    elif case == "cjk":
        unit = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生".encode()
    else:
        unit = b"the quick brown fox jumps over the lazy dog "
    return (unit * (size // len(unit) + 1))[:size].decode("utf-8", "ignore").encode()


def main() -> None:
    lib_path, tokenizer_path, case, megabytes = sys.argv[1:5]
    max_length = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    lib = Library(lib_path)
    tokenizer = Tokenizer(lib, tokenizer_path)
    text = make_text(case, int(float(megabytes) * 1e6))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    try:
        ids = tokenizer.encode_bytes(text, max_length=max_length, truncate=True)
        outcome = "tokenised"
    except CapiError as exc:
        ids, outcome = [], f"refused ({exc.code}: {exc.message[:60]})"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"{case} {len(text) / 1e6:.1f} MB max_length={max_length}: {outcome}, {len(ids)} ids, {seconds:.2f} s, "
          f"+{peak:.0f} MiB peak RSS ({peak * 2**20 / len(text):.2f} B/byte)")


if __name__ == "__main__":
    main()
