"""A ctypes binding of the m3rt C library (runtime/capi), for the tests that check it against Python."""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np

OUTPUT_DENSE, OUTPUT_SPARSE, OUTPUT_COLBERT = 1, 2, 4


class CapiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class LoadOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("onnxruntime_library", ctypes.c_char_p),
        ("graph", ctypes.c_char_p),
        ("verify", ctypes.c_int),
        ("intra_op_threads", ctypes.c_int),
        ("use_cuda", ctypes.c_int),
        ("token_budget", ctypes.c_int64),
        ("precision", ctypes.c_char_p),
        ("device", ctypes.c_char_p),
    ]


# The size of the first m3rt_load_options (ending with token_budget): what older callers pass.
LOAD_OPTIONS_V1_SIZE = LoadOptions.token_budget.offset + ctypes.sizeof(ctypes.c_int64)


class EncodeOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("max_length", ctypes.c_int64),
        ("truncate", ctypes.c_int),
        ("batch_size", ctypes.c_int64),
        ("outputs", ctypes.c_uint),
    ]


_P = ctypes.c_void_p
_SIGNATURES = {
    "m3rt_status_code": (ctypes.c_int, [_P]),
    "m3rt_status_message": (ctypes.c_char_p, [_P]),
    "m3rt_status_free": (None, [_P]),
    "m3rt_load_options_init": (None, [ctypes.POINTER(LoadOptions)]),
    "m3rt_encode_options_init": (None, [ctypes.POINTER(EncodeOptions)]),
    "m3rt_model_load": (_P, [ctypes.c_char_p, ctypes.POINTER(LoadOptions), ctypes.POINTER(_P)]),
    "m3rt_model_free": (None, [_P]),
    "m3rt_model_hidden_size": (ctypes.c_int64, [_P]),
    "m3rt_model_tokenizer": (_P, [_P]),
    "m3rt_model_graph": (ctypes.c_char_p, [_P]),
    "m3rt_model_cuda_device": (ctypes.c_int, [_P]),
    "m3rt_version": (ctypes.c_char_p, []),
    "m3rt_abi_version": (ctypes.c_int, []),
    "m3rt_encode": (
        _P,
        [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t,
         ctypes.POINTER(EncodeOptions), ctypes.POINTER(_P)],
    ),
    "m3rt_result_count": (ctypes.c_size_t, [_P]),
    "m3rt_result_dense": (ctypes.POINTER(ctypes.c_float), [_P, ctypes.POINTER(ctypes.c_int64)]),
    "m3rt_result_sparse": (
        ctypes.c_int,
        [_P, ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)), ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)),
         ctypes.POINTER(ctypes.POINTER(ctypes.c_float))],
    ),
    "m3rt_result_colbert": (
        ctypes.POINTER(ctypes.c_float),
        [_P, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)],
    ),
    "m3rt_result_free": (None, [_P]),
    "m3rt_tokenizer_load": (_P, [ctypes.c_char_p, ctypes.POINTER(_P)]),
    "m3rt_tokenizer_free": (None, [_P]),
    "m3rt_tokenize": (
        _P,
        [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
         ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)), ctypes.POINTER(ctypes.c_size_t)],
    ),
    "m3rt_ids_free": (None, [ctypes.POINTER(ctypes.c_int64)]),
    "m3rt_tokenizer_id_to_text": (ctypes.c_char_p, [_P, ctypes.c_int64]),
}


class Library:
    def __init__(self, path: str | Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype = restype
            fn.argtypes = argtypes

    def check(self, status: int | None) -> None:
        if status:
            code = self.lib.m3rt_status_code(status)
            message = self.lib.m3rt_status_message(status).decode("utf-8", "replace")
            self.lib.m3rt_status_free(status)
            raise CapiError(code, message)


class Tokenizer:
    """A tokenizer.json loaded by the C library (standalone, or borrowed from a model)."""

    def __init__(self, lib: Library, path: str | Path | None = None, handle: int | None = None) -> None:
        self.lib = lib
        self.owned = handle is None
        if handle is None:
            out = _P()
            lib.check(lib.lib.m3rt_tokenizer_load(str(path).encode(), ctypes.byref(out)))
            handle = out.value
        self.handle = handle

    def encode_bytes(self, data: bytes, add_special_tokens: bool = True, max_length: int = 0, truncate: bool = True):
        ids = ctypes.POINTER(ctypes.c_int64)()
        count = ctypes.c_size_t()
        self.lib.check(
            self.lib.lib.m3rt_tokenize(
                self.handle, data, len(data), int(add_special_tokens), max_length, int(truncate),
                ctypes.byref(ids), ctypes.byref(count),
            )
        )
        try:
            return [ids[i] for i in range(count.value)]
        finally:
            self.lib.lib.m3rt_ids_free(ids)

    def encode(self, text: str, **kwargs) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"), **kwargs)

    def id_to_text(self, token_id: int) -> str | None:
        raw = self.lib.lib.m3rt_tokenizer_id_to_text(self.handle, token_id)
        return None if raw is None else raw.decode("utf-8")

    def close(self) -> None:
        if self.owned and self.handle:
            self.lib.lib.m3rt_tokenizer_free(self.handle)
        self.handle = None


class Model:
    def __init__(self, lib: Library, artifact: str | Path, **options) -> None:
        self.lib = lib
        self.handle = None
        opts = LoadOptions()
        lib.lib.m3rt_load_options_init(ctypes.byref(opts))
        for key, value in options.items():
            setattr(opts, key, value.encode() if isinstance(value, str) else value)
        out = _P()
        lib.check(lib.lib.m3rt_model_load(str(artifact).encode(), ctypes.byref(opts), ctypes.byref(out)))
        self.handle = out.value
        self.tokenizer = Tokenizer(lib, handle=lib.lib.m3rt_model_tokenizer(self.handle))

    @property
    def graph(self) -> str:
        return self.lib.lib.m3rt_model_graph(self.handle).decode()

    @property
    def cuda_device(self) -> int:
        return self.lib.lib.m3rt_model_cuda_device(self.handle)

    def encode_raw(self, texts: list[bytes], outputs: int = 7, **options) -> dict:
        opts = EncodeOptions()
        self.lib.lib.m3rt_encode_options_init(ctypes.byref(opts))
        opts.outputs = outputs
        for key, value in options.items():
            setattr(opts, key, value)
        array = (ctypes.c_char_p * len(texts))(*texts)
        lengths = (ctypes.c_size_t * len(texts))(*[len(t) for t in texts])
        out = _P()
        call = self.lib.lib.m3rt_encode
        status = call(self.handle, array, lengths, len(texts), ctypes.byref(opts), ctypes.byref(out))
        self.lib.check(status)
        result = out.value
        try:
            return self._read(result)
        finally:
            self.lib.lib.m3rt_result_free(result)

    def encode(self, texts: list[str], **kwargs) -> dict:
        return self.encode_raw([t.encode("utf-8") for t in texts], **kwargs)

    def _read(self, result: int) -> dict:
        lib = self.lib.lib
        n = lib.m3rt_result_count(result)
        out: dict = {"count": n, "dense_vecs": None, "lexical_weights": None, "colbert_vecs": None}
        dim = ctypes.c_int64()
        dense = lib.m3rt_result_dense(result, ctypes.byref(dim))
        if dense:
            out["dense_vecs"] = np.ctypeslib.as_array(dense, shape=(n * dim.value,)).reshape(n, dim.value).copy()
        indptr = ctypes.POINTER(ctypes.c_int64)()
        indices = ctypes.POINTER(ctypes.c_int64)()
        values = ctypes.POINTER(ctypes.c_float)()
        if lib.m3rt_result_sparse(result, ctypes.byref(indptr), ctypes.byref(indices), ctypes.byref(values)):
            bounds = [indptr[i] for i in range(n + 1)]
            out["lexical_weights"] = [
                {str(indices[j]): np.float32(values[j]) for j in range(lo, hi)}
                for lo, hi in zip(bounds[:-1], bounds[1:])
            ]
        rows = ctypes.c_int64()
        colbert = []
        for i in range(n):
            ptr = lib.m3rt_result_colbert(result, i, ctypes.byref(rows), ctypes.byref(dim))
            if not ptr:
                colbert = None
                break
            count = rows.value * dim.value
            data = np.ctypeslib.as_array(ptr, shape=(count,)).copy() if count else np.zeros(0, np.float32)
            colbert.append(data.reshape(rows.value, dim.value))
        out["colbert_vecs"] = colbert
        return out

    def close(self) -> None:
        if self.handle:
            self.lib.lib.m3rt_model_free(self.handle)
        self.handle = None


# ---- building the library for the tests ----

CAPI_SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "capi"
_BUILT: dict[str, Path] = {}


def onnxruntime_library() -> Path:
    """The shared library inside the installed onnxruntime wheel (what the C library loads at run time)."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so.1*"))
    if not found:
        raise FileNotFoundError(f"no libonnxruntime.so.1* in {capi}")
    return found[-1]


def build_problem() -> str | None:
    """Why the C library cannot be built here (None: it can)."""
    import shutil

    if os.environ.get("M3RT_CAPI_BUILD_DIR"):
        return None
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        return f"no {' and '.join(missing)} on PATH to build runtime/capi"
    if not os.environ.get("M3RT_ONNXRUNTIME_ROOT"):
        return (
            "M3RT_ONNXRUNTIME_ROOT is not set: point it at an ONNX Runtime distribution with include/ "
            "(runtime/capi/scripts/assemble-onnxruntime.sh makes one)"
        )
    return None


def build_jobs() -> str:
    return str(max(1, min(4, os.cpu_count() or 1)))


def configure_and_build(build_dir: Path, *cmake_args: str, env: dict | None = None) -> Path:
    """cmake configure + build of runtime/capi into build_dir (reused when it is already there)."""
    root = os.environ["M3RT_ONNXRUNTIME_ROOT"]
    configure = ["cmake", "-S", str(CAPI_SOURCE), "-B", str(build_dir), f"-DONNXRUNTIME_ROOT={root}", *cmake_args]
    subprocess.run(configure, check=True, capture_output=True, text=True, env=env)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", build_jobs()], check=True, capture_output=True,
                   text=True, env=env)
    return build_dir


def build(build_root: Path) -> Path:
    """Configure and build runtime/capi once per process; returns the build folder."""
    if "dir" in _BUILT:
        return _BUILT["dir"]
    prebuilt = os.environ.get("M3RT_CAPI_BUILD_DIR")
    if prebuilt:
        _BUILT["dir"] = Path(prebuilt)
        return _BUILT["dir"]
    _BUILT["dir"] = configure_and_build(build_root / "capi-build")
    return _BUILT["dir"]
