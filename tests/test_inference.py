"""pneumojax.inference: a trained run restored into one object, scoring arrays, splits and files
the same way evaluate and predict do, without importing training code."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumojax import cli, data, evaluate, inference, workdirs

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(trained):
    return inference.load(trained)


def test_load_gives_the_config_threshold_and_step_of_the_best_checkpoint(trained, model):
    summary = json.loads((trained / "summary.json").read_text())
    assert model.step == summary["best_step"]
    assert model.threshold == pytest.approx(summary["threshold"])
    assert model.config.to_dict() == workdirs.load_config(trained).to_dict()
    assert set(model.state) == {"params", "rest", "step"}  # no optimizer state read
    assert inference.load(trained, "latest").step >= model.step


def test_score_split_and_score_agree_with_each_other_and_with_evaluate(synthetic, trained, model):
    source = data.data_source(synthetic[1], "validation", data_dir=synthetic[0])
    labels, probs, index = model.score_split(source)
    assert sorted(index) == list(range(len(source)))
    batch = np.stack([source[int(i)]["image"] for i in index])
    np.testing.assert_allclose(model.score(batch), probs, rtol=1e-5, atol=1e-6)
    result = evaluate.evaluate(trained, "tfds:validation", n_boot=10)
    assert result["metrics"]["validation"]["threshold"] == pytest.approx(model.threshold)
    assert result["n"] == len(labels)


def test_predict_files_returns_arrays_and_names_unreadable_files(synthetic, model, tmp_path):
    source = data.data_source(synthetic[1], "validation", data_dir=synthetic[0])
    for i in range(3):
        Image.fromarray(source[i]["image"][..., 0]).resize((50, 70)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    preds = model.predict_files([tmp_path])
    assert preds.files == [str(tmp_path / f"{i}.png") for i in range(3)]
    assert list(preds.errors) == [str(tmp_path / "broken.png")]
    assert preds.probability.shape == (3,) and preds.threshold == model.threshold
    expected = np.where(preds.probability >= model.threshold, "PNEUMONIA", "NORMAL")
    assert list(preds.label) == list(expected)
    size = model.config.data.image_size
    assert preds.maps.shape == (3, size, size)
    assert 0 <= preds.maps.min() and preds.maps.max() <= 1
    quick = model.predict_files([tmp_path], heatmaps=False)
    assert quick.maps is None
    np.testing.assert_allclose(quick.probability, preds.probability, rtol=1e-5, atol=1e-6)


def test_a_wrong_workdir_or_checkpoint_is_one_user_error(trained, tmp_path):
    with pytest.raises(cli.UserError, match="no such folder"):
        inference.load(tmp_path / "nowhere")
    with pytest.raises(cli.UserError, match="not a training run"):
        inference.load(tmp_path)
    with pytest.raises(cli.UserError, match="no such checkpoint"):
        inference.load(trained, 10**6)


def test_inference_evaluate_and_predict_import_no_training_code():
    code = ("import sys, pneumojax.inference, pneumojax.evaluate, pneumojax.predict; "
            "print([m for m in sys.modules if m.startswith('pneumojax.training')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
