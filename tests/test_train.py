"""Training end to end on tiny synthetic data: outputs, loss, NaN handling, resuming."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from pneumojax import checkpoint, data, inference, losses, tensorboard, training, workdirs
from pneumojax.data import builder
from pneumojax.training import step
from tests.conftest import tiny_config


@pytest.mark.slow
def test_lesion_supervision_trains_the_cells_on_the_masks(synthetic, tmp_path):
    """The same run with and without the masks: only the first fits its cells to them."""
    source = data.data_source(synthetic[1], "validation", data_dir=synthetic[0],
                              with_lesion_mask=True)
    x = jnp.asarray(np.stack([e["image"] for e in source]), jnp.float32) / 255
    masks = np.stack([e["lesion_mask"] for e in source]).astype(np.float32)
    fitted = {}
    for weight in (0.0, 10.0):
        c = tiny_config(synthetic[0], lesion_weight=weight, epochs=4.0, learning_rate=1e-2)
        c.model.name = "deep_cnn"
        c.model.kwargs = dict(widths=(4, 8), head="lesion", pool_r=10.0)
        training.train_and_evaluate(c, tmp_path / str(weight))
        model = inference.load(tmp_path / str(weight), "latest")
        fitted[weight] = float(losses.lesion_loss(
            nnx.merge(model.graphdef, model.state["params"], model.state["rest"])(x)[1], masks))
        logged = [json.loads(line) for line in
                  (tmp_path / str(weight) / "metrics.jsonl").read_text().splitlines()]
        assert all(("lesion_loss" in r) == (weight > 0) for r in logged if r["split"] == "train")
    assert fitted[10.0] < 0.7 * fitted[0.0], fitted  # 0.31 against 0.51 when written
    c.data.source = "medmnist"
    with pytest.raises(ValueError, match="only the synthetic source has, not 'medmnist'"):
        training.train_and_evaluate(c, tmp_path / "medmnist")


def test_class_weights_invert_the_train_frequencies():
    w = step.class_weights({"NORMAL": 25, "PNEUMONIA": 75}, True)
    np.testing.assert_allclose(w, [2.0, 2 / 3])
    np.testing.assert_allclose(step.class_weights({"NORMAL": 1, "PNEUMONIA": 3}, False), [1, 1])
    with pytest.raises(ValueError, match="lacks a class"):
        step.class_weights({"NORMAL": 0, "PNEUMONIA": 3}, True)


@pytest.mark.gpu
def test_a_run_writes_everything_a_user_looks_at(synthetic, tmp_path):
    c = tiny_config(synthetic[0])
    state = training.train_and_evaluate(c, tmp_path)
    splits = builder.load_report(*synthetic)["splits"]
    steps = 2 * (sum(splits["train"].values()) // 8)
    assert int(state["step"]) == steps
    assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "shallow_cnn"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, steps + 1))
    assert [r["step"] for r in records if r["split"] == "validation"] == [
        *range(3, steps + 1, 3), *([steps] if steps % 3 else [])]
    summary = json.loads((tmp_path / "summary.json").read_text())
    val = summary["validation"]
    assert set(val) == {"0.5", "validation"}
    assert val["validation"]["threshold"] == summary["threshold"]
    assert val["0.5"]["n"] == sum(splits["validation"].values())  # every validation image
    assert len(val["0.5"]["ci95"]["accuracy"]) == 2
    pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
    assert {"learning_curves.png", "roc.png", "confusion_matrix.png"} <= pngs
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.resolve("best") == summary["best_step"] and ckpt.latest_step() == steps
    assert ckpt.meta(summary["best_step"])["threshold"] == summary["threshold"]
    scalars = tensorboard.read_scalars(tmp_path / "tensorboard")  # the same records
    for r in records:
        for name in ("loss", "learning_rate", "images_per_s", "roc_auc", "accuracy"):
            if name in r:
                assert (r["step"], pytest.approx(r[name])) in scalars[f"{r['split']}/{name}"]
    images = [v for e in tensorboard.read_events(tmp_path / "tensorboard")
              for v in e.summary.value if v.HasField("image")]
    assert [v.tag for v in images] == ["validation/gradcam"]


@pytest.mark.gpu
def test_a_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
        synthetic, tmp_path, monkeypatch):
    import shutil
    c = tiny_config(synthetic[0])
    training.train_and_evaluate(c, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
    final, last = ckpt.steps()[-1], ckpt.steps()[-2]
    before = ckpt.meta(last)
    ckpt.close()
    shutil.rmtree(tmp_path / "checkpoints" / str(final))  # as if killed before the last save
    monkeypatch.setitem(losses.LOSSES, "bce", lambda *a, **k: jnp.float32(jnp.nan))
    with pytest.raises(FloatingPointError,
                       match=f"non-finite training loss at step {last + 1}.*step {last}"):
        training.train_and_evaluate(c, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.latest_step() == last and ckpt.meta(last) == before


@pytest.mark.slow
@pytest.mark.gpu
def test_the_device_resident_path_trains_and_resumes(synthetic, tmp_path):
    import shutil
    c = tiny_config(synthetic[0])
    c.data.device_resident = True
    full = training.train_and_evaluate(c, tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
    last, earlier = ckpt.steps()[-1], ckpt.steps()[-2]
    ckpt.close()
    shutil.rmtree(tmp_path / "checkpoints" / str(last))  # as if killed before the last save
    resumed = training.train_and_evaluate(c, tmp_path)
    assert earlier < last and int(resumed["step"]) == int(full["step"]) == last
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(full["params"])):
        np.testing.assert_array_equal(a, b)  # the batch order depends only on (seed, step)


def test_an_old_config_gets_new_defaults_and_loads_outside_a_checkout(tmp_path, monkeypatch):
    import sys
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "resnet50"}}))
    c = workdirs.load_config(tmp_path)
    assert c.model.name == "resnet50" and c.train.freeze == "none"  # a field added later
    monkeypatch.setitem(sys.modules, "configs", None)  # as when run outside the repository
    monkeypatch.chdir(tmp_path)
    assert workdirs.load_config(tmp_path).to_dict() == c.to_dict()  # the same, defaults too


def test_the_train_step_builds_on_its_own_to_call_or_lower(synthetic):
    c = tiny_config(synthetic[0])
    train_step, state = step.build(c, steps_per_epoch=5)
    batch = {"image": jnp.zeros((8, 32, 32, 1), jnp.uint8), "label": jnp.array([0, 1] * 4)}
    assert "stablehlo" in train_step.lower(state, batch).as_text()
    before = jax.device_get(state["params"])
    new, metrics = train_step(*train_step(state, batch)[:1], batch)  # step 0's rate is 0: warm-up
    assert int(new["step"]) == 2 and np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), before,
                           jax.device_get(new["params"]))
    assert all(jax.tree.leaves(changed))  # every parameter trained
