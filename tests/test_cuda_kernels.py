"""The CUDA kernels of kernels/cuda/: they compile (nvcc, NVRTC, plain C++), they match the CPU kernels.

Without a GPU the kernels still run: tests/cuda_emulation.cpp compiles the same sources as host C++
(one std::thread per CUDA thread) and the results are compared exactly with the CPU kernels. The
`gpu` tests run the real thing through `m3rt.kernels.device`. What `DeviceKernels` enqueues, on which
stream and in which order, its out-of-memory path and its set-up check run here on a recording
stand-in for cuda-python (tests/host_device.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from m3rt.errors import BackendError
from m3rt.kernels import device as dk
from m3rt.kernels.colbert import colbert_counts, split_colbert
from m3rt.kernels.sparse import SparseRows, aggregate_sparse

import kernel_cases as kc

CUDA_DIR = Path(__file__).resolve().parents[1] / "kernels" / "cuda"
EMULATOR_SOURCE = Path(__file__).resolve().parent / "cuda_emulation.cpp"
NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if Path(p).exists()), None)
CXX = shutil.which("g++")

HOST_CPP = r"""
#include "m3rt_kernels.cuh"
#include <cstdio>
int main() {
    // The header's host-side helpers size the scratch table the same way on both sides.
    long long cap = m3rt_sparse_table_capacity(8192);
    std::printf("%lld %d %d\n", cap, m3rt_sparse_table_log2(3), (int)sizeof(m3rt_sparse_slot));
    return cap == 16384 ? 0 : 1;
}
"""

HOST_LAUNCH_CU = r"""
#include "m3rt_kernels.cuh"
// Launches every kernel with <<<>>> from another translation unit, as a C++ program would.
void run(const float* w, const long long* ids, const long long* mask, const long long* specials, int batch,
         int seq, m3rt_sparse_slot* table, int* slot_of, int* counts, long long* offsets, long long* entries,
         const float* vecs, int rows, int dim, void* out, cudaStream_t stream) {
    const int log2 = m3rt_sparse_table_log2(seq);
    m3rt_sparse_clear<<<64, M3RT_ROW_THREADS, 0, stream>>>(table, (long long)batch << log2);
    m3rt_sparse_insert<<<64, M3RT_ROW_THREADS, 0, stream>>>(w, ids, mask, specials, 4, batch, seq, log2, table,
                                                           slot_of);
    m3rt_sparse_count<<<batch, M3RT_ROW_THREADS, 0, stream>>>(slot_of, table, batch, seq, log2, counts);
    m3rt_sparse_offsets<<<1, M3RT_SCAN_THREADS, 0, stream>>>(counts, batch, offsets);
    m3rt_sparse_compact<<<batch, M3RT_ROW_THREADS, 0, stream>>>(ids, slot_of, table, offsets, batch, seq, log2,
                                                               entries);
    m3rt_colbert_compact<<<dim3(8, batch), M3RT_COPY_THREADS, 0, stream>>>(vecs, offsets, batch, rows, dim, 1, out);
}
int main() { return 0; }
"""


def _compile(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


# -- (a) nvcc and a plain C++ compiler ---------------------------------------------------------


@pytest.fixture(scope="module")
def nvcc_objects(tmp_path_factory) -> dict[str, Path]:
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path_factory.mktemp("nvcc")
    objects = {}
    for name in dk.SOURCES:
        obj = out / (Path(name).stem + ".o")
        _compile([NVCC, "-c", "-arch=sm_90", "-Werror", "all-warnings", "-o", str(obj), str(CUDA_DIR / name)], out)
        objects[name] = obj
    return objects


@pytest.mark.parametrize("name", dk.SOURCES)
def test_nvcc_compiles_each_source_for_sm90(nvcc_objects, name):
    assert nvcc_objects[name].stat().st_size > 0


def test_cpp_program_launches_the_kernels_through_the_header(nvcc_objects, tmp_path):
    launcher = tmp_path / "launch.cu"
    launcher.write_text(HOST_LAUNCH_CU)
    exe = tmp_path / "launch"
    objects = [str(o) for o in nvcc_objects.values()]
    _compile([NVCC, "-arch=sm_90", "-I", str(CUDA_DIR), "-o", str(exe), str(launcher), *objects], tmp_path)
    assert exe.exists()  # linked: every declared kernel has its definition


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_header_is_plain_cpp_for_host_code(tmp_path):
    source = tmp_path / "host.cpp"
    source.write_text(HOST_CPP)
    exe = tmp_path / "host"
    _compile([CXX, "-std=c++17", "-Wall", "-Werror", "-I", str(CUDA_DIR), "-o", str(exe), str(source)], tmp_path)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["16384", "4", str(dk.SLOT_BYTES)]
    assert dk.sparse_table_log2(8192) == 14 and dk.sparse_table_log2(3) == 4 and dk.sparse_table_log2(9) == 5


# -- (b) NVRTC, as the runtime compiles them ---------------------------------------------------


def _nvrtc_or_skip() -> None:
    try:
        dk.supported_archs()
    except BackendError as exc:
        pytest.skip(f"NVRTC unavailable: {exc}")


def test_nvrtc_compiles_a_cubin_with_every_kernel():
    _nvrtc_or_skip()
    cubin = dk.compile_sources("sm_90")
    assert cubin[:4] == b"\x7fELF"
    for name in dk.KERNELS:
        assert name.encode() in cubin
    assert dk.compile_sources("sm_90") is cubin  # once per process


def test_nvrtc_ptx_for_drivers_jit():
    _nvrtc_or_skip()
    ptx = dk.compile_sources("compute_90").decode()
    for name in dk.KERNELS:
        assert f".entry {name}(" in ptx
    assert dk.target_arch(9, 0) == "sm_90"
    newest = dk.supported_archs()[-1]
    assert dk.target_arch(99, 9) == f"compute_{newest}"


def test_nvrtc_errors_are_backend_errors():
    _nvrtc_or_skip()
    with pytest.raises(BackendError, match="could not compile"):
        dk.compile_sources.__wrapped__("sm_1")


def test_importing_kernels_does_not_import_cuda_python():
    code = "import sys, m3rt.kernels, m3rt.kernels.device; print(any(m.startswith('cuda') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_gpu_is_a_clear_backend_error():
    from m3rt.kernels.cuda_api import gpu_unavailable_reason

    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is visible")
    with pytest.raises(BackendError, match=r"need a CUDA GPU.*m3rt\[gpu\]"):
        dk.DeviceKernels()


# -- the kernels themselves, emulated on the CPU -----------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    if CXX is None:
        pytest.skip("g++ is not installed")
    exe = tmp_path_factory.mktemp("emu") / "cuda_emulation"
    proc = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-pthread", "-o", str(exe), str(EMULATOR_SOURCE)], capture_output=True, text=True
    )
    if proc.returncode != 0 and "barrier" in proc.stderr:
        pytest.skip("the C++ compiler lacks C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr
    return exe


def _emulate(exe: Path, mode: str, payload: bytes, tmp_path: Path) -> bytes:
    src, dst = tmp_path / f"{mode}.in", tmp_path / f"{mode}.out"
    src.write_bytes(payload)
    subprocess.run([str(exe), mode, str(src), str(dst)], check=True, timeout=120)
    return dst.read_bytes()


def _emulate_sparse(exe, tmp_path, w, ids, mask, specials) -> SparseRows:
    w = np.ascontiguousarray(w, np.float32)
    ids = np.ascontiguousarray(ids, np.int64)
    batch, seq = ids.shape
    head = np.array([batch, seq, len(specials), mask is not None], np.int64)
    parts = [head, w, ids] + ([np.ascontiguousarray(mask, np.int64)] if mask is not None else [])
    parts.append(np.asarray(specials, np.int64))
    raw = _emulate(exe, "sparse", b"".join(p.tobytes() for p in parts), tmp_path)
    indptr = np.frombuffer(raw[: (batch + 1) * 8], np.int64)
    total = int(indptr[-1])
    ids_out = np.frombuffer(raw[(batch + 1) * 8 :], np.int64, count=total)
    vals = np.frombuffer(raw[(batch + 1) * 8 + total * 8 :], np.float32, count=total)
    return SparseRows(indptr, ids_out, vals)


# Every case of the GPU check except the two that only matter for throughput (huge grids emulate slowly).
EMULATED_SPARSE = [c for c in kc.SPARSE_CASES if c not in ("large_batch", "empty_batch")]


@pytest.mark.parametrize("case", EMULATED_SPARSE)
def test_emulated_sparse_kernels_match_cpu(emulator, tmp_path, case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    w, ids, mask, specials = kc.sparse_case(rng, case)
    got = _emulate_sparse(emulator, tmp_path, w, ids, mask, specials)
    want = aggregate_sparse(w, ids, mask, specials)
    assert kc.compare_sparse(got, want) == ""
    if case == "all_special" or case == "all_masked" or case == "non_positive":
        assert want.indptr[-1] == 0
    else:
        assert want.indptr[-1] > 0


def test_emulated_sparse_scan_spans_several_tiles(emulator, tmp_path):
    # More rows than one scan block (1024) and rows longer than one tile (256): the carries matter.
    rng = np.random.default_rng(7)
    w = rng.standard_normal((1100, 3)).astype(np.float32)
    ids = rng.integers(0, 50, (1100, 3))
    got = _emulate_sparse(emulator, tmp_path, w, ids, None, kc.SPECIALS)
    assert kc.compare_sparse(got, aggregate_sparse(w, ids, None, kc.SPECIALS)) == ""


@pytest.mark.parametrize("dim", [8, 6])
@pytest.mark.parametrize("fp16", [False, True])
def test_emulated_colbert_kernel_matches_cpu(emulator, tmp_path, dim, fp16):
    rng = np.random.default_rng(dim + fp16)
    batch, rows = 5, 12
    vecs = rng.standard_normal((batch, rows, dim)).astype(np.float32) * 100
    mask = kc.right_padded_mask(rng, batch, rows + 1)
    mask[1] = 0
    mask[2] = 1
    counts = colbert_counts(mask)
    offsets = np.zeros(batch + 1 + (batch + 1) % 2, np.int64)
    offsets[1 : batch + 1] = np.cumsum(counts)
    head = np.array([batch, rows, dim, fp16], np.int64)
    raw = _emulate(emulator, "colbert", head.tobytes() + offsets.tobytes() + vecs.tobytes(), tmp_path)
    dtype = np.float16 if fp16 else np.float32
    flat = np.frombuffer(raw, dtype).reshape(-1, dim)
    got = [flat[lo:hi] for lo, hi in zip(offsets[:batch], offsets[1 : batch + 1])]
    want = [v.astype(dtype) for v in split_colbert(vecs, mask)]
    assert kc.compare_colbert(got, want) == ""


# -- (c) on a GPU ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_kernels():
    from m3rt.kernels.cuda_api import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with dk.DeviceKernels() as kernels:
        yield kernels


@pytest.mark.gpu
def test_device_kernels_match_cpu_kernels(gpu_kernels):
    results = kc.check_kernels_against_cpu(gpu_kernels, np.random.default_rng(0))
    assert {case for case, _, _ in results} == set(kc.CASES)
    failed = [f"{case}: {detail}" for case, ok, detail in results if not ok]
    assert not failed, "\n".join(failed)


@pytest.mark.gpu
def test_device_kernels_reuse_scratch_in_steady_state(gpu_kernels):
    rng = np.random.default_rng(1)
    first = kc.check_kernels_against_cpu(gpu_kernels, rng, ["long_8192", "colbert_8192"])
    buffers = gpu_kernels.scratch
    again = kc.check_kernels_against_cpu(gpu_kernels, rng, ["random", "long_8192", "colbert_random", "colbert_8192"])
    assert all(ok for _, ok, _ in first + again), first + again
    assert gpu_kernels.scratch == buffers  # nothing was reallocated


# -- (d) what is enqueued where, recorded without a GPU -------------------------------------------


@pytest.fixture
def recorded(monkeypatch):
    from host_device import RecordingCuda, install_recording_cuda

    return install_recording_cuda(monkeypatch, RecordingCuda(out_of_memory_above=1 << 20))


def _sparse_inputs(cuda, stream: int, batch: int, seq: int):
    rng = np.random.default_rng(0)
    dev = kc._DeviceArrays(stream)
    w = rng.standard_normal((batch, seq)).astype(np.float32)
    ids = rng.integers(0, 50, (batch, seq))
    return dev, (dev.put(w), dev.put(ids), dev.put(kc.right_padded_mask(rng, batch, seq)), (batch, seq))


def test_the_order_check_sees_a_legacy_stream_copy_racing_a_kernel(recorded):
    # The stand-in's check itself: a synchronous cudaMemcpy (legacy stream) read by a kernel on a
    # non-blocking stream with no synchronize in between is reported; the same copy on that stream is not.
    cuda = recorded
    ptr = cuda.cudaMalloc(8)[1]
    data = np.arange(1, dtype=np.int64)
    cuda.cudaMemcpy(ptr, data.ctypes.data, 8, cuda.cudaMemcpyKind.cudaMemcpyHostToDevice)
    value = np.array([ptr], np.uint64)
    params = np.array([value.ctypes.data] * 2, np.uint64)  # cuLaunchKernel's void*[] of arguments
    cuda.cuLaunchKernel("m3rt_sparse_clear", 1, 1, 1, 1, 1, 1, 0, 101, params.ctypes.data, 0)
    assert cuda.unordered_reads() == ["m3rt_sparse_clear on stream 101 reads a copy made on None"]
    cuda.cudaMemcpyAsync(ptr, data.ctypes.data, 8, cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, 101)
    cuda.cuLaunchKernel("m3rt_sparse_clear", 1, 1, 1, 1, 1, 1, 0, 101, params.ctypes.data, 0)
    assert len(cuda.unordered_reads()) == 1  # only the first launch


def test_special_ids_are_copied_on_the_kernels_stream_before_they_run(recorded):
    cuda = recorded
    kernels = dk.DeviceKernels()
    stream = cuda.cudaStreamCreateWithFlags(cuda.cudaStreamNonBlocking)[1]
    dev, (w, ids, mask, shape) = _sparse_inputs(cuda, stream, 3, 17)
    with dev:
        kernels.aggregate_sparse(w, ids, mask, shape, kc.SPECIALS, stream=stream)
        kernels.aggregate_sparse(w, ids, mask, shape, kc.SPECIALS)  # the kernels' own stream
    specials = kernels.scratch["specials"][0]
    copies = [c for c in cuda.calls if c.op == "h2d" and c.ptr == specials]
    assert len(copies) == 1 and copies[0].stream == stream and copies[0].pinned
    launches = [c.stream for c in cuda.calls if c.op == "launch"]
    assert launches == [stream] * 5 + [kernels.stream] * 5
    assert cuda.unordered_reads() == []
    # A new set of specials is copied again, on the stream of the call that needs it.
    with dev:
        kernels.aggregate_sparse(w, ids, mask, shape, (0, 1, 2), stream=stream)
    copies = [c for c in cuda.calls if c.op == "h2d" and c.ptr == specials]
    assert [c.stream for c in copies] == [stream, stream] and cuda.unordered_reads() == []
    kernels.close()


def test_the_kernel_cases_copy_their_inputs_on_the_kernels_stream(recorded):
    cuda = recorded
    with dk.DeviceKernels() as kernels:
        results = kc.check_kernels_against_cpu(kernels, np.random.default_rng(0), ["random", "colbert_random"])
    assert [case for case, _, _ in results] == ["random", "colbert_random"]  # (nothing computed here)
    launches = {c.stream for c in cuda.calls if c.op == "launch"}
    copies = {c.stream for c in cuda.calls if c.op == "h2d"}
    assert len(launches) == 1 and copies == launches and None not in copies
    assert cuda.unordered_reads() == []


def test_an_allocation_failure_frees_the_scratch_so_smaller_parts_fit(recorded):
    from m3rt.errors import BackendOutOfMemory

    cuda = recorded  # cudaMalloc fails above 1 MiB
    kernels = dk.DeviceKernels()
    dev, small = _sparse_inputs(cuda, kernels.stream, 2, 64)
    with dev:
        kernels.aggregate_sparse(*small[:3], small[3], kc.SPECIALS)
    assert kernels.scratch  # grown, and kept for the next call
    # A [64, 8192] batch needs ~ 12 * 64 * 16384 bytes of hash table: more than the device has.
    with pytest.raises(BackendOutOfMemory, match="cudaErrorMemoryAllocation"):
        kernels.aggregate_sparse(0, 0, 0, (64, 8192), kc.SPECIALS)
    assert kernels.scratch == {} and cuda.calls[-1].op in ("free", "sync")
    assert any(c.op == "sync" and c.stream == kernels.stream for c in cuda.calls[-6:])
    with dev:  # the smaller part runs again, its specials uploaded afresh
        kernels.aggregate_sparse(*small[:3], small[3], kc.SPECIALS)
    assert cuda.unordered_reads() == []
    with pytest.raises(BackendOutOfMemory):
        kernels.compact_colbert(0, (4, 8191, 1024), [8191] * 4)
    assert kernels.scratch == {}
    kernels.close()


def test_kernels_that_launch_but_compute_nothing_fail_set_up_and_the_host_takes_over(recorded):
    # The stand-in launches nothing for real: what a cuda-python whose launch API this code does not
    # match would look like. The set-up's check batch catches it, the post-processor notes it and
    # reduces on the host, and the kernels' stream and buffers are released.
    from m3rt.postprocess import PostProcessor

    cuda = recorded
    post = PostProcessor((0, 1, 2, 3))
    assert post.kernels_for(0) is None
    (note,) = post.notes
    assert "BackendError" in note and "sparse and ColBERT results differ from the CPU kernels'" in note
    assert cuda.device_ptrs == set() and cuda.pinned_ptrs == set()
    assert cuda.unordered_reads() == []


@pytest.mark.gpu
def test_the_set_up_check_passes_on_a_gpu(gpu_kernels):
    gpu_kernels.self_check()
