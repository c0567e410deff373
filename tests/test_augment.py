"""Tests for pneumojax.data.augment: geometry lands where the matrix says, and the rest is inert."""

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pneumojax.data import augment

SIZE = (64, 64)
CENTRE = np.array([(SIZE[0] - 1) / 2, (SIZE[1] - 1) / 2])
NO_PHOTO = dict(brightness=0.0, contrast=0.0)
NO_GEOMETRY = dict(rotation_deg=0.0, translate=0.0, zoom=(1.0, 1.0), hflip=False)
ACQUISITION = dict(gamma=0.3, blur=1.5, noise=0.05)  # the families that mimic another scanner
CONFIG = augment.AugmentConfig(hflip=True)  # shared, so that jit compiles it once (~1 s on CPU)
warp = jax.jit(augment.warp)


def _blob(r: float, c: float, sigma: float = 1.0) -> jax.Array:
    rows, cols = np.mgrid[: SIZE[0], : SIZE[1]]
    image = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2))
    return jnp.asarray(image[..., None], jnp.float32)


def _centroid(image: jax.Array) -> np.ndarray:
    weights = np.asarray(image)[..., 0]
    rows, cols = np.mgrid[: SIZE[0], : SIZE[1]]
    return np.array([(weights * rows).sum(), (weights * cols).sum()]) / weights.sum()


def _images(seed: int = 0, batch: int = 4) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, 256, (batch, 33, 33, 1), dtype=np.uint8))


@pytest.mark.parametrize(
    "point, rotation_deg, scale, shift, flip",
    [
        ((20.0, 45.0), 90.0, 1.0, (0.0, 0.0), False),
        ((24.0, 40.0), 30.0, 1.1, (3.0, -4.0), False),
        ((26.0, 38.0), -20.0, 0.9, (-2.5, 1.5), True),
        ((20.0, 10.0), 0.0, 1.0, (0.0, 0.0), True),  # flip alone
        ((30.0, 30.0), 0.0, 1.0, (5.5, -7.25), False),  # shift alone
    ],
)
def test_marker_moves_where_the_matrix_says(point, rotation_deg, scale, shift, flip):
    forward = augment.affine_matrix(
        SIZE, jnp.deg2rad(rotation_deg), jnp.float32(scale), jnp.array(shift), jnp.array(flip)
    )
    expected = (np.asarray(forward) @ np.array([*point, 1.0]))[:2]
    np.testing.assert_allclose(_centroid(warp(_blob(*point), forward)), expected, atol=0.5)


def test_rotation_sign_is_counter_clockwise_as_displayed():
    # Rows point down, so a marker right of the centre must end up above it.
    forward = augment.affine_matrix(SIZE, jnp.pi / 2, 1.0, jnp.zeros(2), False)
    right = np.array([CENTRE[0], CENTRE[1] + 10, 1.0])
    np.testing.assert_allclose((np.asarray(forward) @ right)[:2], CENTRE - [10, 0], atol=1e-4)
    moved = _centroid(warp(_blob(*right[:2]), forward))
    np.testing.assert_allclose(moved, CENTRE - [10, 0], atol=0.5)


def test_flip_mirrors_columns_only():
    forward = augment.affine_matrix(SIZE, 0.0, 1.0, jnp.zeros(2), True)
    np.testing.assert_allclose(forward @ jnp.array([5.0, 7.0, 1.0]), [5.0, SIZE[1] - 1 - 7.0, 1.0])


def test_warp_matches_map_coordinates():
    image = jax.random.uniform(jax.random.key(0), (*SIZE, 2))
    forward = augment.affine_matrix(SIZE, 0.4, 1.2, jnp.array([6.0, -9.0]), False)
    inverse = np.linalg.inv(np.asarray(forward, np.float64))
    rows, cols = np.mgrid[: SIZE[0], : SIZE[1]]
    src = np.einsum("ij,jhw->ihw", inverse, np.stack([rows, cols, np.ones_like(rows)]))[:2]
    expected = jnp.stack(
        [
            jax.scipy.ndimage.map_coordinates(image[..., ch], list(src), order=1, mode="constant")
            for ch in range(image.shape[-1])
        ],
        axis=-1,
    )
    np.testing.assert_allclose(warp(image, forward), expected, atol=1e-4)


def test_identity_geometry_is_exact():
    forward = augment.affine_matrix(SIZE, 0.0, 1.0, jnp.zeros(2), False)
    np.testing.assert_allclose(forward, np.eye(3), atol=1e-6)
    image = jax.random.uniform(jax.random.key(1), (*SIZE, 2))
    np.testing.assert_allclose(warp(image, jnp.eye(3)), image, atol=1e-6)


def test_same_key_same_output_different_key_different_output():
    images = _images()
    first = augment.augment_batch(images, jax.random.key(0), CONFIG)
    np.testing.assert_array_equal(first, augment.augment_batch(images, jax.random.key(0), CONFIG))
    assert not np.allclose(first, augment.augment_batch(images, jax.random.key(1), CONFIG))


def test_lesion_masks_take_the_images_warp_and_no_photometric_change():
    images = _images()
    masks = images  # any uint8 (B, H, W, 1) will do: the warp is linear
    key = jax.random.key(5)
    x, m = augment.augment_batch(images, key, CONFIG, masks)
    np.testing.assert_array_equal(x, augment.augment_batch(images, key, CONFIG))
    geometry_only = augment.AugmentConfig(hflip=True, **NO_PHOTO)
    x_geo, m_geo = augment.augment_batch(images, key, geometry_only, masks)
    np.testing.assert_array_equal(m, m_geo)  # the photometric draws leave masks alone
    np.testing.assert_allclose(m_geo / 255, x_geo, atol=1e-6)  # the same warp as the image
    assert not np.allclose(m_geo, np.asarray(masks, np.float32))
    _, m_off = augment.augment_batch(images, key, augment.AugmentConfig(enabled=False), masks)
    np.testing.assert_array_equal(m_off, np.asarray(masks, np.float32))


def test_which_families_are_on_comes_from_the_fields():
    assert augment.AugmentConfig().families() == {
        "rotation_deg": 1, "translate": 2, "zoom": 1, "brightness": 1, "contrast": 1}
    config = augment.AugmentConfig(**NO_GEOMETRY, brightness=0.2, contrast=0.0)
    assert config.families() == {"brightness": 1}
    assert config.photometric and not config.geometric
    assert augment.AugmentConfig(**NO_PHOTO, **dict(NO_GEOMETRY, hflip=True)).families() == {
        "hflip": 1}


@dataclasses.dataclass(frozen=True)
class _WithSharpen(augment.AugmentConfig):
    """A family added later, as a researcher would: one more field."""

    sharpen: float = dataclasses.field(default=0.2, metadata=augment.family(1, "photometric", 0.0))


def test_a_familys_draws_depend_on_its_name_alone():
    key = jax.random.key(7)
    base = augment.draws(key, augment.AugmentConfig())
    assert len({float(u[0]) for u in base.values()}) == len(base)  # no two families share draws
    # Turning families on or off, or adding a new one, leaves every other family's draws alone.
    for other in (augment.AugmentConfig(hflip=True), _WithSharpen(),
                  augment.AugmentConfig(**NO_PHOTO), augment.AugmentConfig(**ACQUISITION),
                  augment.AugmentConfig(rotation_deg=30.0, zoom=(0.5, 2.0), contrast=0.0)):
        drawn = augment.draws(key, other)
        assert set(drawn) == set(other.families())
        for name in set(drawn) & set(base):
            np.testing.assert_array_equal(drawn[name], base[name], err_msg=name)
    assert set(augment.draws(key, _WithSharpen())) - set(base) == {"sharpen"}
    np.testing.assert_array_equal(  # the key folded in from the name, the same in any process
        base["contrast"], jax.random.uniform(jax.random.fold_in(key, zlib.crc32(b"contrast")), 1))


def test_turning_on_contrast_leaves_the_brightness_shift_as_it_was():
    # Contrast about the mean does nothing to a flat image, so only brightness shows; before
    # draws went by name, contrast took the first uniform and brightness the next.
    flat = jnp.full((4, 33, 33, 1), 128, jnp.uint8)
    key = jax.random.key(2)
    bright = augment.AugmentConfig(**NO_GEOMETRY, brightness=0.3, contrast=0.0)
    both = augment.AugmentConfig(**NO_GEOMETRY, brightness=0.3, contrast=0.3)
    out = augment.augment_batch(flat, key, bright)
    np.testing.assert_allclose(augment.augment_batch(flat, key, both), out, atol=1e-6)
    assert np.ptp(np.asarray(out).mean((1, 2, 3))) > 0.01  # the shift differs per example


def test_disabled_is_exactly_to_float():
    images = _images()
    out = augment.augment_batch(images, jax.random.key(0), augment.AugmentConfig(enabled=False))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, images / 255)
    np.testing.assert_array_equal(out, augment.to_float(images))
    # XLA turns /255 into a multiply by the rounded reciprocal: numpy's true division is 1 ulp off.
    np.testing.assert_allclose(out, np.asarray(images).astype(np.float32) / 255, rtol=1.2e-7)


def test_zero_ranges_are_identity():
    images = _images()
    config = augment.AugmentConfig(**NO_GEOMETRY, **NO_PHOTO)
    out = augment.augment_batch(images, jax.random.key(0), config)
    np.testing.assert_allclose(out, np.asarray(images) / 255, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        augment.AugmentConfig(**NO_GEOMETRY, brightness=0.5, contrast=0.5),
    ],
)
def test_outputs_stay_in_unit_range(config):
    out = augment.augment_batch(_images(batch=4), jax.random.key(3), config)
    assert out.dtype == jnp.float32 and out.shape == (4, 33, 33, 1)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_contrast_preserves_mean_of_mid_grey_image():
    rng = np.random.default_rng(0)
    grey = rng.integers(100, 156, (8, 33, 33, 1), dtype=np.uint8)  # far enough from 0 and 1
    config = augment.AugmentConfig(**NO_GEOMETRY, brightness=0.0, contrast=0.3)
    out = augment.augment_batch(jnp.asarray(grey), jax.random.key(0), config)
    before = (grey / 255).reshape(8, -1)
    after = np.asarray(out).reshape(8, -1)
    np.testing.assert_allclose(after.mean(1), before.mean(1), atol=1e-5)
    assert not np.allclose(after.std(1), before.std(1), rtol=1e-3)  # contrast did act


def test_vmap_equals_per_example():
    images, key, config = _images(), jax.random.key(5), CONFIG
    batched = augment.augment_batch(images, key, config)
    one = jax.jit(augment.augment_image, static_argnames="config")
    keys = jax.random.split(key, images.shape[0])
    single = jnp.stack(
        [one(images[i], keys[i], config) for i in range(images.shape[0])]
    )
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_jit_with_static_config_keeps_device():
    device = jax.devices()[-1]
    images = jax.device_put(_images(), device)
    step = jax.jit(lambda x, key: augment.augment_batch(x, key, CONFIG) * 1.0)  # nested in a step
    out = step(images, jax.random.key(0))
    assert out.devices() == images.devices() == {device}
    expected = augment.augment_batch(images, jax.random.key(0), CONFIG)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_batch_sharded_across_devices(tmp_path):
    # Fake devices must be set before jax starts, hence a fresh interpreter; it checks
    # against this process's unsharded result, so that it compiles only the sharded one.
    images = _images()
    scanner = augment.AugmentConfig(hflip=True, **ACQUISITION)  # and the histograms of CLAHE
    expected = augment.augment_batch(images, jax.random.key(0), CONFIG)
    clahe = augment.augment_batch(images, jax.random.key(0), scanner, intensity="clahe")
    np.savez(tmp_path / "case.npz", images=images, expected=expected, clahe=clahe)
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from pneumojax.data import augment

        case = np.load("{tmp_path / 'case.npz'}")
        # Explicit axes (make_mesh's default) are the strict case: vmap and concatenate check them.
        mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
        sharded = jax.device_put(case["images"], NamedSharding(mesh, P("data")))
        with jax.set_mesh(mesh):
            out = augment.augment_batch(sharded, jax.random.key(0), augment.{CONFIG!r})
            clahe = augment.augment_batch(sharded, jax.random.key(0), augment.{scanner!r},
                                          intensity="clahe")
        assert out.sharding.spec[0] == clahe.sharding.spec[0] == "data", out.sharding
        np.testing.assert_allclose(out, case["expected"], atol=1e-6)
        np.testing.assert_allclose(clahe, case["clahe"], atol=1e-5)
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_config_is_hashable_even_from_a_list():
    config = augment.AugmentConfig(zoom=[0.8, 1.2])  # as a config file may hand it over
    assert hash(config) == hash(augment.AugmentConfig(zoom=(0.8, 1.2)))
    assert math.isclose(config.zoom[1], 1.2)


def _only(**families) -> augment.AugmentConfig:
    """A config with no family on but `families`."""
    return augment.AugmentConfig(**{**NO_GEOMETRY, **NO_PHOTO, **families})


def _example_draws(key: jax.Array, config: augment.AugmentConfig, batch: int) -> list[dict]:
    """Each example's draws, from the per-example keys augment_batch splits off `key`."""
    return [augment.draws(k, config) for k in jax.random.split(key, batch)]


def test_acquisition_families_are_off_by_default_and_follow_the_key():
    assert not set(ACQUISITION) & set(augment.AugmentConfig().families())
    images, config = _images(), augment.AugmentConfig(**ACQUISITION)
    first = augment.augment_batch(images, jax.random.key(0), config)
    np.testing.assert_array_equal(first, augment.augment_batch(images, jax.random.key(0), config))
    assert not np.allclose(first, augment.augment_batch(images, jax.random.key(1), config))
    assert not np.allclose(first, augment.augment_batch(images, jax.random.key(0), CONFIG))
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_gamma_raises_each_image_to_its_drawn_exponent():
    grey, key = jnp.full((4, 33, 33, 1), 128, jnp.uint8), jax.random.key(3)
    config = _only(gamma=0.5)
    out = np.asarray(augment.augment_batch(grey, key, config))[:, 0, 0, 0]
    # exponent = exp(U(-0.5, 0.5)) = exp(-0.5 + u)
    exponent = [np.exp(-0.5 + float(u["gamma"][0])) for u in _example_draws(key, config, 4)]
    np.testing.assert_allclose(out, (128 / 255) ** np.array(exponent), rtol=1e-5)


def test_noise_has_the_drawn_standard_deviation():
    grey, key = jnp.full((4, 64, 64, 1), 128, jnp.uint8), jax.random.key(4)
    config = _only(noise=0.1)
    out = np.asarray(augment.augment_batch(grey, key, config))
    std = [0.1 * float(u["noise"][0]) for u in _example_draws(key, config, 4)]
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), std, rtol=0.05)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 128 / 255, atol=0.01)


def test_blur_spreads_a_point_by_the_drawn_sigma():
    point = jnp.zeros((4, 41, 41, 1), jnp.uint8).at[:, 20, 20].set(255)
    key, config = jax.random.key(5), _only(blur=2.0)
    out = np.asarray(augment.augment_batch(point, key, config))[..., 0]
    rows = (np.arange(41) - 20)[None, :, None]
    sigma = [2.0 * float(u["blur"][0]) for u in _example_draws(key, config, 4)]
    np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, rtol=1e-5)  # brightness kept
    # The variance of a Gaussian sampled at whole pixels (below sigma ~ 0.7 it falls short of
    # sigma ** 2), with the radius ceil(3 * 2.0).
    k = np.arange(-6, 7)[:, None]
    w = np.exp(-0.5 * (k / np.array(sigma)) ** 2)
    variance = (out * rows**2).sum(axis=(1, 2))
    np.testing.assert_allclose(variance, (k**2 * w).sum(0) / w.sum(0), rtol=1e-4, atol=1e-6)
    assert variance[np.argmax(sigma)] > 1.0  # a wide blur did spread the point


@pytest.mark.parametrize("method", ["equalize", "clahe"])
def test_disabled_is_exactly_the_model_input(method):
    images = _images()
    out = augment.augment_batch(images, jax.random.key(0), augment.AugmentConfig(enabled=False),
                                intensity=method)
    model_input = jax.jit(augment.model_input, static_argnames="intensity")  # as augment_batch
    np.testing.assert_array_equal(out, model_input(images, method))
    assert not np.allclose(out, augment.to_float(images))


def test_intensity_comes_after_the_photometric_families_and_before_the_warp():
    images, key = _images(batch=3), jax.random.key(6)
    # After brightness: the normalisation undoes the shift it was shown (none is clipped).
    images = images // 2 + 64
    bright = _only(brightness=0.1)
    shifted = augment.augment_batch(images, key, bright)
    assert np.abs(shifted - augment.to_float(images)).mean() > 0.03
    undone = augment.augment_batch(images, key, bright, intensity="equalize")
    assert np.abs(undone - augment.model_input(images, "equalize")).mean() < 0.01
    # Before the warp: the warp moves the normalised image, whose histogram has no fill in it.
    moved = _only(translate=0.2)
    out = augment.augment_batch(images, key, moved, intensity="equalize")
    normalised = augment.model_input(images, "equalize")
    for x, u, got in zip(normalised, _example_draws(key, moved, 3), out):
        want = augment.warp(x, augment._random_affine(u, moved, x.shape[:2]))
        np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-5)
