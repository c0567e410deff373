"""Tests for pneumojax.metrics: hand-computed cases, brute-force cross-checks, the bootstrap."""

import json
import time

import numpy as np
import pytest

from pneumojax import metrics

# Zero division and single-class inputs are documented to be silent.
pytestmark = pytest.mark.filterwarnings("error")

# The example of sklearn's documentation: AUC 0.75, average precision 0.8333.
LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def _random(n: int, seed: int = 0, decimals: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A realistic, imperfect classifier; rounding makes ties common."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1).round(decimals)
    return labels, probs


def _brute_auc(labels, scores) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _brute_ap(labels, scores) -> float:
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        recall = tp / np.sum(labels == 1)
        ap += (recall - last_recall) * tp / np.sum(pred)
        last_recall = recall
    return float(ap)


def test_confusion_hand_computed():
    np.testing.assert_array_equal(metrics.confusion(LABELS, SCORES, 0.5), [[2, 0], [1, 1]])
    # A prob equal to the threshold counts as positive.
    np.testing.assert_array_equal(metrics.confusion(LABELS, SCORES, 0.35), [[1, 1], [0, 2]])
    assert metrics.confusion(LABELS, SCORES, 0.5).dtype == np.int64


def test_roc_and_pr_curves_hand_computed():
    fpr, tpr, thresholds = metrics.roc_curve(LABELS, SCORES)
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    precision, recall, thresholds = metrics.pr_curve(LABELS, SCORES)
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(precision, [1, 1, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(recall, [0, 0.5, 0.5, 1, 1])


def test_aucs_hand_computed():
    assert metrics.roc_auc(LABELS, SCORES) == pytest.approx(0.75)
    assert metrics.pr_auc(LABELS, SCORES) == pytest.approx(5 / 6)
    # A tie between a positive and a negative counts half: (0.5 + 1 + 1 + 1) / 4.
    tied_labels, tied = np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])
    assert metrics.roc_auc(tied_labels, tied) == pytest.approx(0.875)
    # Tied scores are one threshold: recall 0.5 at precision 1, then 1 at precision 2/3.
    assert metrics.pr_auc(tied_labels, tied) == pytest.approx(0.5 + 0.5 * 2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aucs_match_brute_force(seed):
    labels, scores = _random(300, seed, decimals=1)  # Few distinct values: many ties.
    assert metrics.roc_auc(labels, scores) == pytest.approx(_brute_auc(labels, scores), abs=1e-12)
    assert metrics.pr_auc(labels, scores) == pytest.approx(_brute_ap(labels, scores), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(labels, scores), abs=1e-12)


def test_perfect_and_inverted_classifiers():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert metrics.roc_auc(labels, scores) == 1.0
    assert metrics.pr_auc(labels, scores) == 1.0
    assert metrics.roc_auc(labels, 1 - scores) == 0.0


def test_single_class_gives_nan_aucs_silently():
    for labels in (np.zeros(4, int), np.ones(4, int)):
        scores = np.array([0.1, 0.4, 0.6, 0.9])
        assert np.isnan(metrics.roc_auc(labels, scores))
        assert np.isnan(metrics.pr_auc(labels, scores))
        result = metrics.classification_metrics(labels, scores)
        assert np.isnan(result["roc_auc"]) and np.isnan(result["pr_auc"])
        metrics.roc_curve(labels, scores)
        metrics.pr_curve(labels, scores)


def test_classification_metrics_hand_computed():
    result = metrics.classification_metrics(LABELS, SCORES, threshold=0.35)
    expected = {"accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "sensitivity": 1.0,
                "specificity": 0.5, "f1": 0.8, "roc_auc": 0.75, "pr_auc": 5 / 6}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert result["threshold"] == 0.35 and result["n"] == 4 and result["positives"] == 2
    assert result["confusion_matrix"] == [[1, 1], [0, 2]]
    json.dumps(result)  # Plain Python numbers, ready for a JSON line.


def test_zero_division_gives_zero():
    # Nothing predicted positive: precision and F1 are 0/0.
    result = metrics.classification_metrics(LABELS, SCORES, threshold=0.99)
    assert result["precision"] == 0.0 and result["f1"] == 0.0 and result["recall"] == 0.0
    assert result["specificity"] == 1.0
    # No negatives: specificity is 0/0.
    assert metrics.classification_metrics([1, 1], [0.2, 0.8])["specificity"] == 0.0


def test_at_thresholds_matches_confusion():
    labels, probs = _random(200)
    thresholds = np.array([0.0, 0.2, 0.35, 0.5, 0.77, 1.0])
    sweep = metrics.at_thresholds(labels, probs, thresholds)
    for i, t in enumerate(thresholds):
        (tn, fp), (fn, tp) = metrics.confusion(labels, probs, t)
        assert (sweep["tn"][i], sweep["fp"][i], sweep["fn"][i], sweep["tp"][i]) == (tn, fp, fn, tp)
        f1 = metrics.classification_metrics(labels, probs, t)["f1"]
        assert sweep["f1"][i] == pytest.approx(f1)


def test_weighted_ranking_equals_explicit_resample():
    # The bootstrap evaluates a resample through draw counts; it must equal the resample itself.
    labels, probs = _random(100, decimals=1)
    counts = np.random.default_rng(1).integers(0, 4, (3, labels.size)).astype(np.float64)
    order, starts, _ = metrics._tie_groups(probs)
    per_group = metrics._group_counts(labels.astype(bool), counts, order, starts)
    auc, ap = metrics._ranking_metrics(*per_group)
    for row, w in enumerate(counts.astype(int)):
        y, p = np.repeat(labels, w), np.repeat(probs, w)
        assert auc[row] == pytest.approx(metrics.roc_auc(y, p), abs=1e-12)
        assert ap[row] == pytest.approx(metrics.pr_auc(y, p), abs=1e-12)


def test_bootstrap_contains_point_and_narrows_with_n():
    widths = []
    for n in (200, 5000):
        labels, probs = _random(n)
        point = metrics.classification_metrics(labels, probs, 0.5)
        intervals = metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=300)
        assert set(intervals) == set(metrics.INTERVAL_METRICS)
        for key, (low, high) in intervals.items():
            assert low <= point[key] <= high, (n, key)
        widths.append({k: high - low for k, (low, high) in intervals.items()})
    for key in metrics.INTERVAL_METRICS:
        assert widths[1][key] < widths[0][key] / 2, key  # Width shrinks like 1/sqrt(n).


def test_bootstrap_reproducible_for_a_seed():
    labels, probs = _random(300)
    first = metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=200, seed=3)
    assert first == metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=200, seed=3)
    assert first != metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=200, seed=4)
    # Singleton groups are the per-example bootstrap, draw for draw.
    grouped = metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=200, seed=3,
                                          groups=np.arange(labels.size))
    assert grouped == first


def test_grouped_bootstrap_is_wider_for_correlated_groups():
    labels, probs = _random(200)
    # Five identical images per patient: only 200 independent units, not 1000.
    labels, probs, groups = (np.repeat(a, 5) for a in (labels, probs, np.arange(200)))
    flat = metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=400)
    grouped = metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=400, groups=groups)
    for key in metrics.INTERVAL_METRICS:
        flat_width, grouped_width = (v[key][1] - v[key][0] for v in (flat, grouped))
        assert grouped_width > 1.5 * flat_width, key  # sqrt(5) = 2.2 in expectation.


def test_bootstrap_single_class_gives_nan_auc_intervals_silently():
    intervals = metrics.bootstrap_intervals(np.ones(20, int), np.linspace(0, 1, 20), 0.5, n_boot=50)
    assert all(np.isnan(intervals["roc_auc"])) and all(np.isnan(intervals["pr_auc"]))
    assert intervals["specificity"] == (0.0, 0.0)


def test_bootstrap_is_fast():
    labels, probs = _random(5000)
    start = time.perf_counter()
    metrics.bootstrap_intervals(labels, probs, 0.5, n_boot=1000)
    assert time.perf_counter() - start < 5.0  # The target is 2 s; 5 s leaves room for slow CI.


def test_choose_threshold_each_criterion():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # Youden's J is 0.75 at both 0.7 and 0.4: ties go to the higher threshold.
    assert metrics.choose_threshold(labels, probs, "youden") == 0.7
    assert metrics.choose_threshold(labels, probs) == 0.7
    assert metrics.choose_threshold(labels, probs, "balanced_accuracy") == 0.7
    assert metrics.choose_threshold(labels, probs, "f1") == 0.4  # F1 8/9 there, 6/7 at 0.7.
    assert metrics.choose_threshold(labels, probs, "sensitivity:0.95") == 0.4
    assert metrics.choose_threshold(labels, probs, "sensitivity:0.75") == 0.7
    assert metrics.choose_threshold(labels, probs, "sensitivity:0.5") == 0.8


@pytest.mark.parametrize("criterion", ["accuracy", "sensitivity:1.5", "sensitivity:x"])
def test_choose_threshold_rejects_bad_criteria(criterion):
    with pytest.raises(ValueError):
        metrics.choose_threshold(LABELS, SCORES, criterion)


def test_choose_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        metrics.choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])


@pytest.mark.parametrize("labels, probs", [
    ([0, 2], [0.1, 0.2]), ([0, 1], [0.1, np.nan]), ([0, 1, 1], [0.1, 0.2]), ([], [])])
def test_bad_inputs_raise(labels, probs):
    with pytest.raises(ValueError):
        metrics.classification_metrics(labels, probs)


def test_summarize():
    labels, probs = _random(300)
    groups = np.arange(300) // 2
    summary = metrics.summarize(labels, probs, {"0.5": 0.5, "validation": 0.42},
                                groups=groups, n_boot=100)
    assert set(summary) == {"0.5", "validation"}
    for name, t in (("0.5", 0.5), ("validation", 0.42)):
        entry = summary[name]
        assert entry["threshold"] == t
        intervals = metrics.bootstrap_intervals(labels, probs, t, n_boot=100, groups=groups)
        assert entry["ci95"] == intervals
        assert entry["accuracy"] == metrics.classification_metrics(labels, probs, t)["accuracy"]
    json.dumps(summary)


def _strict_json(value) -> object:
    """The value through JSON that refuses NaN and infinities, both ways."""
    def refuse(constant: str):
        raise ValueError(f"{constant} in JSON")
    return json.loads(json.dumps(value, allow_nan=False), parse_constant=refuse)


@pytest.mark.parametrize("labels, undefined", [
    (np.zeros(4, int), {"recall", "sensitivity", "roc_auc", "pr_auc"}),
    (np.ones(4, int), {"specificity", "roc_auc", "pr_auc"}),
])
def test_one_class_reports_what_is_defined_and_why_the_rest_is_not(labels, undefined):
    probs = np.array([0.1, 0.4, 0.6, 0.9])  # some predicted positive: precision is defined
    reasons = metrics.undefined(labels, probs, 0.5)
    assert set(reasons) == undefined
    assert "both classes" in reasons["roc_auc"]
    summary = _strict_json(metrics.summarize(labels, probs, {"0.5": 0.5}, n_boot=50))["0.5"]
    assert summary["undefined"] == reasons
    for key in metrics.INTERVAL_METRICS:
        assert (summary[key] is None) == (key in undefined)
        assert (summary["ci95"][key] is None) == (key in undefined)
    assert summary["accuracy"] == 0.5 and summary["confusion_matrix"] == (
        [[2, 2], [0, 0]] if labels[0] == 0 else [[0, 0], [2, 2]])


def test_nothing_predicted_positive_leaves_precision_undefined():
    labels, probs = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    reasons = metrics.undefined(labels, probs, 0.5)
    assert set(reasons) == {"precision"} and "predicted PNEUMONIA" in reasons["precision"]
    # F1 is 2 TP / (2 TP + FP + FN) = 0 / 2 here: a real zero, not 0/0.
    assert metrics.summarize(labels, probs, {"0.5": 0.5}, n_boot=20)["0.5"]["f1"] == 0.0
    assert metrics.undefined(labels, probs, 0.35) == {}
