"""grain batches and the device-resident path, on the tiny synthetic set."""

import collections
from importlib import metadata
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from pneumojax import data
from pneumojax.data import augment


@pytest.fixture(scope="module")
def train_source(synthetic):
    return data.data_source(synthetic[1], "train", data_dir=synthetic[0])


def _keys(batch) -> list[bytes]:
    return [img.tobytes() for img in batch["image"]]


def test_train_batches_are_seeded_and_cover_each_epoch(train_source):
    n = len(train_source)
    take = lambda seed: [next(it) for it in [iter(data.train_dataset(
        train_source, batch_size=8, seed=seed))] for _ in range(2 * n // 8)]
    a, b, c = take(0), take(0), take(1)
    assert a[0]["image"].shape == (8, 32, 32, 1) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].dtype == np.int32
    assert [_keys(x) for x in a] == [_keys(x) for x in b]
    assert [_keys(x) for x in a] != [_keys(x) for x in c]
    seen = collections.Counter(k for x in a[: n // 8] for k in _keys(x))
    assert max(seen.values()) == 1  # within an epoch no example repeats
    first = [k for x in a[: n // 8] for k in _keys(x)]
    second = [k for x in a[n // 8:] for k in _keys(x)]
    assert first != second  # and each epoch is a new order


@pytest.fixture
def absl_flags_parsed():
    """What an entry point does (absl.app): grain's worker processes read absl flags."""
    parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.mark_as_parsed()
    yield
    if not parsed:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_round_trips(train_source, workers, absl_flags_parsed):
    ds = data.train_dataset(train_source, batch_size=4, seed=7, num_workers=workers)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [_keys(next(it)) for _ in range(4)]
    restored = iter(data.train_dataset(train_source, batch_size=4, seed=7, num_workers=workers))
    restored.set_state(state)
    assert [_keys(next(restored)) for _ in range(4)] == expected


@pytest.mark.skipif(metadata.version("grain") != "0.2.18", reason="grain#1355 is fixed after")
def test_workers_without_absl_flags_get_the_fix_and_the_library_parses_none(train_source):
    with mock.patch.object(flags.FlagValues, "is_parsed", return_value=False):
        with pytest.raises(RuntimeError, match=r"absl.flags.FLAGS\(sys.argv\[:1\]\)"):
            data.train_dataset(train_source, batch_size=4, seed=0, num_workers=1)
    if not flags.FLAGS.is_parsed():
        next(iter(data.train_dataset(train_source, batch_size=4, seed=0)))
        assert not flags.FLAGS.is_parsed()


def test_hosts_together_make_the_global_batch(train_source):
    single = iter(data.train_dataset(train_source, batch_size=8, seed=3,
                                     process_index=0, process_count=1))
    hosts = [iter(data.train_dataset(train_source, batch_size=8, seed=3,
                                     process_index=i, process_count=2)) for i in range(2)]
    for _ in range(5):
        parts = [next(h) for h in hosts]
        assert all(p["image"].shape[0] == 4 for p in parts)
        # in process order, exactly the single-process batch: same augmentation keys per row
        assert _keys(next(single)) == [k for p in parts for k in _keys(p)]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_visits_every_example_once_and_masks_padding(train_source, process_count):
    n, batch = len(train_source), 10
    assert n % batch  # the last batch must need padding
    indices, total = [], 0
    for pi in range(process_count):
        for b in data.eval_batches(train_source, batch_size=batch, process_index=pi,
                                   process_count=process_count):
            assert b["image"].shape[0] == batch // process_count
            assert not b["image"][~b["valid"]].any() and (b["index"][~b["valid"]] == -1).all()
            indices += b["index"][b["valid"]].tolist()
            total += len(b["valid"])
    assert sorted(indices) == list(range(n))
    assert total == -(-n // batch) * batch
    first = next(data.eval_batches(train_source, batch_size=batch))
    np.testing.assert_array_equal(first["image"][3], train_source[3]["image"])


@pytest.mark.gpu
def test_device_path_gathers_epochs_on_device_without_host_transfers(train_source):
    dd = data.to_device(train_source)
    assert dd.keys() == {"image", "label"}
    assert dd["image"].dtype == jnp.uint8 and dd["image"].shape[0] == len(train_source)
    batch = 8
    cfg = augment.AugmentConfig()

    @jax.jit
    def step(key, step):
        b = data.device_batch(dd, key, step, batch)
        images, labels = b["image"], b["label"]
        return augment.augment_batch(images, jax.random.fold_in(key, step), cfg), images, labels

    key, steps = jax.random.key(0), len(train_source) // batch
    on_device = [jnp.asarray(i) for i in range(steps + 1)]
    with jax.transfer_guard("disallow"):  # no host work per step
        outs = [step(key, s) for s in on_device]
    epoch = np.concatenate([np.asarray(o[1]) for o in outs[:steps]])
    keys = [img.tobytes() for img in epoch]
    assert len(set(keys)) == len(keys)  # one epoch is a permutation
    source_labels = {train_source[i]["image"].tobytes(): train_source[i]["label"]
                     for i in range(len(train_source))}
    labels = np.concatenate([np.asarray(o[2]) for o in outs[:steps]])
    assert all(source_labels[k] == y for k, y in zip(keys, labels))
    augmented = outs[0][0]
    assert augmented.dtype == jnp.float32 and augmented.shape == (batch, 32, 32, 1)
    np.testing.assert_array_equal(step(key, on_device[2])[1], outs[2][1])  # deterministic


def test_fast_parse_equals_tfds_decoding(train_source, synthetic):
    fast = data.ImageLabels(train_source)
    assert len(fast) == len(train_source)
    for i, ex in enumerate(fast.__getitems__(list(range(len(fast))))):
        assert ex.keys() == {"image", "label"}
        np.testing.assert_array_equal(ex["image"], train_source[i]["image"])
        assert ex["label"] == train_source[i]["label"] and ex["label"].dtype == np.int32
    data_dir, name = synthetic
    decoded = data.data_source(name, "train", data_dir=data_dir, with_lesion_mask=True)
    with_masks = data.ImageLabels(train_source, lesion_mask=True)
    assert sum(decoded[i]["lesion_mask"].any() for i in range(len(decoded))) > 0
    for i, ex in enumerate(with_masks.__getitems__(list(range(len(with_masks))))):
        np.testing.assert_array_equal(ex["lesion_mask"], decoded[i]["lesion_mask"])
        np.testing.assert_array_equal(ex["image"], decoded[i]["image"])


def test_device_data_and_grain_batches_carry_lesion_masks_when_asked(train_source):
    masks = data.ImageLabels(train_source, lesion_mask=True)
    by_image = {ex["image"].tobytes(): ex["lesion_mask"]
                for ex in masks.__getitems__(list(range(len(masks))))}
    dd = data.to_device(train_source, lesion_mask=True)
    batch = data.device_batch(dd, jax.random.key(0), jnp.asarray(1), 8)
    grain_batch = next(iter(data.train_dataset(train_source, batch_size=8, seed=0,
                                               lesion_mask=True)))
    for b in (batch, grain_batch):
        assert b["lesion_mask"].shape == b["image"].shape
        for image, mask in zip(np.asarray(b["image"]), np.asarray(b["lesion_mask"])):
            np.testing.assert_array_equal(mask, by_image[image.tobytes()])
