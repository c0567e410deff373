"""The evaluation CLI on a finished run: folders of unseen images at any size, and tfds splits."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pneumojax import evaluate


def _folder(root, rng):
    """Kaggle layout of images at odd sizes and modes, and one broken file."""
    for i in range(5):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / cls).mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert("RGB" if i % 2 else "L").save(
                root / cls / f"person{i}_virus_{i}.jpeg" if cls == "PNEUMONIA"
                else root / cls / f"IM-{i:04d}-0001.png")
    (root / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8 not really")


@pytest.mark.gpu
def test_a_folder_of_unseen_images_at_any_size(trained, tmp_path, capsys):
    _folder(tmp_path / "test", np.random.default_rng(0))
    out = tmp_path / "result.json"
    assert evaluate.main(["--workdir", str(trained), "--data", f"folder:{tmp_path / 'test'}",
                          "--out", str(out), "--n-boot", "100"]) == 0
    printed = capsys.readouterr().out
    assert "10 images" in printed and "1 rejected" in printed and "IM-9999-0001.jpeg" in printed
    result = json.loads(out.read_text())
    assert result["n"] == 10 and len(result["rejected"]) == 1
    summary = json.loads((trained / "summary.json").read_text())
    assert result["checkpoint"] == summary["best_step"]
    assert set(result["metrics"]) == {"0.5", "validation"}
    assert result["metrics"]["validation"]["threshold"] == summary["threshold"]
    for m in result["metrics"].values():
        assert sum(map(sum, m["confusion_matrix"])) == 10
        lo, hi = m["ci95"]["accuracy"]
        assert lo <= m["accuracy"] <= hi
    rows = list(csv.DictReader(out.with_suffix(".predictions.csv").open()))
    assert len(rows) == 10 and {r["patient"] for r in rows} >= {"person0", "IM-0000"}
    for name in ("roc", "confusion_0.5", "confusion_validation", "threshold_sweep"):
        assert (tmp_path / f"result_{name}.png").stat().st_size > 1000


@pytest.mark.gpu
def test_tfds_validation_reproduces_the_training_summary(trained):
    result = evaluate.evaluate(trained, "tfds:validation", n_boot=50)
    summary = json.loads((trained / "summary.json").read_text())
    ours, theirs = result["metrics"]["validation"], summary["validation"]["validation"]
    assert ours["confusion_matrix"] == theirs["confusion_matrix"]
    for key in ("accuracy", "roc_auc", "threshold"):
        assert ours[key] == pytest.approx(theirs[key])
    assert (trained / "eval" / "tfds-validation.json").exists()


def test_bad_arguments_are_reported_not_raised(trained, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(tmp_path), "--data", "tfds:validation"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(trained), "--data", "s3:bucket"]) == 2
    assert "folder:PATH or tfds:SPLIT" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(trained), "--data", "tfds:validation",
                          "--checkpoint", "999999"]) == 2
    assert "no checkpoint at step 999999" in capsys.readouterr().err
