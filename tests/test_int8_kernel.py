"""The int8 arithmetic probe against what the CPU's instruction sets imply, natively and on an
emulated AVX2-only CPU (Debian's qemu-user, when installed)."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from m3rt.int8_kernel import Int8Kernel, cpu_flags, int8_kernel, isa_name, probe_u8s8_exact

from int8_gemm import gemm_errors

# Intel's and AMD's manuals: u8 x s8 dot products accumulate in int32 with VNNI (vpdpbusd) and AMX
# (tdpbusd); without them x86 int8 GEMMs use vpmaddubsw, which adds pairs of products in saturating int16.
_EXACT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def test_probe_agrees_with_the_instruction_sets():
    flags = cpu_flags()
    if not flags or "avx2" not in flags:
        pytest.skip("not an x86-64 CPU with AVX2 (no /proc/cpuinfo flags to check against)")
    assert probe_u8s8_exact() == bool(flags & _EXACT_FLAGS)
    kernel = int8_kernel()
    assert kernel.isa == isa_name(flags) and kernel.u8s8_exact == probe_u8s8_exact()


def test_isa_names():
    assert isa_name(frozenset({"avx2", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"})) == "AMX"
    assert isa_name(frozenset({"avx2", "avx512bw", "avx512_vnni"})) == "AVX512-VNNI"
    assert isa_name(frozenset({"avx2", "avx_vnni"})) == "AVX-VNNI"
    assert isa_name(frozenset({"avx2", "avx512bw"})) == "AVX512BW"
    assert isa_name(frozenset({"avx2", "fma"})) == "AVX2"
    assert isa_name(frozenset()) == "unknown"
    kernel = Int8Kernel(cpu="x", isa="AVX2", u8s8_exact=False)
    assert kernel.describe() == "u8s8 int16 pairs (saturating), AVX2"


# Runs under `qemu-x86_64 -cpu Haswell`: AVX2 and FMA, no AVX-512, no VNNI.
_EMULATED = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from int8_gemm import gemm_errors
    from m3rt.int8_kernel import int8_kernel
    kernel = int8_kernel()
    errors = gemm_errors(Path(tempfile.mkdtemp()))
    print(json.dumps({"kernel": kernel.as_record(), "errors": errors}))
    """
)


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user not installed (apt-get install qemu-user)")
def test_emulated_avx2_cpu_saturates_int8_weights_but_not_their_u8_twin(tmp_path):
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        ["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", _EMULATED, str(tests)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kernel"]["isa"] == "AVX2" and report["kernel"]["u8s8_exact"] is False
    errors = report["errors"]
    # int8 weights: the int16 pair sums saturate and two-term int8 loses its precision; the same
    # products with uint8 weights (the graph served there) do not...
    assert errors["two_term"] > 10 * errors["two_term_u8"] and errors["two_term_u8"] < 5e-4
    # ...and equal this (native) CPU's exact arithmetic up to float rounding.
    assert np.isclose(errors["two_term_u8"], gemm_errors(tmp_path)["two_term_u8"], rtol=1e-3)


def test_probe_graph_is_the_one_gemm_it_says_it_is():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from m3rt.int8_kernel import PROBE_K, probe_model_bytes

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "u8s8_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, PROBE_K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 8])],
        [numpy_helper.from_array(np.full((PROBE_K, 8), 127, np.int8), "b")],
    )
    want = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert onnx.load_from_string(probe_model_bytes()) == want


def test_runtime_probe_needs_no_onnx_package(tmp_path):
    code = (
        "import sys; sys.modules['onnx'] = None; "  # what `import onnx` sees where it is not installed
        "from m3rt.int8_kernel import int8_kernel; print(int8_kernel().u8s8_exact)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(probe_u8s8_exact())
