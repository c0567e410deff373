"""experiments/cohort_levers.py end to end on the synthetic source: two variants trained with a
sub-cohort held out, an ensemble of them, the table, and a finished run reused."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["data.image_size=32", "data.synthetic_count=96", "data.validation_fraction=0.25",
        "train.batch_size=8", "train.eval_batch_size=16", "train.epochs=1",
        "model.kwargs.widths=(4, 4, 8, 8)"]


def _levers(argv, tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
    proc = subprocess.run([sys.executable, "experiments/cohort_levers.py", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow  # trains two runs and scores them under every shift
def test_variants_an_ensemble_and_the_table(tmp_path):
    argv = ["--holdout", "synthetic-00000", "--variants", "baseline,equalize",
            "--workdir-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--n-boot", "20", *(a for t in TINY for a in ("--set", t))]
    rc, output = _levers(argv, tmp_path)
    assert rc == 0, output
    records = {r["name"]: r for r in json.loads((tmp_path / "out/cohort_levers.json").read_text())}
    assert list(records) == ["baseline", "equalize"]
    assert records["equalize"]["overrides"] == ["data.intensity='equalize'"]
    config = json.loads((tmp_path / "runs/equalize/config.json").read_text())
    assert config["data"]["intensity"] == "equalize"
    assert config["data"]["holdout"] == "synthetic-00000"
    for r in records.values():
        assert r["summary"]["holdout"]["specificity"] is not None and r["wall_s"] > 0
        assert set(r["report"]["shifts"]) >= {"blur", "resolution", "markers"}
    md = (tmp_path / "out/cohort_levers.md").read_text()
    assert "| baseline |" in md and "| equalize | histogram equalisation |" in md

    trained = (tmp_path / "runs/baseline/summary.json").stat().st_mtime_ns
    rc, output = _levers([*argv[:2], "--variants", "baseline,seed1,seed2,ensemble3", *argv[4:]],
                         tmp_path)
    assert rc == 0, output
    assert (tmp_path / "runs/baseline/summary.json").stat().st_mtime_ns == trained  # reused
    records = {r["name"]: r for r in json.loads((tmp_path / "out/cohort_levers.json").read_text())}
    assert "mean of 3 runs" in records["ensemble3"]["report"]["model"]
    assert records["ensemble3"]["wall_s"] == pytest.approx(
        sum(records[m]["wall_s"] for m in ("baseline", "seed1", "seed2")))
