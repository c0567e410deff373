"""Ensembles: several runs scored as one, in Python and through evaluate and predict."""

import json

import numpy as np
import pytest
from PIL import Image

from pneumojax import cli, ensemble, evaluate, inference, metrics, predict
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def second(synthetic, tmp_path_factory):
    """Another run on the same validation split: another seed, model and input size (40 px)."""
    from pneumojax import training
    workdir = tmp_path_factory.mktemp("second")
    c = tiny_config(synthetic[0], seed=1)
    c.data.image_size = 40
    training.train_and_evaluate(c, workdir)
    return workdir


def test_an_ensemble_of_one_is_that_run(trained):
    e, model = ensemble.load(trained), inference.load(trained)
    assert e.threshold == model.threshold and len(e.members) == 1
    source = ensemble.load_images("tfds:validation", model.config)[0]
    labels, probs, index = model.score_split(source)
    s = e.score("tfds:validation")
    np.testing.assert_array_equal(index, np.arange(len(source)))
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_allclose(s.probs, probs, rtol=1e-6)


def test_two_runs_average_and_choose_their_threshold_on_validation(trained, second):
    e = ensemble.load([trained, second])
    one, two = (ensemble.load(w).score("tfds:validation") for w in (trained, second))
    both = e.score("tfds:validation")
    assert both.files == one.files and sorted(two.files) == sorted(one.files)
    order = [two.files.index(f) for f in one.files]
    np.testing.assert_allclose(both.probs, (one.probs + two.probs[order]) / 2, rtol=1e-5)
    # chosen on the stored validation predictions, which are these scores
    expected = metrics.choose_threshold(both.labels, both.probs, "youden")
    assert e.threshold == pytest.approx(expected, abs=1e-5)
    assert "mean of 2 runs" in e.describe() and "40 px" in e.describe()


def test_a_transform_reaches_every_member(trained, second):
    e = ensemble.load([trained, second])
    same = e.score("tfds:validation", transform=lambda x: x)
    np.testing.assert_allclose(same.probs, e.score("tfds:validation").probs, rtol=1e-6)
    inverted = e.score("tfds:validation", transform=lambda x: 255 - x)
    assert not np.allclose(inverted.probs, same.probs)


def test_evaluate_and_predict_take_several_workdirs(trained, second, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(trained), "--workdir", str(second),
                          "--data", "tfds:validation", "--n-boot", "20"]) == 0
    assert "mean of 2 runs" in capsys.readouterr().out
    result = json.loads((trained / "eval" / "ensemble2-tfds-validation.json").read_text())
    assert [m["image_size"] for m in result["members"]] == [32, 40]
    rng, films = np.random.default_rng(0), tmp_path / "films"
    films.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50, 60), np.uint8)).save(films / f"x{i}.png")
    records = list(predict.predict([trained, second], [films], out=tmp_path / "out"))
    singles = [list(predict.predict([w], [films], out=tmp_path / "o")) for w in
               (trained, second)]
    assert len(records) == 3
    for r, a, b in zip(records, *singles, strict=True):
        assert r["probability"] == pytest.approx((a["probability"] + b["probability"]) / 2,
                                                 abs=1e-6)
        assert r["heatmap"].endswith(".png")


def test_members_must_share_the_validation_split(trained, synthetic, tmp_path):
    from pneumojax import training
    c = tiny_config(synthetic[0], epochs=0.5)
    c.data.holdout = "synthetic-00000"
    training.train_and_evaluate(c, tmp_path / "held")
    with pytest.raises(cli.UserError, match="validation split differs.*data.holdout"):
        ensemble.load([trained, tmp_path / "held"])
