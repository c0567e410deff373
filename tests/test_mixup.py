"""Mixup (train.mixup): soft targets in the losses, the mixed batch in the train step."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pneumojax import config_check, losses
from pneumojax.data import augment
from pneumojax.training import step
from tests.conftest import tiny_config

LABELS = np.array([0, 1, 0, 0, 1, 1, 0, 1])
COUNTS = {"NORMAL": 1, "PNEUMONIA": 3}  # class weights (2, 2/3): their mixing shows


def test_float_targets_of_0_and_1_give_the_integer_labels_loss_exactly():
    logits, w = jnp.array([2.0, -1.0, 0.5, 0.1]), jnp.array([3.0, 0.5])
    labels = jnp.array([1, 0, 0, 1])
    for loss in losses.LOSSES.values():
        for smoothing in (0.0, 0.1):
            np.testing.assert_array_equal(loss(logits, labels.astype(jnp.float32), w, smoothing),
                                          loss(logits, labels, w, smoothing))


def test_soft_targets_mix_the_class_weights_as_they_mix_the_classes():
    logits, w = jnp.array([2.0, -1.0, 0.5]), jnp.array([3.0, 1.0])
    targets = jnp.array([0.75, 0.0, 0.4])  # e.g. 0.75 of a PNEUMONIA image, 0.25 of a NORMAL
    per = optax.sigmoid_binary_cross_entropy(logits, 0.9 * targets + 0.05)
    weight = jnp.array([0.25 * 3 + 0.75 * 1, 3.0, 0.6 * 3 + 0.4 * 1])
    np.testing.assert_allclose(losses.weighted_bce(logits, targets, w, 0.1),
                               jnp.sum(weight * per) / jnp.sum(weight), rtol=1e-6)


def _step_and_hand_loss(tmp_path, alpha):
    """(the train step's loss, the loss by hand) on one batch, augmentation off."""
    c = tiny_config(tmp_path, mixup=alpha)
    c.data.augment.enabled = False
    train_step, state = step.build(c, steps_per_epoch=5, class_counts=COUNTS)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), np.uint8)
    model = nnx.merge(step.train_graphdef(c, frozenset()), state["params"], state["rest"],
                      copy=True)
    x, y = np.asarray(augment.to_float(images)), LABELS.astype(np.float32)
    w = np.array([2.0, 2 / 3], np.float32)[LABELS]
    if alpha:  # the stream the step must draw from: (seed, step 0), then MIXUP_STREAM
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.train.seed), 0),
                                 step.MIXUP_STREAM)
        perm_key, lam_key = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(perm_key, 8))
        lam = np.asarray(jax.random.beta(lam_key, alpha, alpha, (8,)))
        assert sorted(perm) == list(range(8)) and (perm != np.arange(8)).any()
        x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]
        y, w = lam * y + (1 - lam) * y[perm], lam * w + (1 - lam) * w[perm]
    per = optax.sigmoid_binary_cross_entropy(model(jnp.asarray(x))[0], jnp.asarray(y))
    _, metrics = train_step(state, {"image": jnp.asarray(images), "label": jnp.asarray(LABELS)})
    return float(metrics["loss"]), float(jnp.sum(w * per) / jnp.sum(w))


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_the_step_trains_on_the_mixed_batch(tmp_path, alpha):
    got, expected = _step_and_hand_loss(tmp_path, alpha)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mixup_and_lesion_masks_are_refused_together(tmp_path):
    c = tiny_config(tmp_path, mixup=0.2, lesion_weight=1.0)
    c.model.name = "deep_cnn"
    c.model.kwargs = dict(widths=(4, 8), head="lesion")
    (problem,) = config_check._training_problems(c)
    assert problem.startswith("config field train.mixup=0.2: > 0 blends two images")
    assert problem.endswith("set --config.train.mixup=0 or --config.train.lesion_weight=0")


@pytest.mark.slow
def test_mixup_gathers_partners_across_an_explicitly_sharded_batch(tmp_path):
    # Fake devices must be set before JAX starts, hence a fresh interpreter, as in test_augment.
    images = np.random.default_rng(1).random((8, 4, 4, 1), np.float32)
    expected = step.mixup(jnp.asarray(images), jnp.asarray(LABELS), jax.random.key(3), 0.4)
    np.savez(tmp_path / "case.npz", images=images, x=expected[0], y=expected[1])
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from pneumojax.training import step

        case = np.load("{tmp_path / 'case.npz'}")
        mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
        with jax.set_mesh(mesh):
            x, y = jax.jit(step.mixup, static_argnums=3)(
                put(case["images"]), put(np.array({LABELS.tolist()})), jax.random.key(3), 0.4)
        assert x.sharding.spec[0] == "data", x.sharding
        np.testing.assert_allclose(x, case["x"], atol=1e-6)
        np.testing.assert_allclose(y, case["y"], atol=1e-6)
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
