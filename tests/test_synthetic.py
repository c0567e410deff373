"""The synthetic phantoms: deterministic, any size, lesions only where the masks say."""


import numpy as np
import pytest

from pneumojax.data import synthetic


def take(count=40, size=64, seed=0, **kw):
    return list(synthetic.examples(count, size, seed, **kw))


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = take(seed=3), take(seed=3), take(seed=4)
    assert all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["mask"], y["mask"])
               for x, y in zip(a, b))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.parametrize("size", [32, 64, 224])
def test_exact_count_shapes_and_types(size):
    examples = take(count=7, size=size)
    assert len(examples) == 7
    for ex in examples:
        assert ex["image"].shape == ex["mask"].shape == (size, size, 1)
        assert ex["image"].dtype == ex["mask"].dtype == np.uint8
        assert set(np.unique(ex["mask"])) <= {0, 1}
        assert ex["patient_id"].startswith("synthetic") and "synthetic" in ex["file_name"]


def test_masks_mark_brighter_lesions_inside_the_lungs_of_pneumonia_only():
    for ex in take(count=60, size=96, seed=1):
        mask = ex["mask"][..., 0].astype(bool)
        if ex["label"] == 0:
            assert not mask.any()
            continue
        assert mask.any()
        # the same scene without lesions: its lung field, and the lesion's contrast against it
        image, _, lung = synthetic._render(*_scene(ex), 96, False)
        assert lung[mask].mean() > 0.3  # lesions sit in aerated lung
        lesion = ex["image"][..., 0][mask].astype(float).mean()
        assert lesion > image[..., 0][mask].astype(float).mean() + 5  # and brighten it


def _scene(ex, seed=1):
    """The patient's anatomy and this image's RNG, re-derived as `examples` draws them."""
    patient = int(ex["patient_id"].split("-")[-1])
    image = int(ex["file_name"].removesuffix(".png").split("-")[-1])
    prng = np.random.default_rng([seed, patient, 0])
    prng.random(), prng.integers(1, 4)  # the label and the image count come first
    return synthetic._anatomy(prng), np.random.default_rng([seed, patient, image])


def test_patients_group_one_to_three_images_of_one_label_and_follow_the_fraction():
    examples = take(count=400, size=32, seed=2, pneumonia_fraction=0.7)
    by_patient = {}
    for ex in examples:
        by_patient.setdefault(ex["patient_id"], []).append(ex["label"])
    assert all(1 <= len(v) <= 3 and len(set(v)) == 1 for v in by_patient.values())
    share = np.mean([v[0] for v in by_patient.values()])
    assert 0.6 < share < 0.8


def test_the_scene_is_the_same_at_any_resolution():
    small = take(count=6, size=64, seed=5)
    large = take(count=6, size=224, seed=5)
    for s, l in zip(small, large):
        down = _resize(l["image"][..., 0], 64)
        assert np.corrcoef(down.ravel(), s["image"][..., 0].ravel().astype(float))[0, 1] > 0.9


def _resize(image, size):
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), float)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        take(count=-1)
    with pytest.raises(ValueError):
        take(pneumonia_fraction=1.5)
