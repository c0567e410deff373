"""Classification metrics, curves, bootstrap intervals and threshold choice, in numpy.

Host side on purpose: evaluation gathers every probability first, and exact ranking
metrics need the whole split at once. Labels are 0 (NORMAL) and 1 (PNEUMONIA); probs
and scores are P(PNEUMONIA), and an example is predicted positive iff prob >= threshold.

Every ranking metric goes through one weighted code path (`_tie_groups`,
`_ranking_metrics`): with unit weights it gives the point estimate, and with the
multiplicities of a bootstrap resample it gives all resamples at once, without
materialising them. Hence the bootstrap is exact, fast, and tested by the same
brute-force checks as the point estimates.

Zero division (e.g. precision when nothing is predicted positive) gives 0.0, as
sklearn's `zero_division=0` does, without a warning. AUCs are nan when a class is
missing, because ranking needs both; a missing class is normal in small bootstrap
resamples, and nan is what `np.nanpercentile` then skips. `summarize`, which reports
read, shows such a metric as None with its reason (`undefined`).
"""

from collections.abc import Mapping

import numpy as np

# The metrics that get bootstrap intervals; the other keys of
# `classification_metrics` (threshold, n, positives) describe the sample.
INTERVAL_METRICS: tuple[str, ...] = (
    "accuracy", "precision", "recall", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc")
CRITERIA: tuple[str, ...] = ("youden", "f1", "balanced_accuracy", "sensitivity:<target>",
                             "prevalence:<p>")
ECE_BINS = 15  # equal-width bins of P(PNEUMONIA) for the expected calibration error
_CLIP = 1e-7  # probabilities are clipped to [_CLIP, 1 - _CLIP] before taking logits

_BOOT_CHUNK_ELEMENTS = 1 << 22  # Resamples x examples per chunk: about 32 MB per float64 array.


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(bool labels, float scores) as 1-D arrays; bad input raises rather than skewing a metric."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D")
    if labels.size == 0:
        raise ValueError("no examples")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{np.count_nonzero(~np.isfinite(scores))} scores are nan or inf")
    return labels.astype(bool), scores


def _ratio(num, den, fill: float = 0.0) -> np.ndarray:
    """num / den, `fill` where den == 0, without a warning."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.full(num.shape, fill), where=den != 0)


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, distinct): `order` sorts scores descending; tied scores form the
    groups that begin at `starts` in that order; `distinct` holds each group's score.

    Tied scores must move together past any threshold, so curves step once per group.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    return order, starts, ranked[starts]


def _group_counts(labels: np.ndarray, weights: np.ndarray, order: np.ndarray,
                  starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted (positives, negatives) per tie group, shape (resamples, groups)."""
    ranked = weights[:, order]
    is_pos = labels[order]
    pos = np.add.reduceat(np.where(is_pos, ranked, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(is_pos, 0.0, ranked), starts, axis=1)
    return pos, neg


def _ranking_metrics(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(roc_auc, average precision) per row of per-group counts in descending score order.

    AUC is the Mann-Whitney statistic: P(score_pos > score_neg) + P(tie) / 2, i.e. the
    trapezoidal area under the full ROC curve. Average precision is sum over groups of
    (recall step) x (precision there), the step-wise sum sklearn uses, never interpolated.
    """
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    # Each positive beats the negatives ranked strictly below it and ties with half of its group's.
    wins = (pos * (n_neg[:, None] - fp + 0.5 * neg)).sum(axis=1)
    both = (n_pos > 0) & (n_neg > 0)
    auc = _ratio(wins, n_pos * n_neg, np.nan)
    ap = np.where(both, _ratio((pos * _ratio(tp, tp + fp)).sum(axis=1), n_pos, np.nan), np.nan)
    return auc, ap


def confusion(labels, probs, threshold: float) -> np.ndarray:
    """[[TN, FP], [FN, TP]] as int64, rows the true class, as sklearn orders it."""
    labels, probs = _check(labels, probs)
    pred = probs >= threshold
    return np.array([[np.sum(~labels & ~pred), np.sum(~labels & pred)],
                     [np.sum(labels & ~pred), np.sum(labels & pred)]], dtype=np.int64)


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending from +inf (the (0, 0) corner), one
    point per distinct score. Rates are nan when their class is missing."""
    labels, scores = _check(labels, scores)
    order, starts, distinct = _tie_groups(scores)
    pos, neg = _group_counts(labels, np.ones((1, labels.size)), order, starts)
    tp, fp = np.r_[0.0, np.cumsum(pos[0])], np.r_[0.0, np.cumsum(neg[0])]
    return _ratio(fp, fp[-1], np.nan), _ratio(tp, tp[-1], np.nan), np.r_[np.inf, distinct]


def _point_ranking(labels, scores) -> tuple[float, float]:
    """(roc_auc, average precision) of one sample: the unit-weight case of `_ranking_metrics`."""
    labels, scores = _check(labels, scores)
    order, starts, _ = _tie_groups(scores)
    auc, ap = _ranking_metrics(*_group_counts(labels, np.ones((1, labels.size)), order, starts))
    return float(auc[0]), float(ap[0])


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve, exact, ties counted half; nan with one class present."""
    return _point_ranking(labels, scores)[0]


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), thresholds descending from +inf, one point per
    distinct score. The +inf point has recall 0 and precision 1 by convention (sklearn's
    end point), so the curve starts on the axis; recall is nan without positives."""
    labels, scores = _check(labels, scores)
    order, starts, distinct = _tie_groups(scores)
    pos, neg = _group_counts(labels, np.ones((1, labels.size)), order, starts)
    tp, fp = np.cumsum(pos[0]), np.cumsum(neg[0])
    precision = np.r_[1.0, _ratio(tp, tp + fp)]
    recall = _ratio(np.r_[0.0, tp], tp[-1], np.nan)
    return precision, recall, np.r_[np.inf, distinct]


def pr_auc(labels, scores) -> float:
    """Average precision (step-wise, as sklearn's average_precision_score); nan with one
    class present, since AP is trivially 1 without negatives and undefined without positives."""
    return _point_ranking(labels, scores)[1]


def _rates(tn, fp, fn, tp) -> dict[str, np.ndarray]:
    """Threshold metrics from confusion counts of any (broadcast) shape; 0/0 gives 0.0."""
    precision, recall, specificity = _ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {"accuracy": _ratio(tp + tn, tn + fp + fn + tp), "precision": precision,
            "recall": recall, "sensitivity": recall, "specificity": specificity,
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "balanced_accuracy": (recall + specificity) / 2}


def at_thresholds(labels, probs, thresholds) -> dict[str, np.ndarray]:
    """Threshold metrics at each of many thresholds at once: the sweep behind
    `choose_threshold` and the threshold plot. Keys: tn, fp, fn, tp and `_rates`'s."""
    labels, probs = _check(labels, probs)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    # Positives predicted at t are those with prob >= t: count via the sorted probs of each class.
    pos, neg = np.sort(probs[labels]), np.sort(probs[~labels])
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    tn, fn = neg.size - fp, pos.size - tp
    return {"tn": tn, "fp": fp, "fn": fn, "tp": tp, **_rates(tn, fp, fn, tp)}


def classification_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Threshold metrics at `threshold` plus ROC AUC and average precision, as plain
    Python numbers so the dict goes straight into a JSON line. Zero division gives 0.0
    (precision with no predicted positive, specificity with no negative, ...); the AUCs
    are nan when a class is missing."""
    labels, probs = _check(labels, probs)
    cm = confusion(labels, probs, threshold)
    (tn, fp), (fn, tp) = cm
    rates = _rates(tn, fp, fn, tp)
    rates.pop("balanced_accuracy")
    auc, ap = _point_ranking(labels, probs)
    return {**{k: float(v) for k, v in rates.items()}, "roc_auc": auc, "pr_auc": ap,
            "threshold": float(threshold), "n": int(labels.size), "positives": int(labels.sum()),
            "confusion_matrix": cm.tolist()}


def _resample_counts(rng: np.random.Generator, n_rows: int, n: int) -> np.ndarray:
    """How often each of n items is drawn in each of n_rows resamples of size n: (n_rows, n)."""
    draws = rng.integers(0, n, size=(n_rows, n)) + n * np.arange(n_rows)[:, None]
    return np.bincount(draws.ravel(), minlength=n_rows * n).reshape(n_rows, n).astype(np.float64)


def bootstrap_intervals(labels, probs, threshold: float, *, n_boot: int = 1000, seed: int = 0,
                        groups=None, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for each of `INTERVAL_METRICS`.

    With `groups` (e.g. patient ids, one per example), whole groups are resampled:
    images of one patient are correlated, and resampling them one by one would give
    intervals that are too narrow. Each resample is represented by how many times it
    draws each example, so all resamples are evaluated together. Resamples that lack a
    class give nan AUCs, which are skipped; an interval is (nan, nan) if all are nan.
    """
    labels, probs = _check(labels, probs)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    if groups is None:
        members, n_units = np.arange(labels.size), labels.size
    else:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups {groups.shape} must match labels {labels.shape}")
        _, members = np.unique(groups, return_inverse=True)
        n_units = int(members.max()) + 1
    rng = np.random.default_rng(seed)
    order, starts, _ = _tie_groups(probs)
    pred = probs >= threshold
    cells = [~labels & ~pred, ~labels & pred, labels & ~pred, labels & pred]  # TN, FP, FN, TP.
    indicators = np.stack(cells, axis=1).astype(np.float64)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // labels.size)
    values: dict[str, list[np.ndarray]] = {k: [] for k in INTERVAL_METRICS}
    for first in range(0, n_boot, chunk):
        weights = _resample_counts(rng, min(chunk, n_boot - first), n_units)[:, members]
        tn, fp, fn, tp = (weights @ indicators).T
        rates = _rates(tn, fp, fn, tp)
        counts = _group_counts(labels, weights, order, starts)
        rates["roc_auc"], rates["pr_auc"] = _ranking_metrics(*counts)
        for k in INTERVAL_METRICS:
            values[k].append(rates[k])
    tails = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    intervals = {}
    for k, parts in values.items():
        v = np.concatenate(parts)
        low, high = np.nanpercentile(v, tails) if np.isfinite(v).any() else (np.nan, np.nan)
        intervals[k] = (float(low), float(high))
    return intervals


def choose_threshold(labels, probs, criterion: str = "youden") -> float:
    """The threshold that best meets `criterion`, among the observed probabilities.

    "youden" maximises TPR - FPR, "f1" maximises F1, "balanced_accuracy" maximises
    (TPR + TNR) / 2 (= (1 + Youden's J) / 2, so it picks the same threshold as "youden");
    "sensitivity:0.95" is the highest threshold whose sensitivity is at least 0.95, the
    screening operating point. Ties go to the highest threshold. Choose on validation,
    never on test, and store the result with the checkpoint.

    "youden" weighs sensitivity and specificity equally: it minimises the mean of the two
    error rates, the expected error at a prevalence of 0.5 whatever the validation set's.
    "prevalence:0.1" is instead the Bayes (minimum expected error) threshold where 10 % of
    the images are PNEUMONIA: probabilities calibrated at the validation prevalence pi_v carry
    its prior odds, so logit(t) = logit(pi_v) - logit(0.1) swaps them for the deployment's.
    It is a formula, not a search, and right only for calibrated probabilities
    (`fit_temperature`; config_check asks for train.calibrate).
    """
    labels, probs = _check(labels, probs)
    if labels.all() or not labels.any():
        raise ValueError("choosing a threshold needs both classes")
    if criterion.startswith("prevalence:"):
        prevalence = float(criterion.removeprefix("prevalence:"))
        if not 0 < prevalence < 1:
            raise ValueError(f"prevalence must lie in (0, 1), got {prevalence}")
        return float(_sigmoid(_logit(labels.mean()) - _logit(prevalence)))
    candidates = np.unique(probs)[::-1]  # Descending, so argmax breaks ties to the highest.
    sweep = at_thresholds(labels, probs, candidates)
    if criterion.startswith("sensitivity:"):
        target = float(criterion.removeprefix("sensitivity:"))
        if not 0 <= target <= 1:
            raise ValueError(f"sensitivity target must lie in [0, 1], got {target}")
        # Sensitivity only grows as the threshold falls, and the lowest candidate reaches 1.
        return float(candidates[np.argmax(sweep["sensitivity"] >= target)])
    objectives = {"youden": sweep["sensitivity"] + sweep["specificity"] - 1,
                  "f1": sweep["f1"], "balanced_accuracy": sweep["balanced_accuracy"]}
    if criterion not in objectives:
        raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    return float(candidates[np.argmax(objectives[criterion])])


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _CLIP, 1 - _CLIP)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(z, np.float64)))  # no overflow for any z


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """sigmoid(logit(probs) / temperature), in float64; temperature 1 returns `probs` as
    they are, without the round trip through logits."""
    if temperature == 1:
        return np.asarray(probs)
    return _sigmoid(_logit(probs) / temperature)


def _nll(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of bool labels against logits, stable for any logit."""
    return float(np.mean(np.logaddexp(0, logits) - labels * logits))


def fit_temperature(labels, probs, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T in `bounds` whose sigmoid(logit(probs) / T) has the least binary
    cross-entropy on `labels`: temperature scaling (Guo et al. 2017), fitted on validation.

    One parameter cannot change the ranking, so ROC-AUC stays as it is; it only makes an
    overconfident model (T > 1) say 0.8 where 80 % are PNEUMONIA, which a threshold for
    another prevalence (`choose_threshold`'s "prevalence:p") relies on. The NLL is convex in
    1/T, hence unimodal in log T: golden-section search there is exact to 1e-9 in log T,
    deterministic and needs no derivative. A bound comes back when the optimum lies beyond it
    (e.g. separable validation data want T -> 0).
    """
    labels, probs = _check(labels, probs)
    z = _logit(probs)
    nll = lambda u: _nll(labels, z * np.exp(-u))
    a, b = np.log(bounds)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > 1e-9:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return float(np.exp((a + b) / 2))


def calibration(labels, probs) -> dict[str, float]:
    """How far probabilities are from frequencies: {ece, brier, nll}.

    ece: the expected calibration error over `ECE_BINS` equal-width bins of P(PNEUMONIA)
    (the last one closed at 1), the share-weighted mean of |fraction PNEUMONIA - mean
    probability| per bin; brier: the mean squared error of the probability; nll: the mean
    binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7].
    """
    labels, probs = _check(labels, probs)
    bins = np.clip((probs * ECE_BINS).astype(np.int64), 0, ECE_BINS - 1)
    gap = np.bincount(bins, labels - probs, minlength=ECE_BINS)  # sum per bin of (y - p)
    return {"ece": float(np.abs(gap).sum() / labels.size),
            "brier": float(np.mean((probs - labels) ** 2)),
            "nll": _nll(labels, _logit(probs))}


def undefined(labels, probs, threshold: float) -> dict[str, str]:
    """The metrics of `classification_metrics` that are 0/0 on this sample, each with why.

    Their values there (0.0, or nan for the AUCs) are conventions that keep sweeps and
    bootstraps running, not measurements: a report shows none and says why instead. A test
    folder of one class is the usual case.
    """
    labels, probs = _check(labels, probs)
    (tn, fp), (fn, tp) = confusion(labels, probs, threshold)
    only = "PNEUMONIA" if labels.all() else "NORMAL"
    checks = {"precision": (tp + fp == 0, f"no image predicted PNEUMONIA at {threshold:.3f}"),
              "recall": (tp + fn == 0, "no PNEUMONIA image"),
              "specificity": (tn + fp == 0, "no NORMAL image"),
              "f1": (2 * tp + fp + fn == 0, "no PNEUMONIA image, and none predicted"),
              "roc_auc": (labels.all() or not labels.any(),
                          f"ranking needs both classes; only {only} images")}
    checks["sensitivity"], checks["pr_auc"] = checks["recall"], checks["roc_auc"]
    return {k: checks[k][1] for k in INTERVAL_METRICS if k in checks and checks[k][0]}


def _interval_or_none(interval: tuple[float, float]) -> tuple[float, float] | None:
    return interval if np.isfinite(interval).all() else None


def summarize(labels, probs, thresholds: Mapping[str, float], *, groups=None,
              n_boot: int = 1000, seed: int = 0) -> dict:
    """{name: {**classification_metrics, "ci95": bootstrap_intervals, "undefined"}} per
    named threshold, e.g. {"0.5": 0.5, "validation": t}, so a report shows the fixed and the
    validation-chosen operating points side by side.

    A metric in `undefined` (metric: reason) is None, as is its interval, and so is an
    interval no resample defines: the dict holds no nan, and its JSON is strict.
    """
    summary = {}
    for name, t in thresholds.items():
        values = classification_metrics(labels, probs, t)
        intervals = bootstrap_intervals(labels, probs, t, n_boot=n_boot, seed=seed,
                                        groups=groups, level=0.95)
        gaps = undefined(labels, probs, t)
        summary[name] = {**values, **dict.fromkeys(gaps),
                         "ci95": {k: None if k in gaps else _interval_or_none(v)
                                  for k, v in intervals.items()},
                         "undefined": gaps}
    return summary
