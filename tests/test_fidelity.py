"""The one comparator (`compare_outputs`, `HeadStats`) and its per-figure thresholds (`Gate`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3rt.fidelity import REFERENCE_GATE, Gate, HeadStats, compare_outputs, reference_gate
from m3rt.validation import gate_of


def test_gate_holds_each_figure_to_its_own_limit_in_its_direction():
    gate = Gate(dense_cos_min=0.99, sparse_weight_max_abs_err=0.1)
    assert gate.failures({"dense_cos_min": 0.995, "sparse_weight_max_abs_err": 0.05}) == []
    failures = gate.failures({"dense_cos_min": 0.98, "sparse_weight_max_abs_err": 0.2})
    assert len(failures) == 2 and "dense_cos_min" in failures[0] and "sparse_weight_max_abs_err" in failures[1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_a_figure_that_is_not_finite_or_not_measured_fails(bad):
    figures = {} if bad is None else {"dense_cos_min": bad, "dense_max_abs_diff": bad}
    gate = Gate(dense_cos_min=0.9, dense_max_abs_diff=1.0)
    assert len(gate.failures(figures)) == 2


def test_a_recorded_gate_reads_back_including_the_older_form_with_unset_limits():
    gate = Gate(dense_cos_min=0.99, colbert_cos_mean=0.98)
    assert Gate(gate.as_record()) == gate
    assert Gate({"dense_cos_min": 0.99, "colbert_cos_mean": 0.98, "sparse_top10_overlap": None}) == gate


def test_recorded_gates_win_over_the_defaults():
    from m3rt.manifest import GraphInfo

    recorded = GraphInfo.parse("int8", {"file": "m.onnx", "fidelity": {"gate": {"dense_cos_min": 0.5}}})
    assert gate_of(recorded) == Gate(dense_cos_min=0.5)
    default = GraphInfo.parse("int8", {"file": "m.onnx"})
    assert gate_of(default).limits == {"dense_cos_min": 0.99, "colbert_cos_mean": 0.98, "sparse_top10_overlap": 0.9}


def test_the_reference_gate_checks_every_head_of_nested_figures():
    heads = {
        name: {"max_abs_diff": 1e-6, "min_cosine": 1.0} for name in ("dense_vecs", "sparse_weights", "colbert_vecs")
    }
    assert REFERENCE_GATE.failures({"texts": 3, "heads": heads}) == []
    heads["sparse_weights"]["max_abs_diff"] = 0.01
    (failure,) = REFERENCE_GATE.failures({"heads": heads})
    assert failure.startswith("heads.sparse_weights.max_abs_diff")
    assert reference_gate(max_abs_diff=0.1).failures({"heads": heads}) == []


def test_head_stats_against_first_principles():
    got = np.array([[1.0, 0.0], [1.0, 1.0]])
    want = np.array([[1.0, 0.0], [1.0, 0.0]])
    stats = HeadStats()
    stats.add(got, want)
    assert stats.max_abs_diff == 1.0
    assert math.isclose(stats.min_cosine, 1 / math.sqrt(2))
    assert math.isclose(stats.mean_cosine, (1 + 1 / math.sqrt(2)) / 2)
    with pytest.raises(ValueError, match="different shapes"):
        stats.add(np.ones((2, 3)), np.ones((3, 2)))


def test_compare_outputs_of_identical_and_of_perturbed_results():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(3, 8)).astype(np.float32)
    colbert = [rng.normal(size=(n, 8)).astype(np.float32) for n in (2, 0, 5)]
    lexical = [{"1": 0.5, "2": 0.25}, {}, {"3": 1.0}]
    want = {"dense_vecs": dense, "colbert_vecs": colbert, "lexical_weights": lexical}
    same = compare_outputs(want, want)
    assert math.isclose(same["dense_cos_min"], 1.0) and math.isclose(same["colbert_cos_min"], 1.0)
    assert same["sparse_top10_overlap"] == 1.0
    assert same["dense_max_abs_diff"] == 0.0 and same["sparse_weight_max_abs_err"] == 0.0
    flipped = {
        **want,
        "dense_vecs": np.concatenate([dense[:2], -dense[2:]]),
        "lexical_weights": [{"1": 0.5}, {}, {"3": 0.9}],
    }
    figures = compare_outputs(flipped, want)
    assert math.isclose(figures["dense_cos_min"], -1.0) and math.isclose(figures["dense_cos_mean"], 1 / 3)
    assert math.isclose(figures["sparse_jaccard"], (1 / 2 + 1) / 2)
    assert math.isclose(figures["sparse_weight_max_abs_err"], 0.1, rel_tol=1e-6)
    with pytest.raises(ValueError, match="numbers of texts"):
        compare_outputs({**want, "dense_vecs": dense[:2]}, want)
