"""Peak memory and time of the C library's tokenisation on one very long text (benchmarks/RESULTS.md).

usage: python measure_long_text.py LIBM3RT TOKENIZER_JSON CASE MEGABYTES [MAX_LENGTH]
CASE: ascii (one run of 'abcdefgh...' without whitespace), cjk (Chinese characters, no whitespace),
words (English words separated by spaces). MAX_LENGTH > 0 tokenises with truncation.
Prints one line: case, size, outcome, ids, seconds, and the peak RSS the call added (MiB) and per byte.
Run each case in a process of its own (the peak RSS of a process only grows).
"""

from __future__ import annotations

import ctypes
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from capi_binding import CapiError, Library, Tokenizer  # noqa: E402


def tokenize_count(tokenizer: Tokenizer, text: bytes, max_length: int) -> int:
    """m3rt_tokenize without turning the ids into Python objects (their memory is not the library's)."""
    ids = ctypes.POINTER(ctypes.c_int64)()
    count = ctypes.c_size_t()
    lib = tokenizer.lib
    lib.check(lib.lib.m3rt_tokenize(tokenizer.handle, text, len(text), 1, max_length, 1, ctypes.byref(ids),
                                    ctypes.byref(count)))
    lib.lib.m3rt_ids_free(ids)
    return count.value


def make_text(case: str, size: int) -> bytes:
    if case == "ascii":
        unit = b"abcdefghijklmnopqrstuvwxyz0123456789"
    elif case == "cjk":
        unit = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生".encode()
    else:
        unit = b"the quick brown fox jumps over the lazy dog "
    # One allocation (whole units): a transient copy here would raise the baseline peak RSS.
    return unit * max(1, size // len(unit))


def main() -> None:
    lib_path, tokenizer_path, case, megabytes = sys.argv[1:5]
    max_length = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    lib = Library(lib_path)
    tokenizer = Tokenizer(lib, tokenizer_path)
    text = make_text(case, int(float(megabytes) * 1e6))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    try:
        count = tokenize_count(tokenizer, text, max_length)
        outcome = "tokenised"
    except CapiError as exc:
        count, outcome = 0, f"refused ({exc.code}: {exc.message[:60]})"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"{case} {len(text) / 1e6:.1f} MB max_length={max_length}: {outcome}, {count} ids, {seconds:.2f} s, "
          f"+{peak:.0f} MiB peak RSS ({peak * 2**20 / len(text):.2f} B/byte)")


if __name__ == "__main__":
    main()
