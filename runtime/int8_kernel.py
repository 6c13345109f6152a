"""Which int8 GEMM arithmetic ONNX Runtime's CPU kernels do on this machine.

The int8 graphs multiply uint8 activations (dynamically quantised, the full 0..255 range) by int8
weights. How ONNX Runtime's x86 kernels (MLAS) sum those products depends on the CPU:

- VNNI (AVX512-VNNI, AVX-VNNI) and AMX multiply-accumulate u8 x s8 straight into int32: exact.
- AVX2 and AVX-512 without VNNI use `vpmaddubsw`, which adds each *pair* of products in int16 with
  saturation: |a0*b0 + a1*b1| can reach 2*255*127 = 64770 > 32767, and then the sum is clipped.

So an int8 graph with u8 x s8 products is exact on the first kind and silently loses accuracy on the
second. The same products written u8 x u8 (weights + 128, zero point 128) run through kernels that
widen both operands to 16 bits (`vpmaddwd`) and cannot saturate on any CPU; without VNNI those do as
many multiply-adds per instruction as the saturating u8 x s8 ones, with VNNI they are ~2.4x slower.

Which kind this CPU is gets *measured* (`probe_u8s8_exact`: one small GEMM whose pair sums exceed
int16), not inferred from CPUID, so a hypervisor that hides a flag, or an ONNX Runtime that dispatches
differently, cannot fool it; the CPUID name (`isa`) only labels what was measured.
"""

from __future__ import annotations

import base64
import functools
import platform
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# CPUID flags as Linux names them, most capable first.
_ISA_FLAGS = (
    ("AMX", ("amx_int8", "amx_tile")),
    ("AVX512-VNNI", ("avx512_vnni",)),
    ("AVX-VNNI", ("avx_vnni",)),
    ("AVX512BW", ("avx512bw",)),
    ("AVX2", ("avx2",)),
)


def proc_cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


# NumPy's runtime CPUID detection, under Linux's flag names. It sees the CPU the process runs on,
# also under an emulator (qemu-user passes the host's /proc/cpuinfo through unchanged).
_NUMPY_FLAGS = {"AVX2": "avx2", "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni"}
# Not in NumPy's list: taken from /proc/cpuinfo when it describes the same CPU as NumPy does.
_PROC_ONLY_FLAGS = ("avx_vnni", "amx_int8", "amx_tile")


def _numpy_cpu_features() -> dict[str, bool] | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return None
    return dict(__cpu_features__)


def cpu_flags() -> frozenset[str]:
    """The CPU's int8-relevant feature flags, Linux-named (empty where nothing tells, e.g. macOS on ARM)."""
    proc = proc_cpu_flags()
    features = _numpy_cpu_features()
    if features is None:
        return proc
    flags = {name for key, name in _NUMPY_FLAGS.items() if features.get(key)}
    if {f for f in proc if f in _NUMPY_FLAGS.values()} == flags:
        flags |= {f for f in _PROC_ONLY_FLAGS if f in proc}
    return frozenset(flags)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def isa_name(flags: frozenset[str]) -> str:
    """The best int8-relevant instruction set in `flags` (a label: the probe decides exactness)."""
    for name, needed in _ISA_FLAGS:
        if all(flag in flags for flag in needed):
            return name
    return "baseline" if flags else "unknown"


# The probe graph, serialised (zlib + base64) so that the runtime needs no `onnx` package: one
# MatMulInteger of uint8 a [M, 256] by a constant int8 b [256, 8] of 127s, int32 out, opset 17,
# IR version 8. `tests/test_int8_kernel.py` rebuilds it with onnx and checks these bytes.
PROBE_K = 256
PROBE_MODEL = (
    "eNrj4LC6K8AlwcWYyMWYJMRYqcTrm1jiW5rjmVeSmp5aJMRValFsEV9QlJ+UqtUrwNHAxMEhwOzEmOTVIFA/CkbBKBgFo2AUjIIRB6KEgK0G"
    "IV4ubg4mIXYuBi5mYOsgSZCLsVKIh4uLg02IDSgGbC44sXAxCAgCAJheCtw="
)


def probe_model_bytes() -> bytes:
    return zlib.decompress(base64.b64decode(PROBE_MODEL))


@functools.cache
def probe_u8s8_exact() -> bool:
    """Whether ONNX Runtime's CPU u8 x s8 GEMM sums 255 * 127 pairs exactly (no int16 saturation).

    Constant weights go through the same prepacked GEMM path as the model's MatMulInteger,
    DynamicQuantizeMatMul and MatMulIntegerToFloat nodes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe_model_bytes(), options, providers=["CPUExecutionProvider"])
    a = np.full((16, PROBE_K), 255, np.uint8)
    got = session.run(None, {"a": a})[0]
    return bool(np.all(got == PROBE_K * 255 * 127))


@dataclass(frozen=True)
class Int8Kernel:
    """This CPU's int8 GEMM arithmetic under ONNX Runtime: what the int8 gates depend on."""

    cpu: str
    isa: str
    u8s8_exact: bool

    @property
    def arithmetic(self) -> str:
        return "int32" if self.u8s8_exact else "int16 pairs (saturating)"

    def describe(self) -> str:
        return f"u8s8 {self.arithmetic}, {self.isa}"

    def as_record(self) -> dict[str, object]:
        return {"cpu": self.cpu, "isa": self.isa, "u8s8_exact": self.u8s8_exact, "kernel": self.describe()}


@functools.cache
def int8_kernel() -> Int8Kernel:
    return Int8Kernel(cpu=cpu_model(), isa=isa_name(cpu_flags()), u8s8_exact=probe_u8s8_exact())
