"""The bf16 form's accuracy gate: OpenVINO bf16 on the fp32 graph against ONNX Runtime fp32.

bf16 has no graph file of its own, so its figures live in the manifest's `cpu_precisions` section:
`{"bf16": {"engine": "openvino", "graph": "fp32", "fidelity": {figures, gate, passed, measured_on}}}`.
`record_bf16_gate` measures and writes them (at export, `m3-export --bf16`); `check_bf16_on_this_cpu`
(the OpenVINO engine, at load) trusts them on the CPU and OpenVINO they were measured with and
measures again anywhere else, refusing bf16 below its gate.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from m3rt.errors import ArtifactError, BelowGateError
from m3rt.fidelity import DEFAULT_GATES, Gate
from m3rt.int8_kernel import cpu_model
from m3rt.manifest import MANIFEST_NAME, Manifest, load_manifest
from m3rt.validation import HeldoutComparison, encode_texts, heldout_texts

SECTION = "cpu_precisions"
AGAINST = "ONNX Runtime fp32 graph, held-out built-in samples"


def bf16_record(manifest: Manifest) -> dict[str, Any] | None:
    return manifest.data.get(SECTION, {}).get("bf16")


def this_cpu() -> dict[str, Any]:
    """What the bf16 figures depend on: the CPU, its bf16 instructions and OpenVINO's version."""
    from m3rt.backends.openvino import bf16_flags, import_openvino

    return {"cpu": cpu_model(), "bf16": sorted(bf16_flags()), "openvino": import_openvino().get_version()}


def measure_bf16(manifest: Manifest, backend: Any = None) -> dict[str, Any]:
    """The gate's figures of OpenVINO bf16 (`backend`, or a new one) against ONNX Runtime fp32."""
    from m3rt.backends.openvino import OpenVinoBackend

    backend = backend or OpenVinoBackend(manifest.graph_path("fp32"), "bf16", cache_dir=None)
    comparison = HeldoutComparison(manifest, manifest.graph_path("fp32"))
    got = encode_texts(manifest, backend, comparison.tokenizer, comparison.texts)
    from m3rt.fidelity import compare_outputs

    return compare_outputs(got, comparison.reference)


def gate_of_bf16(manifest: Manifest) -> Gate:
    record = bf16_record(manifest)
    recorded = ((record or {}).get("fidelity") or {}).get("gate")
    return Gate(recorded) if recorded else DEFAULT_GATES["bf16"]


def _summary(figures: dict[str, Any], gate: Gate) -> str:
    return (
        f"dense cos min {figures['dense_cos_min']:.5f}, ColBERT mean {figures['colbert_cos_mean']:.5f}, "
        f"sparse top-10 {figures['sparse_top10_overlap']:.3f}, lexical keys {figures['sparse_jaccard']:.3f} "
        f"(gate {gate.as_record()})"
    )


def record_bf16_gate(root: str | Path, gate: Gate | None = None, allow_degraded: bool = False) -> dict[str, Any]:
    """Measure OpenVINO bf16 on this CPU and write its figures into the artifact's manifest (atomically).

    BelowGateError below `gate` (default: the bf16 default gate) unless `allow_degraded`; ArtifactError
    where this CPU has no native bf16 (the measurement would not stand for any bf16 CPU's arithmetic).
    """
    manifest = load_manifest(root, verify=False)
    gate = gate or DEFAULT_GATES["bf16"]
    figures = measure_bf16(manifest)
    failures = gate.failures(figures)
    if failures and not allow_degraded:
        raise BelowGateError(f"bf16 (OpenVINO) misses its accuracy gate: {'; '.join(failures)}")
    record = {
        "engine": "openvino",
        "graph": "fp32",
        "fidelity": {"against": AGAINST, **figures, "gate": gate.as_record(), "passed": not failures,
                     "measured_on": this_cpu()},
    }  # fmt: skip
    data = dict(manifest.data)
    data[SECTION] = {**data.get(SECTION, {}), "bf16": record}
    path = manifest.root / MANIFEST_NAME
    handle, temporary = tempfile.mkstemp(dir=manifest.root, prefix=".m3rt-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2)
        os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return record


def check_bf16_on_this_cpu(manifest: Manifest, backend: Any) -> str:
    """A note saying how bf16 is known to hold its gate here; measures it first when its recorded
    figures were taken on another CPU or OpenVINO (or are missing). ArtifactError below the gate."""
    record = bf16_record(manifest)
    fidelity = (record or {}).get("fidelity") or {}
    gate = gate_of_bf16(manifest)
    here = this_cpu()
    if fidelity and fidelity.get("measured_on") == here:
        if not fidelity.get("passed", False):
            raise ArtifactError(
                f"bf16 (OpenVINO) missed its accuracy gate when measured on this CPU at export: "
                f"{'; '.join(gate.failures(fidelity))}. Use precision='fp32'"
            )
        return f"bf16 (OpenVINO) gate measured on this CPU at export: {_summary(fidelity, gate)}"
    why = (
        f"its gate was measured on {fidelity['measured_on'].get('cpu')} with OpenVINO "
        f"{fidelity['measured_on'].get('openvino')}"
        if fidelity.get("measured_on")
        else "its manifest records no bf16 gate (m3-export --bf16 records one)"
    )
    warnings.warn(
        f"m3rt: bf16 (OpenVINO) runs here on {here['cpu']} and {why}; validating it on this CPU against "
        f"the fp32 graph first ({len(heldout_texts())} held-out texts)",
        stacklevel=3,
    )
    figures = measure_bf16(manifest, backend)
    failures = gate.failures(figures)
    if failures:
        raise ArtifactError(
            f"bf16 (OpenVINO) misses its accuracy gate on this CPU ({here['cpu']}): {'; '.join(failures)}. "
            "Not serving it: use precision='fp32'"
        )
    return f"bf16 (OpenVINO) validated on this CPU at load: {_summary(figures, gate)}"
