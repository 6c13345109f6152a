"""pytest fixtures for the C library's tests: build it once per session, or skip with the reason.

CI sets M3RT_CAPI_REQUIRED=1, which turns a missing toolchain into a failure instead of a skip.
"""

from __future__ import annotations

import os
import subprocess

import capi_binding
import pytest


@pytest.fixture(scope="session")
def capi_build_dir(tmp_path_factory):
    problem = capi_binding.build_problem()
    if problem:
        if os.environ.get("M3RT_CAPI_REQUIRED") == "1":
            pytest.fail(f"M3RT_CAPI_REQUIRED=1 but {problem}")
        pytest.skip(problem)
    try:
        return capi_binding.build(tmp_path_factory.getbasetemp())
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building runtime/capi failed:\n{exc.stdout}\n{exc.stderr}")


@pytest.fixture(scope="session")
def capi(capi_build_dir):
    return capi_binding.Library(capi_build_dir / "libm3rt.so")
