"""Temperature scaling on validation, calibration metrics, and the prevalence threshold."""

import dataclasses
import json

import numpy as np
import pytest

from pneumojax import checkpoint, config_check, data, inference, metrics, training
from tests.conftest import tiny_config

sigmoid = lambda z: 1 / (1 + np.exp(-z))
logit = lambda p: np.log(p / (1 - p))


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20_000)
    labels = rng.random(z.size) < sigmoid(z / 2)  # the truth is twice as cautious as z says
    t = metrics.fit_temperature(labels, sigmoid(z))
    assert abs(t - 2) < 0.1, t
    assert metrics.fit_temperature(labels, sigmoid(z)) == t  # deterministic
    assert abs(metrics.fit_temperature(labels, sigmoid(z / 2)) - 1) < 0.05
    calibrated = metrics.apply_temperature(sigmoid(z), t)
    np.testing.assert_allclose(calibrated, sigmoid(z / t), rtol=1e-6)
    before, after = (metrics.calibration(labels, p) for p in (sigmoid(z), calibrated))
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 3
    assert metrics.roc_auc(labels, calibrated) == metrics.roc_auc(labels, sigmoid(z))


def test_apply_temperature_1_is_the_identity_and_separable_data_hit_the_bound():
    probs = np.array([0.0, 0.3, 1.0], np.float32)
    np.testing.assert_array_equal(metrics.apply_temperature(probs, 1.0), probs)
    assert metrics.fit_temperature([0, 1], [0.3, 0.7]) == pytest.approx(0.05)


def test_calibration_metrics_match_the_hand_computation():
    labels, probs = [0, 1, 1, 0, 1], [0.1, 0.9, 0.5, 0.52, 1.0]
    # Bins of 1/15: 0.1 -> 1, 0.9 -> 13, 0.5 and 0.52 -> 7, 1.0 -> the last, 14.
    ece = (0.1 + 0.1 + abs(1 - (0.5 + 0.52)) + 0) / 5
    brier = (0.01 + 0.01 + 0.25 + 0.52 ** 2 + 0) / 5
    nll = -(np.log(0.9) * 2 + np.log(0.5) + np.log(0.48) + np.log(1 - 1e-7)) / 5
    got = metrics.calibration(labels, probs)
    np.testing.assert_allclose([got["ece"], got["brier"], got["nll"]], [ece, brier, nll],
                               rtol=1e-9)


def test_the_prevalence_threshold_minimises_the_expected_error_at_that_prevalence():
    labels = np.array([0, 0, 0, 1])  # validation prevalence 1/4
    assert metrics.choose_threshold(labels, [0.1, 0.2, 0.3, 0.9], "prevalence:0.25") == 0.5
    expected = sigmoid(logit(0.25) - logit(0.1))
    assert metrics.choose_threshold(labels, [0.1, 0.2, 0.3, 0.9], "prevalence:0.1") == (
        pytest.approx(expected))
    for bad in ("prevalence:0", "prevalence:1", "prevalence:x"):
        with pytest.raises(ValueError):
            metrics.choose_threshold(labels, [0.1, 0.2, 0.3, 0.9], bad)
    # Calibrated probabilities at 30 % PNEUMONIA, deployed where 5 % are: the formula's
    # threshold is where p FNR(t) + (1 - p) FPR(t) is least.
    rng = np.random.default_rng(1)
    probs = sigmoid(rng.normal(logit(0.3), 2, 200_000))
    labels = rng.random(probs.size) < probs
    t = metrics.choose_threshold(labels, probs, "prevalence:0.05")
    grid = np.linspace(0.3, 0.99, 300)
    sweep = metrics.at_thresholds(labels, probs, grid)
    error = 0.05 * (1 - sweep["sensitivity"]) + 0.95 * (1 - sweep["specificity"])
    assert abs(grid[np.argmin(error)] - t) < 0.03, (grid[np.argmin(error)], t)


def test_a_prevalence_threshold_needs_calibration(tmp_path):
    c = tiny_config(tmp_path, threshold="prevalence:0.1")
    assert not config_check.FIELDS["train.threshold"]("prevalence:0.1")
    assert "prevalence:0.1" in config_check.FIELDS["train.threshold"]("prevalence:1.5")
    (problem,) = config_check._training_problems(c)
    assert problem.startswith("config field train.threshold='prevalence:0.1'")
    assert problem.endswith("add --config.train.calibrate=True")
    c.train.calibrate = True
    assert not list(config_check._training_problems(c))


@pytest.mark.slow
def test_a_calibrated_run_keeps_its_temperature_and_validation_predictions(synthetic, tmp_path):
    c = tiny_config(synthetic[0], calibrate=True, threshold="prevalence:0.3")
    training.train_and_evaluate(c, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
    meta = ckpt.meta(summary["best_step"])
    ckpt.close()
    t = meta["temperature"]
    assert summary["temperature"] == t and t > 0 and t != 1.0
    before, after = summary["calibration"]["before"], summary["calibration"]["after"]
    assert set(before) == set(after) == {"ece", "brier", "nll"}
    assert after["nll"] <= before["nll"] + 1e-9  # T is the NLL's minimiser on these data

    source = data.data_source(synthetic[1], "validation", data_dir=synthetic[0])
    val = meta["validation_predictions"]
    assert val["file"] == [source[i]["file_name"].decode() for i in range(len(source))]
    assert val["label"] == [int(source[i]["label"]) for i in range(len(source))]
    assert summary["validation_prevalence"] == pytest.approx(np.mean(val["label"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("temperature" in r and "ece_after" in r for r in records
               if r["split"] == "validation")

    model = inference.load(tmp_path)
    assert model.temperature == t
    images = np.stack([source[i]["image"] for i in range(len(source))])
    scored = model.score(images)
    np.testing.assert_allclose(scored, val["probability"], atol=2e-6)
    raw = dataclasses.replace(model, temperature=1.0).score(images)
    np.testing.assert_allclose(metrics.apply_temperature(raw, t), scored, atol=2e-6)
    assert summary["validation"]["validation"]["threshold"] == pytest.approx(
        sigmoid(logit(np.mean(val["label"])) - logit(0.3)))
