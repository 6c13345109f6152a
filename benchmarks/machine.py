"""The machine a benchmark ran on, recorded beside its figures (every benchmark's report has it)."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_description() -> dict[str, Any]:
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in (
        "m3rt",
        "onnxruntime",
        "onnxruntime-gpu",
        "numpy",
        "tokenizers",
        "torch",
        "transformers",
        "FlagEmbedding",
        "tensorrt",
    ):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    gpu = None
    try:
        import subprocess

        query = "--query-gpu=name,driver_version,memory.total"
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        gpu = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # which int8 arithmetic this CPU gives ONNX Runtime, hence which int8 graph is served
        from m3rt.int8_kernel import int8_kernel

        int8 = int8_kernel().as_record()
    except ImportError:
        int8 = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "int8_kernel": int8,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }
