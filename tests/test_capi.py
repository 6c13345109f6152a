"""The C library end to end: the same three outputs as `M3Model.encode` on the tiny artifact, bad
input as status codes with messages, concurrent encodes, its C++ unit tests (ctest) and the example
program, whose output equals `m3rt encode`'s."""

from __future__ import annotations

import shutil
import subprocess
import threading

import numpy as np
import pytest
from capi_binding import (
    CAPI_SOURCE,
    LOAD_OPTIONS_V1_SIZE,
    OUTPUT_COLBERT,
    OUTPUT_DENSE,
    OUTPUT_SPARSE,
    CapiError,
    LoadOptions,
    Model,
    onnxruntime_library,
)
from capi_fixtures import capi, capi_build_dir  # noqa: F401

from m3rt import M3Error, M3Model
from m3rt.cli import main as m3rt_cli

INVALID_ARGUMENT, ARTIFACT_ERROR, INVALID_INPUT, INPUT_TOO_LONG, RUNTIME_ERROR = 1, 2, 4, 5, 6
MAX_TEXT_BYTES = 64 << 20  # M3RT_MAX_TEXT_BYTES
ALL = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)


def _load(capi, artifact, **options):  # noqa: F811
    return Model(capi, artifact, onnxruntime_library=str(onnxruntime_library()), **options)


def assert_same_outputs(got: dict, want: dict) -> None:
    """Dense and ColBERT within 1e-5, identical sparse key sets (in order), weights within 1e-5."""
    assert got["dense_vecs"].shape == want["dense_vecs"].shape
    np.testing.assert_allclose(got["dense_vecs"], want["dense_vecs"], rtol=0, atol=1e-5)
    assert len(got["colbert_vecs"]) == len(want["colbert_vecs"])
    for g, w in zip(got["colbert_vecs"], want["colbert_vecs"]):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    assert len(got["lexical_weights"]) == len(want["lexical_weights"])
    for g, w in zip(got["lexical_weights"], want["lexical_weights"]):
        assert list(g) == list(w)
        for key in w:
            assert abs(float(g[key]) - float(w[key])) <= 1e-5


@pytest.fixture(scope="module")
def tiny_capi(capi, tiny):  # noqa: F811
    model = _load(capi, tiny[1])
    yield model
    model.close()


@pytest.mark.parametrize("max_length", [None, 16, 2])
def test_outputs_match_m3model(exported, capi, texts, max_length):  # noqa: F811
    """Both tiny artifacts (synthetic and real XLM-R tokenizer), full length and truncated."""
    artifact = exported[1]
    model = _load(capi, artifact)
    try:
        got = model.encode(texts, truncate=1, max_length=max_length or 0)
    finally:
        model.close()
    want = M3Model.load(artifact).encode(texts, max_length=max_length, **ALL)
    assert_same_outputs(got, want)


@pytest.fixture(scope="module")
def int8_artifact(tiny, tmp_path_factory):
    from m3rt.export.artifact import ExportOptions, export_artifact

    out = tmp_path_factory.mktemp("capi-int8") / "artifact"
    # The tiny model has 2 layers: quantise them all (the default keeps layers 0-1 in fp32).
    export_artifact(ExportOptions(model=str(tiny[0]), output=out, int8=True, int8_sensitive_layers=()))
    return out


def test_int8_graph_matches_m3model_and_tensorrt_graphs_are_refused(capi, int8_artifact, texts):  # noqa: F811
    from m3rt.int8_kernel import int8_kernel
    from m3rt.manifest import load_manifest
    from m3rt.placement import int8_graph_for

    # precision="int8": the C library probes ONNX Runtime's GEMM as the Python runtime does and picks
    # the same form (int8 or int8-u8) on this CPU.
    manifest = load_manifest(int8_artifact)
    assert manifest.has_graph("int8") and manifest.has_graph("int8-u8")
    model = _load(capi, int8_artifact, precision="int8")
    try:
        assert model.graph == int8_graph_for(manifest, int8_kernel())
        got = model.encode(texts, truncate=1)
    finally:
        model.close()
    # Naming a graph overrides the probe.
    for name in ("int8", "int8-u8"):
        named = _load(capi, int8_artifact, graph=name, precision="int8")
        assert named.graph == name
        named.close()
    try:
        python = M3Model.load(int8_artifact, precision="int8")
    except M3Error as exc:  # its load-time int8 check can refuse a CPU; the C library has no such check
        pytest.skip(f"M3Model does not serve int8 on this CPU: {exc}")
    assert_same_outputs(got, python.encode(texts, **ALL))
    with pytest.raises(CapiError) as err:
        _load(capi, int8_artifact, graph="int8-qdq")
    assert err.value.code == 3 and "tensorrt" in err.value.message


@pytest.mark.parametrize("token_budget, batch_size", [(64, 256), (8192, 1), (100000, 3)])
def test_batching_does_not_change_outputs(capi, tiny, texts, token_budget, batch_size):  # noqa: F811
    model = _load(capi, tiny[1], token_budget=token_budget)
    try:
        got = model.encode(texts, truncate=1, batch_size=batch_size)
    finally:
        model.close()
    assert_same_outputs(got, M3Model.load(tiny[1]).encode(texts, **ALL))


def test_only_requested_outputs(tiny_capi, texts):
    dense = tiny_capi.encode(texts[:3], outputs=OUTPUT_DENSE)
    assert dense["dense_vecs"].shape[0] == 3 and dense["lexical_weights"] is None and dense["colbert_vecs"] is None
    rest = tiny_capi.encode(texts[:3], outputs=OUTPUT_SPARSE | OUTPUT_COLBERT)
    assert rest["dense_vecs"] is None and len(rest["lexical_weights"]) == 3 and len(rest["colbert_vecs"]) == 3
    full = tiny_capi.encode(texts[:3])
    assert_same_outputs(full, {**rest, "dense_vecs": dense["dense_vecs"]})


def test_empty_batch(tiny_capi):
    out = tiny_capi.encode([])
    assert out["count"] == 0 and out["dense_vecs"].shape[0] == 0 and out["lexical_weights"] == []


def test_too_long_text_is_refused_unless_truncation_is_asked(tiny_capi):
    long_text = "word " * 100
    with pytest.raises(CapiError) as err:
        tiny_capi.encode(["short", long_text], max_length=32)
    assert err.value.code == INPUT_TOO_LONG and "text 1" in err.value.message
    assert tiny_capi.encode(["short", long_text], max_length=32, truncate=1)["colbert_vecs"][1].shape[0] == 31


def test_invalid_utf8_names_the_text(tiny_capi):
    with pytest.raises(CapiError) as err:
        tiny_capi.encode_raw([b"fine", b"broken \xff\xfe"])
    assert err.value.code == INVALID_INPUT and "text 1" in err.value.message


@pytest.mark.parametrize(
    "options", [dict(max_length=1), dict(max_length=100000), dict(batch_size=0), dict(outputs=8)]
)
def test_bad_options_are_invalid_arguments(tiny_capi, options):
    with pytest.raises(CapiError) as err:
        tiny_capi.encode(["x"], **options)
    assert err.value.code == INVALID_ARGUMENT


def test_artifact_problems_are_reported_at_load(capi, tiny, tmp_path):  # noqa: F811
    broken = tmp_path / "broken"
    shutil.copytree(tiny[1], broken)
    onnx = broken / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(CapiError) as err:
        _load(capi, broken)
    assert err.value.code == ARTIFACT_ERROR and "sha256" in err.value.message
    with pytest.raises(CapiError) as err:
        _load(capi, tmp_path / "missing")
    assert err.value.code == ARTIFACT_ERROR and "not a directory" in err.value.message
    with pytest.raises(CapiError) as err:
        _load(capi, tiny[1], graph="int4")
    assert err.value.code == ARTIFACT_ERROR and "fp32" in err.value.message


def test_missing_onnxruntime_is_a_runtime_error(capi, tiny, tmp_path):  # noqa: F811
    with pytest.raises(CapiError) as err:
        Model(capi, tiny[1], onnxruntime_library=str(tmp_path / "libonnxruntime.so.1"))
    assert err.value.code == RUNTIME_ERROR and "cannot load ONNX Runtime" in err.value.message


def test_cuda_without_a_cuda_onnxruntime_is_a_runtime_error(capi, tiny):  # noqa: F811
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(CapiError) as err:
        _load(capi, tiny[1], use_cuda=1)
    assert err.value.code == RUNTIME_ERROR and "CUDA" in err.value.message


def test_int8_probe_graph_is_the_python_runtimes():
    """Both runtimes run the same probe GEMM: the C header holds the Python constant's bytes."""
    import re

    from m3rt.int8_kernel import PROBE_K, probe_model_bytes

    header = (CAPI_SOURCE / "src" / "int8_probe_model.h").read_text()
    body = header[header.index("kInt8ProbeModel[] = {") :]
    data = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-f]{2})", body))
    assert data == probe_model_bytes()
    assert f"kInt8ProbeK = {PROBE_K};" in header


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1"])
def test_bad_device_is_an_invalid_argument(capi, tiny, device):  # noqa: F811
    with pytest.raises(CapiError) as err:
        _load(capi, tiny[1], device=device)
    assert err.value.code == INVALID_ARGUMENT and "cuda:N" in err.value.message
    with pytest.raises(CapiError) as err:
        _load(capi, tiny[1], device="cpu", use_cuda=1)
    assert err.value.code == INVALID_ARGUMENT


def test_device_index_reaches_onnxruntime(capi, tiny):  # noqa: F811
    import onnxruntime

    cpu = _load(capi, tiny[1], device=" CPU ")
    assert cpu.cuda_device == -1
    cpu.close()
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(CapiError) as err:
        _load(capi, tiny[1], device="cuda:3")
    assert err.value.code == RUNTIME_ERROR and "CUDA" in err.value.message


def test_older_and_newer_option_structs(capi, tiny, texts):  # noqa: F811
    """A caller built against the first m3rt.h passes the smaller struct and gets defaults for the
    fields added since: the library never reads past struct_size."""
    import ctypes

    lib = capi.lib
    want = _load(capi, tiny[1]).encode(texts[:3])
    opts = LoadOptions()
    lib.m3rt_load_options_init(ctypes.byref(opts))
    opts.onnxruntime_library = str(onnxruntime_library()).encode()
    opts.struct_size = LOAD_OPTIONS_V1_SIZE
    opts.precision = b"no such precision"  # beyond an old caller's struct: must not be read
    opts.device = b"no such device"
    out = ctypes.c_void_p()
    capi.check(lib.m3rt_model_load(str(tiny[1]).encode(), ctypes.byref(opts), ctypes.byref(out)))
    model = Model.__new__(Model)
    model.lib, model.handle = capi, out.value
    # The default precision, fp32: on the CPU the flash-attention graph (bounded memory on long texts).
    assert model.graph == "fp32-flash"
    assert_same_outputs(model.encode(texts[:3]), want)
    model.close()
    for size in (LOAD_OPTIONS_V1_SIZE - 8, ctypes.sizeof(LoadOptions) + 8, 0):
        opts.struct_size = size
        status = lib.m3rt_model_load(str(tiny[1]).encode(), ctypes.byref(opts), ctypes.byref(out))
        with pytest.raises(CapiError) as err:
            capi.check(status)
        assert err.value.code == INVALID_ARGUMENT and "struct_size" in err.value.message


def test_oversized_text_is_refused_before_any_work(tiny_capi):
    """M3RT_MAX_TEXT_BYTES: refused with INPUT_TOO_LONG, even with truncation on."""
    text = b"a" * (MAX_TEXT_BYTES + 1)
    for truncate in (0, 1):
        with pytest.raises(CapiError) as err:
            tiny_capi.encode_raw([b"fine", text], truncate=truncate)
        assert err.value.code == INPUT_TOO_LONG and "text 1" in err.value.message
    with pytest.raises(CapiError) as err:
        tiny_capi.tokenizer.encode_bytes(text)
    assert err.value.code == INPUT_TOO_LONG


def test_long_text_truncated_equals_its_start(tiny_capi, texts):
    """With truncation only a prefix is tokenised: same outputs as the text cut by M3Model."""
    long_text = " ".join(texts * 2000)  # ~MBs
    got = tiny_capi.encode([long_text], truncate=1, max_length=64)
    want = tiny_capi.encode([long_text[:20000]], truncate=1, max_length=64)
    assert_same_outputs(got, want)
    with pytest.raises(CapiError) as err:
        tiny_capi.encode([long_text], max_length=64)
    assert err.value.code == INPUT_TOO_LONG


def test_version_macros_soname_and_symbol_node(capi, capi_build_dir):  # noqa: F811
    import re

    header = (CAPI_SOURCE / "include" / "m3rt.h").read_text()
    macros = dict(re.findall(r"#define (M3RT_(?:VERSION_\w+|ABI_VERSION)) (\S+)", header))
    version = ".".join(macros[f"M3RT_VERSION_{p}"] for p in ("MAJOR", "MINOR", "PATCH"))
    assert macros["M3RT_VERSION_STRING"] == f'"{version}"'
    assert capi.lib.m3rt_version().decode() == version
    abi = capi.lib.m3rt_abi_version()
    assert abi == int(macros["M3RT_ABI_VERSION"])
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not on PATH")
    dynamic = subprocess.run([readelf, "-d", "-W", str(capi_build_dir / "libm3rt.so")], capture_output=True,
                             text=True, check=True).stdout
    assert f"[libm3rt.so.{abi}]" in dynamic
    symbols = subprocess.run([readelf, "--dyn-syms", "-W", str(capi_build_dir / "libm3rt.so")], capture_output=True,
                             text=True, check=True).stdout
    exported = [line.split()[-1] for line in symbols.splitlines() if " m3rt_" in line and "UND" not in line]
    assert exported and all(name.endswith(f"@@M3RT_{abi}") for name in exported), exported


def test_concurrent_encodes_give_the_single_threaded_results(tiny_capi, texts):
    """ctypes releases the GIL, so these calls run in the library at the same time."""
    jobs = [texts[i::4] + [f"extra text number {i}"] for i in range(8)]
    expected = [tiny_capi.encode(job, truncate=1) for job in jobs]
    results: list = [None] * len(jobs)
    errors: list = []

    def work(index: int) -> None:
        try:
            for _ in range(5):
                results[index] = tiny_capi.encode(jobs[index], truncate=1)
                assert_same_outputs(results[index], expected[index])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got["dense_vecs"], want["dense_vecs"])


def test_native_threads_share_one_model(capi_build_dir, exported, texts):  # noqa: F811
    """C++ threads (no GIL anywhere) encoding through one model give the single-threaded results bit for bit."""
    run = subprocess.run(
        [str(capi_build_dir / "m3rt_threads_check"), str(exported[1]), str(onnxruntime_library()), "8"],
        input="\n".join(texts + ["x" * 3000]) + "\n", capture_output=True, text=True, encoding="utf-8",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mismatches 0, errors 0, invalid utf-8 refused yes, rows bounded yes" in run.stdout


def test_cpp_unit_tests(capi_build_dir):  # noqa: F811
    ctest = shutil.which("ctest")
    if ctest is None:
        pytest.skip("ctest not on PATH")
    run = subprocess.run([ctest, "--output-on-failure"], cwd=capi_build_dir, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_example_prints_what_m3rt_encode_prints(capi_build_dir, exported, capsys):  # noqa: F811
    artifact = exported[1]
    texts = ["hello world", "BGE M3 is an embedding model", "", "  spaced  ", "日本語のテキスト", "quote's \"both\""]
    assert m3rt_cli(["encode", str(artifact), *texts]) == 0
    want = capsys.readouterr().out
    run = subprocess.run(
        [str(capi_build_dir / "m3rt_encode"), str(artifact), "--onnxruntime", str(onnxruntime_library())],
        input="\n".join(texts) + "\n", capture_output=True, text=True, encoding="utf-8",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == want


def test_only_the_c_api_is_exported(capi_build_dir):  # noqa: F811
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not on PATH")
    library = capi_build_dir / "libm3rt.so"
    run = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    # The version node itself is listed as an absolute symbol ("A M3RT_1").
    rows = [line.split() for line in run.stdout.splitlines() if line.strip()]
    names = [row[-1] for row in rows if row[-2] != "A"]
    assert names and all(name.startswith("m3rt_") for name in names), [n for n in names if not n.startswith("m3rt_")]
