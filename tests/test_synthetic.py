"""The synthetic phantoms: deterministic, well-formed, and lesions where the mask says."""

import itertools

import numpy as np
import pytest

from pneumojax.data import synthetic


def _renders(count: int, size: int, pneumonia: bool):
    """(image, mask, lung) for `count` patients, through the private renderer to see the lungs."""
    for i in range(count):
        anat = synthetic._anatomy(np.random.default_rng([99, i, 0]))
        rng = np.random.default_rng([99, i, 1])
        image, mask, lung = synthetic._render(anat, rng, size, pneumonia)
        yield image[..., 0].astype(np.float64), mask[..., 0].astype(bool), lung


def test_deterministic_per_seed():
    a, b, c = (list(synthetic.examples(6, 64, seed)) for seed in (3, 3, 4))
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_any_example_regenerates_alone():
    """An example depends on (seed, patient, image) only, not on how many came before it."""
    assert all(np.array_equal(x["image"], y["image"])
               for x, y in zip(synthetic.examples(5, 32, 1), synthetic.examples(9, 32, 1)))


@pytest.mark.parametrize("count", [0, 1, 7])
def test_exact_count(count):
    assert len(list(synthetic.examples(count, 32, 0))) == count


@pytest.mark.parametrize("size", [32, 64, 224])
def test_shapes_and_dtypes(size):
    for ex in synthetic.examples(4, size, 2):
        assert ex["image"].shape == ex["mask"].shape == (size, size, 1)
        assert ex["image"].dtype == ex["mask"].dtype == np.uint8
        assert set(np.unique(ex["mask"])) <= {0, 1}
        assert ex["label"] in (0, 1) and isinstance(ex["label"], int)
        assert ex["patient_id"].startswith("synthetic-")
        assert ex["file_name"].startswith(ex["patient_id"] + "-")
        assert ex["file_name"].endswith(".png")
    image, mask = synthetic.phantom(np.random.default_rng(0), size, True)
    assert image.shape == mask.shape == (size, size, 1) and image.dtype == mask.dtype == np.uint8


def test_too_small_or_bad_fraction_fails_loudly():
    with pytest.raises(ValueError):
        synthetic.phantom(np.random.default_rng(0), 16, False)
    with pytest.raises(ValueError):
        next(synthetic.examples(1, 32, 0, pneumonia_fraction=1.5))


def test_masks_follow_labels():
    for ex in synthetic.examples(40, 32, 5):
        assert (ex["mask"].sum() > 0) == (ex["label"] == 1), ex["file_name"]


@pytest.mark.parametrize("size", [32, 224])
def test_lesions_lie_inside_lungs_and_are_brighter(size):
    for image, mask, lung in _renders(12, size, True):
        assert mask.any() and not (mask & ~lung).any()
        assert image[mask].mean() > image[lung & ~mask].mean()
    for image, mask, lung in _renders(4, size, False):
        assert not mask.any()
        assert image[lung].mean() < image[~lung].mean()  # lung fields are the dark ones


def test_patients_group_one_to_three_images_of_one_label():
    exs = list(synthetic.examples(60, 32, 8))
    groups = [list(g) for _, g in itertools.groupby(exs, key=lambda ex: ex["patient_id"])]
    assert len(groups) == len({ex["patient_id"] for ex in exs})  # each patient's images adjacent
    for group in groups:
        assert 1 <= len(group) <= 3
        assert len({ex["label"] for ex in group}) == 1
        patient = group[0]["patient_id"]
        assert [ex["file_name"] for ex in group] == [f"{patient}-{j}.png"
                                                      for j in range(1, len(group) + 1)]
    assert max(len(g) for g in groups) > 1


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_label_fraction(fraction):
    labels = [ex["label"] for ex in synthetic.examples(400, 32, 11, pneumonia_fraction=fraction)]
    assert abs(np.mean(labels) - fraction) < 0.1


def test_same_scene_at_any_size():
    def down(image: np.ndarray, factor: int) -> np.ndarray:
        n = image.shape[0] // factor
        return image[..., 0].astype(np.float64).reshape(n, factor, n, factor).mean((1, 3))

    for seed in range(3):
        small, large = next(synthetic.examples(1, 64, seed)), next(synthetic.examples(1, 224, seed))
        a, b = down(small["image"], 2).ravel(), down(large["image"], 7).ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.9
