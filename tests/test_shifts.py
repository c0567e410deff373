"""Acquisition shifts: shape and dtype kept, identity at severity 0, the same images every run."""

import ast
import inspect

import numpy as np
import pytest

from pneumojax import shifts


def _images(n: int = 3, h: int = 128, w: int = 96, seed: int = 0) -> np.ndarray:
    """Textured uint8 (n, h, w, 1), not square, so that a swapped axis shows; big enough that
    the mild blur (sigma 0.004 x the side) moves pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 120 + 60 * np.sin(x / 3.0) * np.cos(y / 5.0)
    return np.clip(base + rng.normal(0, 12, (n, h, w)), 0, 255).astype(np.uint8)[..., None]


def test_every_shift_has_a_mild_and_a_stronger_level():
    assert set(shifts.LEVELS) == set(shifts.SHIFTS)
    for name, (mild, strong) in shifts.LEVELS.items():
        assert 0 < mild < strong, name


@pytest.mark.parametrize("name", shifts.SHIFTS)
def test_shape_and_dtype_kept_at_every_level(name):
    images = _images()
    for level in range(len(shifts.LEVEL_NAMES)):
        out = shifts.apply(name, level, images)
        assert out.shape == images.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", shifts.SHIFTS)
def test_severity_zero_is_the_identity(name):
    images = _images()
    out = shifts.SHIFTS[name](images, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("name", shifts.SHIFTS)
def test_the_strong_level_changes_the_image_more_than_the_mild(name):
    images = _images()
    diff = [np.abs(shifts.apply(name, level, images).astype(int) - images).mean()
            for level in (0, 1)]
    assert 0 < diff[0] < diff[1] and diff[1] > 1.0, (name, diff)


@pytest.mark.parametrize("name", shifts.SHIFTS)
def test_deterministic_and_independent_of_the_batch(name):
    images = _images(n=4)
    out = shifts.apply(name, 1, images)
    np.testing.assert_array_equal(out, shifts.apply(name, 1, images))
    one_by_one = np.concatenate([shifts.apply(name, 1, images[i:i + 1]) for i in range(4)])
    np.testing.assert_array_equal(out, one_by_one)
    np.testing.assert_array_equal(out[::-1], shifts.apply(name, 1, images[::-1]))


@pytest.mark.parametrize("name", ["noise", "border", "markers"])
def test_the_seed_picks_the_random_draws(name):
    images = _images()
    assert not np.array_equal(shifts.apply(name, 1, images, seed=0),
                              shifts.apply(name, 1, images, seed=1))


def test_border_leaves_a_black_frame_and_markers_white_ink():
    images = np.full((2, 64, 64, 1), 128, np.uint8)
    framed = shifts.apply("border", 1, images)
    assert (framed[:, 0] == 0).all() and (framed[:, :, 0] == 0).all()
    assert (framed[:, 32, 32] == 128).all()
    marked = shifts.apply("markers", 1, images)
    assert ((marked == 255).sum(axis=(1, 2, 3)) > 20).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        shifts.apply("fog", 0, _images())
    with pytest.raises(ValueError, match="uint8"):
        shifts.apply("blur", 0, _images().astype(np.float32))
    assert shifts.apply("blur", 0, _images(n=0)).shape == (0, 128, 96, 1)


def test_shares_no_code_with_the_training_augmentation():
    """A proxy built on the training transforms would reward having trained on them."""
    tree = ast.parse(inspect.getsource(shifts))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for a in node.names} | {node.module for node in ast.walk(tree)
                                        if isinstance(node, ast.ImportFrom)}
    assert not {n for n in imported if n and ("augment" in n or n.startswith("pneumojax"))}
