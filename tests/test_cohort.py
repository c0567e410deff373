"""The cohort proxy end to end on tiny synthetic runs: shifts, a held-out sub-cohort, a folder."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from pneumojax import cli, cohort, ensemble, metrics, shifts
from tests.conftest import tiny_config

PREFIX = "synthetic-00000"  # the synthetic set's first ten patients, of both classes


@pytest.fixture(scope="module")
def held(synthetic, tmp_path_factory):
    """A tiny run trained with `data.holdout`: its prepared set has a split "holdout"."""
    from pneumojax import training
    workdir = tmp_path_factory.mktemp("held")
    c = tiny_config(synthetic[0], epochs=1.0)
    c.data.holdout = PREFIX
    training.train_and_evaluate(c, workdir)
    return workdir


def _folder(root):
    """Kaggle layout, 6 images of odd sizes, as the 16-film `val` split is."""
    rng = np.random.default_rng(0)
    for i in range(3):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / cls).mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            Image.fromarray(rng.integers(0, 255, size, np.uint8)).save(
                root / cls / (f"person{i}_virus_{i}.jpeg" if cls == "PNEUMONIA"
                              else f"IM-{i:04d}-0001.png"))


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} in JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_one_command_reports_the_three_parts(held, tmp_path, capsys):
    _folder(tmp_path / "val")
    spec = f"folder:{tmp_path / 'val'}"
    assert cohort.main(["--workdir", str(held), "--data", spec, "--n-boot", "20"]) == 0
    printed = capsys.readouterr().out
    result = _strict_json((held / "eval" / "cohort.json").read_text())
    e = ensemble.load([held])
    assert result["threshold"] == e.threshold and result["workdirs"] == [str(held)]
    # clean validation, at the frozen threshold
    clean = e.score("tfds:validation")
    expected = metrics.classification_metrics(clean.labels, clean.probs, e.threshold)
    v = result["validation"]["metrics"]
    assert result["validation"]["n"] == expected["n"]
    assert v["accuracy"] == pytest.approx(expected["accuracy"])
    assert v["ci95"]["accuracy"][0] <= v["accuracy"] <= v["ci95"]["accuracy"][1]
    # (a) every shift at both levels, and the summary's worst is the minimum
    assert list(result["shifts"]) == list(shifts.SHIFTS)
    for name, r in result["shifts"].items():
        assert list(r["severity"].values()) == list(shifts.LEVELS[name])
        for level in shifts.LEVEL_NAMES:
            assert set(r[level]) == set(cohort.SHIFT_METRICS)
    strong = result["summary"]["shifts"]["strong"]["balanced_accuracy"]
    assert strong["worst"] == min(r["strong"]["balanced_accuracy"]
                                  for r in result["shifts"].values())
    assert strong["worst"] == result["shifts"][strong["worst_shift"]]["strong"][
        "balanced_accuracy"]
    # (b) the held-out sub-cohort: every file has the prefix; its NORMAL against validation's
    h = result["holdout"]
    held_out = e.score("tfds:holdout")
    assert h["prefix"] == PREFIX and h["n"] == len(held_out.files) > 0
    assert all(pathlib.PurePath(f).name.startswith(PREFIX) for f in held_out.files)
    assert not set(held_out.files) & set(clean.files)
    versus = h["normal_vs_validation_pneumonia"]
    assert versus["n_normal"] == h["classes"]["NORMAL"]
    assert versus["n_pneumonia"] == int(clean.labels.sum())
    assert 0 <= versus["roc_auc"] <= 1
    assert result["summary"]["holdout"]["specificity"] == h["metrics"]["specificity"]
    # (c) the folder, with the warning its size deserves
    f = result["folders"][spec]
    assert f["n"] == 6 and "intervals are wide" in f["note"]
    assert result["summary"]["folders"][spec]["accuracy"] == f["metrics"]["accuracy"]
    for text in ("validation  n", "blur", "strong shifts:", f"holdout '{PREFIX}'", spec,
                 "written:"):
        assert text in printed, text


def test_without_a_sub_cohort_the_holdout_part_says_why(trained):
    result = cohort.report(ensemble.load([trained]), n_boot=10, shift_names=["jpeg"])
    assert "data.holdout is empty" in result["holdout"]["skipped"]
    assert result["summary"]["holdout"] is None and list(result["shifts"]) == ["jpeg"]
    assert "holdout  skipped" in cohort.format_report(result)
    json.dumps(result, allow_nan=False)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--workdir", "{tmp}/nowhere"], "--workdir {tmp}/nowhere: no such folder"),
    (["--workdir", "{tmp}", "--data", "tfds:test"], "--data 'tfds:test': use folder:PATH"),
    (["--workdir", "{tmp}", "--n-boot", "0"], "--n-boot 0: give at least 1"),
])
def test_a_mistake_is_one_line_and_status_2(tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    assert cli.run(cohort.main, args) == 2
    assert message.format(tmp=tmp_path) in _error_line(capsys)
