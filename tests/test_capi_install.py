"""The C library as another project consumes it: `cmake --install` lays out headers, library, a CMake
package (find_package(m3rt CONFIG) -> m3rt::m3rt) and m3rt.pc; a separate project built against the
installed package (and one built with pkg-config's flags) gives M3Model's dense vectors; as a
subproject, m3rt builds no tests or examples."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from capi_binding import CAPI_SOURCE, onnxruntime_library
from capi_fixtures import capi_build_dir  # noqa: F401

from m3rt import M3Model

CONSUMER = Path(__file__).parent / "capi_consumer"
TEXTS = ["hello world", "BGE M3 is an embedding model", "日本語のテキスト"]


@pytest.fixture(scope="module")
def prefix(capi_build_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("m3rt-prefix")
    subprocess.run(["cmake", "--install", str(capi_build_dir), "--prefix", str(out)], check=True,
                   capture_output=True, text=True)
    return out


def test_install_layout(prefix):
    for path in ("include/m3rt.h", "include/m3rt.hpp", "lib/libm3rt.so", "lib/cmake/m3rt/m3rtConfig.cmake",
                 "lib/cmake/m3rt/m3rtConfigVersion.cmake", "lib/cmake/m3rt/m3rtTargets.cmake", "lib/pkgconfig/m3rt.pc"):
        assert (prefix / path).exists(), path
    sonames = sorted(p.name for p in (prefix / "lib").glob("libm3rt.so.*"))
    assert "libm3rt.so.1" in sonames, sonames


def _run_consumer(binary: Path, artifact: Path) -> np.ndarray:
    env = {**os.environ, "M3RT_ONNXRUNTIME_LIBRARY": str(onnxruntime_library())}
    run = subprocess.run([str(binary), str(artifact), *TEXTS], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return np.array([[float(x) for x in line.split()] for line in run.stdout.splitlines()], dtype=np.float32)


def test_cmake_consumer_against_the_installed_package(prefix, tiny, tmp_path):
    build = tmp_path / "consumer"
    subprocess.run(["cmake", "-S", str(CONSUMER), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"], check=True,
                   capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)
    got = _run_consumer(build / "consumer", tiny[1])
    want = M3Model.load(tiny[1]).encode(TEXTS)["dense_vecs"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_pkg_config_consumer(prefix, tiny, tmp_path):
    pkg_config, cxx = shutil.which("pkg-config"), shutil.which("c++")
    if pkg_config is None or cxx is None:
        pytest.skip("pkg-config or c++ not on PATH")
    env = {**os.environ, "PKG_CONFIG_PATH": str(prefix / "lib" / "pkgconfig")}
    flags = subprocess.run([pkg_config, "--cflags", "--libs", "m3rt"], capture_output=True, text=True, env=env,
                           check=True).stdout.split()
    binary = tmp_path / "consumer-pc"
    libdir = prefix / "lib"
    subprocess.run([cxx, "-std=c++17", str(CONSUMER / "main.cc"), "-o", str(binary), *flags,
                    f"-Wl,-rpath,{libdir}"], check=True, capture_output=True, text=True, env=env)
    got = _run_consumer(binary, tiny[1])
    want = M3Model.load(tiny[1]).encode(TEXTS)["dense_vecs"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_subproject_builds_no_tests_or_examples(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(parent LANGUAGES CXX)\n"
        f'add_subdirectory("{CAPI_SOURCE}" m3rt)\n'
    )
    root = os.environ.get("M3RT_ONNXRUNTIME_ROOT")
    if not root:
        pytest.skip("M3RT_ONNXRUNTIME_ROOT is not set")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(parent), "-B", str(build), f"-DONNXRUNTIME_ROOT={root}"], check=True,
                   capture_output=True, text=True)
    targets = subprocess.run(["cmake", "--build", str(build), "--target", "help"], capture_output=True, text=True,
                             check=True).stdout
    assert "m3rt" in targets
    for name in ("m3rt_unit_tests", "m3rt_encode", "m3rt_threads_check"):
        assert name not in targets
    assert not (build / "CTestTestfile.cmake").exists()


def test_ignored_status_is_a_compiler_warning(prefix, tmp_path):
    """Status-returning calls are warn_unused_result: dropping one fails a -Werror build."""
    cxx = shutil.which("c++")
    if cxx is None:
        pytest.skip("c++ not on PATH")
    source = tmp_path / "ignored.cc"
    source.write_text('#include <m3rt.h>\nvoid f(m3rt_model** m) { m3rt_model_load("x", nullptr, m); }\n')
    checked = tmp_path / "checked.cc"
    checked.write_text(
        '#include <m3rt.h>\nvoid f(m3rt_model** m) { m3rt_status_free(m3rt_model_load("x", nullptr, m)); }\n'
    )
    flags = [cxx, "-c", "-o", os.devnull, "-Werror=unused-result", f"-I{prefix / 'include'}"]
    assert subprocess.run([*flags, str(checked)], capture_output=True).returncode == 0
    run = subprocess.run([*flags, str(source)], capture_output=True, text=True)
    assert run.returncode != 0 and "m3rt_model_load" in run.stderr
