"""pneumojax.losses: the formulas, and the registry a config chooses from by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pneumojax import config_check, losses
from pneumojax.training import step
from tests.conftest import tiny_config


def test_weighted_bce_matches_the_formula():
    logits, labels = jnp.array([2.0, -1.0, 0.5]), jnp.array([1, 0, 0])
    w = jnp.array([3.0, 1.0])  # NORMAL weighs three times PNEUMONIA
    per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
    expected = (1 * per[0] + 3 * per[1] + 3 * per[2]) / 7
    np.testing.assert_allclose(losses.weighted_bce(logits, labels, w), expected, rtol=1e-6)
    smoothed = losses.weighted_bce(logits, labels, w, smoothing=0.2)
    targets = jnp.array([0.9, 0.1, 0.1])
    per = optax.sigmoid_binary_cross_entropy(logits, targets)
    np.testing.assert_allclose(smoothed, (per[0] + 3 * per[1] + 3 * per[2]) / 7, rtol=1e-6)


def test_lesion_loss_fits_cell_scores_to_the_share_of_each_cell_in_the_masks():
    masks = np.zeros((1, 8, 8, 1), np.float32)
    masks[0, :4, :2] = 1.0  # the top-left 4x4 cell half covered, the rest clear
    share = np.array([[[0.5, 0.0], [0.0, 0.0]]], np.float32)
    cells = jnp.asarray(np.log(share + 0.01) - np.log(1.01 - share))  # any logits will do
    expected = optax.sigmoid_binary_cross_entropy(cells, share).mean()
    np.testing.assert_allclose(losses.lesion_loss({"lesion_logits": cells}, masks), expected,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="head='lesion'"):
        losses.lesion_loss({"block2": jnp.zeros((1, 2, 2, 4))}, masks)
    with pytest.raises(ValueError, match=r"\(8, 8\) px do not tile a 3x3 grid"):
        losses.lesion_loss({"lesion_logits": jnp.zeros((1, 3, 3))}, masks)


def test_focal_loss_is_weighted_bce_scaled_by_how_wrong_each_example_is():
    logits, labels = jnp.array([3.0, -0.2, 0.4]), jnp.array([1, 0, 1])
    w = jnp.array([2.0, 1.0])
    p = jax.nn.sigmoid(logits)
    p_true = jnp.where(labels == 1, p, 1 - p)
    per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
    expected = jnp.sum(w[labels] * (1 - p_true) ** 2 * per) / jnp.sum(w[labels])
    np.testing.assert_allclose(losses.focal(logits, labels, w), expected, rtol=1e-5)
    # with gamma = 0 it is the cross-entropy
    np.testing.assert_allclose(losses.focal(logits, labels, w, gamma=0.0),
                               losses.weighted_bce(logits, labels, w), rtol=1e-6)


def test_a_new_loss_is_one_function_and_one_name(monkeypatch, tmp_path):
    calls = []

    def hinge(logits, labels, weights, smoothing=0.0):
        calls.append(logits.shape)
        return jnp.mean(jax.nn.relu(1 - (2 * labels - 1) * logits)) * 0 + 42.0  # unmistakable
    monkeypatch.setitem(losses.LOSSES, "hinge", hinge)
    c = tiny_config(tmp_path, loss="hinge")
    assert not [p for p in config_check.field_problems(c) if "train.loss" in p]
    c.train.loss = "nosuch"
    assert any(p.startswith("config field train.loss") for p in config_check.field_problems(c))
    c.train.loss = "hinge"
    c.data.image_size = 32
    train_step, state = step.build(c, steps_per_epoch=1)
    images = jnp.zeros((8, 32, 32, 1), jnp.uint8)
    _, metrics = train_step(state, {"image": images, "label": jnp.array([0, 1] * 4)})
    assert calls == [(8,)] and float(metrics["loss"]) == 42.0
