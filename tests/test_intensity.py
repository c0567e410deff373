"""pneumojax.data.intensity against slow numpy references of the same definitions, its
properties (range, order, invariance to a brightness or gamma change), and the one model input
that training, `Model.score` and test-time augmentation share."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pneumojax import defaults, inference
from pneumojax.data import augment, intensity


def _image(shape: tuple[int, int], seed: int = 0, low: int = 30, high: int = 220) -> np.ndarray:
    """A uint8 (H, W) film-like image: smooth structure plus grain, levels in [low, high]."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    smooth = np.sin(rows / 5.0) + np.cos(cols / 7.0) + rows / shape[0]
    x = smooth + 0.3 * rng.standard_normal(shape)
    x = (x - x.min()) / np.ptp(x)
    return np.round(low + (high - low) * x).astype(np.uint8)


def _normalize(image: np.ndarray, method: str) -> np.ndarray:
    """uint8 (H, W) -> float (H, W) through `intensity.normalize`."""
    return np.asarray(intensity.normalize(jnp.asarray(image[..., None] / 255, jnp.float32),
                                          method))[..., 0]


def equalize_reference(image: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist, in float: the cumulative histogram from the darkest level."""
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256))
    low = cdf[image.min()]
    return (cdf[image] - low) / (image.size - low)


def clahe_reference(image: np.ndarray) -> np.ndarray:
    """CLAHE one tile and one pixel at a time, as `intensity._clahe` defines it."""
    (ty, tx), (h, w) = intensity.TILES, image.shape
    padded = np.pad(image, ((0, -h % ty), (0, -w % tx)), mode="reflect")
    th, tw = padded.shape[0] // ty, padded.shape[1] // tx
    luts = np.zeros((ty, tx, 256))
    for i in range(ty):
        for j in range(tx):
            tile = padded[i * th:(i + 1) * th, j * tw:(j + 1) * tw]
            hist = np.bincount(tile.ravel(), minlength=256).astype(float)
            limit = max(intensity.CLIP_LIMIT * tile.size / 256, 1.0)
            excess = np.maximum(hist - limit, 0).sum()
            luts[i, j] = np.cumsum(np.minimum(hist, limit) + excess / 256) / tile.size
    out = np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            y, x = (r + 0.5) / th - 0.5, (c + 0.5) / tw - 0.5  # in tiles, from tile centres
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            a, b = y - y0, x - x0

            def lut(i: int, j: int, r: int = r, c: int = c) -> float:
                return luts[min(max(i, 0), ty - 1), min(max(j, 0), tx - 1), image[r, c]]

            out[r, c] = ((1 - a) * ((1 - b) * lut(y0, x0) + b * lut(y0, x0 + 1))
                         + a * ((1 - b) * lut(y0 + 1, x0) + b * lut(y0 + 1, x0 + 1)))
    return out


@pytest.mark.parametrize("shape", [(32, 32), (64, 48), (45, 37)])  # (45, 37): padded tiles
def test_equalize_and_clahe_match_their_references(shape):
    image = _image(shape)
    np.testing.assert_allclose(_normalize(image, "equalize"), equalize_reference(image),
                               atol=1e-5)
    np.testing.assert_allclose(_normalize(image, "clahe"), clahe_reference(image), atol=1 / 255)


def test_none_is_the_identity_and_unknown_names_the_choices():
    x = jnp.asarray(_image((32, 32))[..., None] / 255, jnp.float32)
    assert intensity.normalize(x, "none") is x
    with pytest.raises(ValueError, match="choose one of none, equalize, clahe"):
        intensity.normalize(x, "histogram")


@pytest.mark.parametrize("method", ["equalize", "clahe"])
@pytest.mark.parametrize("level", [0, 77, 255])
def test_outputs_stay_in_the_unit_range_also_for_flat_images(method, level):
    for image in (_image((64, 48), low=0, high=255), np.full((32, 32), level, np.uint8)):
        out = _normalize(image, method)
        assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert np.all(_normalize(np.full((32, 32), level, np.uint8), "equalize") == level / 255)


def test_order_is_kept_globally_by_equalize_and_within_a_corner_region_by_clahe():
    image = _image((64, 48), seed=3)
    for out, region in ((_normalize(image, "equalize"), np.s_[:, :]),
                        # above and left of the first tile's centre, one mapping applies alone
                        (_normalize(image, "clahe"), np.s_[:4, :3])):
        x, y = image[region].ravel(), out[region].ravel()
        order = np.argsort(x, kind="stable")
        assert np.all(np.diff(y[order]) >= 0)
        assert len(np.unique(y)) == len(np.unique(x))  # distinct levels stay distinct


@pytest.mark.parametrize("method, kept", [("equalize", 0.1), ("clahe", 0.6)])
def test_a_brighter_or_gamma_shifted_film_normalises_to_nearly_the_same(method, kept):
    """The point of the lever: another exposure or tone curve, (nearly) the same model input.
    CLAHE undoes only part of the change: its clip limit holds it between the identity (limit
    0) and full equalisation per tile; measured 0.36-0.42 of the change at these sizes."""
    x = _image((64, 48), low=20, high=200) / 255
    base = _normalize(np.round(255 * x).astype(np.uint8), method)
    for shifted in (x + 0.1, x ** 0.8, x ** 1.25):
        out = _normalize(np.round(255 * np.clip(shifted, 0, 1)).astype(np.uint8), method)
        assert np.abs(out - base).mean() < kept * np.abs(shifted - x).mean()


@pytest.mark.parametrize("method", intensity.METHODS)
def test_vmap_and_jit_equal_one_image_at_a_time(method):
    batch = jnp.asarray(np.stack([_image((32, 32), seed=s) for s in range(3)])[..., None] / 255,
                        jnp.float32)
    fast = jax.jit(jax.vmap(functools.partial(intensity.normalize, method=method)))(batch)
    slow = np.stack([intensity.normalize(x, method) for x in batch])
    np.testing.assert_allclose(fast, slow, atol=1e-6)
    np.testing.assert_allclose(augment.model_input(jnp.round(batch * 255).astype(jnp.uint8),
                                                   method), slow, atol=1e-6)


def _tiny_model(**data) -> inference.Model:
    """An untrained deep_cnn at 32 px, restored-model style, with `data` fields set."""
    config = defaults.get_config()
    config.data.image_size = 32
    config.train.eval_batch_size = 4
    config.data.update(data)
    net = inference.create_model(config)
    net.eval()
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    return inference.Model(config=config, graphdef=graphdef, state=dict(params=params, rest=rest),
                           threshold=0.5, temperature=1.0, step=0, meta={})


def _by_hand(model: inference.Model, views: list[jax.Array]) -> np.ndarray:
    """P(PNEUMONIA) from the mean logit of `views`, eagerly, outside `make_eval_step`."""
    net = nnx.merge(model.graphdef, model.state["params"], model.state["rest"])
    return np.asarray(jax.nn.sigmoid(jnp.mean(jnp.stack([net(v)[0] for v in views]), 0)))


def test_score_reads_the_input_training_made_and_one_view_is_no_tta():
    images = np.stack([_image((32, 32), seed=s) for s in range(6)])[..., None]
    model = _tiny_model(intensity="equalize")
    x = augment.model_input(images, "equalize")
    np.testing.assert_allclose(model.score(images), _by_hand(model, [x]), rtol=1e-5, atol=1e-6)
    # Heat maps explain that same input.
    np.testing.assert_allclose(model.cams(images, layer="block2")["probability"],
                               model.score(images), rtol=1e-5, atol=1e-6)
    # One view is exactly no TTA: the same probabilities from the same compiled function.
    step = jax.jit(inference.make_eval_step(model.graphdef, model.config))
    plain = jax.jit(lambda s, u: jax.nn.sigmoid(
        nnx.merge(model.graphdef, s["params"], s["rest"], copy=True)(
            augment.model_input(u, "equalize"))[0]))
    np.testing.assert_array_equal(step(model.state, images[:4]), plain(model.state, images[:4]))
    # Several views: the mean logit of the views, and not the same as one view.
    tta = _tiny_model(intensity="equalize", tta_views=len(augment.TTA_VIEWS))
    want = _by_hand(tta, augment.tta_views(x, len(augment.TTA_VIEWS)))
    np.testing.assert_allclose(tta.score(images), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(tta.score(images), model.score(images), atol=1e-6)
    # The temperature divides the mean logit.
    hot = jax.jit(inference.make_eval_step(model.graphdef, model.config, temperature=2.0))
    logit = np.log(_by_hand(model, [x[:4]])) - np.log1p(-_by_hand(model, [x[:4]]))
    np.testing.assert_allclose(hot(model.state, images[:4]), 1 / (1 + np.exp(-logit / 2)),
                               rtol=1e-4, atol=1e-6)


def test_tta_views_start_with_the_input_itself_and_never_mirror():
    x = jnp.zeros((2, 32, 32, 1)).at[:, 12:20, 4:10].set(1.0)  # a "heart" left of the midline
    views = augment.tta_views(x, len(augment.TTA_VIEWS))
    assert views[0] is x and len(views) == len(augment.TTA_VIEWS)
    cols = np.arange(32)[None, None, :, None]
    for v in views[1:]:
        assert v.shape == x.shape and not np.allclose(v, x)
        assert np.sum(v * cols) / np.sum(v) < 10  # still on the left
    with pytest.raises(ValueError, match="from 1 to 7"):
        augment.tta_views(x, len(augment.TTA_VIEWS) + 1)


def test_the_train_step_normalises_as_config_data_intensity_says():
    from pneumojax.training import step

    images = np.stack([_image((32, 32), seed=s) for s in range(4)])[..., None]
    batch = {"image": images, "label": np.array([0, 1, 0, 1], np.int32)}
    losses = {}
    for method in ("none", "clahe"):
        config = defaults.get_config()
        config.data.image_size, config.data.intensity = 32, method
        config.data.augment.enabled = False
        config.train.batch_size = 4
        train_step, state = step.build(config, pretrained=False)
        losses[method] = float(train_step(state, batch)[1]["loss"])
    assert np.isfinite(list(losses.values())).all() and losses["none"] != losses["clahe"]
