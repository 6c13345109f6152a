"""The C library under sanitizers, and its fuzz targets for a bounded time.

One clang build with -fsanitize=address,undefined (no recovery) holds the libFuzzer targets too: it runs
the C++ unit tests, the tokenizer comparison with Hugging Face `tokenizers` natively (leaks included:
LeakSanitizer), an encode through ONNX Runtime, and each fuzz target for M3RT_FUZZ_SECONDS (default 20)
on a copy of its corpus (runtime/capi/fuzz/corpus). A second build with -fsanitize=thread runs the
concurrency check. Without clang, the address/undefined build uses the C++ compiler and the fuzzers skip.

Build folders: M3RT_CAPI_SANITIZE_BUILD_ROOT (reused between runs when set), else a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from capi_binding import CAPI_SOURCE, build_problem, configure_and_build, onnxruntime_library
from conftest import XLMR_TOKENIZER
from test_capi_tokenizer import ADVERSARIAL
from tokenizers import Tokenizer as HFTokenizer

from m3rt.export.samples import calibration_texts, sample_texts

REQUIRED = os.environ.get("M3RT_CAPI_REQUIRED") == "1"
# ONNX Runtime is not built with sanitizers: what it allocates at load and keeps is not ours to report.
LSAN_SUPPRESSIONS = "leak:libonnxruntime\nleak:libicu\n"
# At exit, static destructors of uninstrumented libraries (ONNX Runtime's) unlock mutexes ThreadSanitizer
# never saw locked.
TSAN_SUPPRESSIONS = "called_from_lib:libonnxruntime.so\nmutex:__run_exit_handlers\n"


def _skip_or_fail(message: str):
    if REQUIRED:
        pytest.fail(f"M3RT_CAPI_REQUIRED=1 but {message}")
    pytest.skip(message)


def _root(tmp_path_factory) -> Path:
    given = os.environ.get("M3RT_CAPI_SANITIZE_BUILD_ROOT")
    return Path(given) if given else tmp_path_factory.mktemp("capi-sanitize")


def _build(build_dir: Path, sanitize: str, *extra: str, compiler: str | None = None) -> Path:
    problem = build_problem()
    if problem:
        _skip_or_fail(problem)
    args = [f"-DM3RT_SANITIZE={sanitize}", "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS=-O1", *extra]
    if compiler:
        args.append(f"-DCMAKE_CXX_COMPILER={compiler}")
    try:
        return configure_and_build(build_dir, *args)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"sanitizer build ({sanitize}) failed:\n{exc.stdout[-4000:]}\n{exc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def clang() -> str | None:
    found = shutil.which("clang++")
    if found is None and REQUIRED:
        pytest.fail("M3RT_CAPI_REQUIRED=1 but clang++ is not on PATH (apt-get install clang)")
    return found


@pytest.fixture(scope="session")
def asan_build(tmp_path_factory, clang) -> Path:
    extra = ["-DM3RT_BUILD_FUZZERS=ON"] if clang else []
    return _build(_root(tmp_path_factory) / "asan-ubsan", "address,undefined", *extra, compiler=clang)


@pytest.fixture(scope="session")
def tsan_build(tmp_path_factory, clang) -> Path:
    return _build(_root(tmp_path_factory) / "tsan", "thread", compiler=clang)


def _env(tmp_path: Path) -> dict:
    leaks = tmp_path / "lsan.supp"
    leaks.write_text(LSAN_SUPPRESSIONS)
    races = tmp_path / "tsan.supp"
    races.write_text(TSAN_SUPPRESSIONS)
    return {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
        "LSAN_OPTIONS": f"suppressions={leaks}",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "TSAN_OPTIONS": f"suppressions={races}:halt_on_error=1:second_deadlock_stack=1",
    }


def test_unit_tests(asan_build, tmp_path):
    run = subprocess.run([str(asan_build / "m3rt_unit_tests")], capture_output=True, text=True, env=_env(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]


def _tokenizer_paths(tiny) -> list[Path]:
    paths = [tiny[1] / "tokenizer.json"]
    if XLMR_TOKENIZER.is_file():
        paths.append(XLMR_TOKENIZER)
    return paths


def _texts() -> list[str]:
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and c != 0]
    chunks = ["".join(map(chr, points[i : i + 2000])) for i in range(0, len(points), 2000)]
    long_text = " ".join(sample_texts() * 200)
    return ADVERSARIAL + sample_texts() + calibration_texts() + chunks + [long_text, "x" * 100000]


@pytest.mark.parametrize("max_length", [0, 64])
def test_tokenizer_matches_tokenizers_under_sanitizers(asan_build, tiny, tmp_path, max_length):
    """The standalone m3rt::Tokenizer (C++ header) through the C API, id for id, leaks checked."""
    texts = [t for t in _texts() if "\0" not in t]
    for path in _tokenizer_paths(tiny):
        hf = HFTokenizer.from_file(str(path))
        if max_length:
            hf.enable_truncation(max_length)
        want = [" ".join(map(str, e.ids)) for e in hf.encode_batch(texts)]
        args = [str(asan_build / "m3rt_tokenize_check"), str(path)] + ([str(max_length)] if max_length else [])
        run = subprocess.run(args, input="\0".join(texts).encode(), capture_output=True, env=_env(tmp_path))
        assert run.returncode == 0, run.stderr.decode(errors="replace")[-6000:]
        got = [line.strip() for line in run.stdout.decode().split("\n")[: len(texts)]]
        mismatched = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        assert len(got) == len(texts) and not mismatched, (path.name, mismatched[:5])


def test_encode_under_sanitizers(asan_build, tiny, texts, tmp_path):
    run = subprocess.run(
        [str(asan_build / "m3rt_threads_check"), str(tiny[1]), str(onnxruntime_library()), "2"],
        input="\n".join(texts) + "\n", capture_output=True, text=True, env=_env(tmp_path),
    )
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]
    assert "mismatches 0, errors 0" in run.stdout


def test_threads_under_thread_sanitizer(tsan_build, tiny, texts, tmp_path):
    run = subprocess.run(
        [str(tsan_build / "m3rt_threads_check"), str(tiny[1]), str(onnxruntime_library()), "4"],
        input="\n".join(texts[:8]) + "\n", capture_output=True, text=True, env=_env(tmp_path),
    )
    assert run.returncode == 0, run.stdout + run.stderr[-6000:]
    assert "mismatches 0, errors 0" in run.stdout


@pytest.mark.parametrize("target", ["tokenize", "tokenizer_json", "manifest"])
def test_fuzz_target_for_a_bounded_time(asan_build, clang, target, tmp_path):
    if not clang:
        pytest.skip("libFuzzer needs clang++")
    seconds = int(os.environ.get("M3RT_FUZZ_SECONDS", "20"))
    work = tmp_path / "corpus"  # new inputs go here; the repository's corpus stays as it is
    work.mkdir()
    seeds = CAPI_SOURCE / "fuzz" / "corpus" / target
    env = _env(tmp_path)
    if target == "tokenize" and XLMR_TOKENIZER.is_file():
        env["M3RT_FUZZ_TOKENIZER"] = str(XLMR_TOKENIZER)  # the Precompiled charsmap and the real vocabulary
    # libFuzzer reads its RSS from getrusage's peak, which Linux carries across fork and exec: under a
    # pytest process that has loaded models it starts at that process's size. So each allocation is
    # bounded instead (-malloc_limit_mb); leaks are LeakSanitizer's.
    run = subprocess.run(
        [str(asan_build / f"m3rt_fuzz_{target}"), str(work), str(seeds), f"-max_total_time={seconds}",
         "-max_len=8192", "-rss_limit_mb=0", "-malloc_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, env=env, timeout=seconds + 120,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert run.returncode == 0 and not crashes, (crashes, run.stderr[-6000:])
