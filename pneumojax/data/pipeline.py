"""Prepared splits -> batches: a grain pipeline on the host, or a device-resident data set.

Both hand uint8 images to the jitted step, which augments them on the accelerator with
`augment.augment_batch`; the host only reads and batches bytes.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from importlib import metadata

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from tensorflow_datasets.proto import tf_example_pb2

from pneumojax.data import builder


def data_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                with_lesion_mask: bool = False) -> Sequence[dict]:
    """A random-access view of one prepared split, read through TFDS from the build this
    process reads (see `builder.current_build`); a clear error if it was never prepared."""
    decoders = None if with_lesion_mask else {"lesion_mask": tfds.decode.SkipDecoding()}
    return builder.read_split(data_dir, name, split, decoders)


class ImageLabels(Sequence):
    """`image` and `label` (and with `lesion_mask`, the mask) parsed straight from a TFDS
    source's records.

    TFDS's generic decoder spends ~40 us of Python per feature on all six features; the
    training path needs two, and parsing only those is what lets one core feed thousands of
    images a second.
    """

    def __init__(self, source: Sequence[dict], lesion_mask: bool = False):
        self.records = source.data_source  # the ArrayRecord reader under tfds.data_source
        self.shape = tuple(source.dataset_info.features["image"].shape)
        self.lesion_mask = lesion_mask

    def __len__(self) -> int:
        return len(self.records)

    def _parse(self, record: bytes) -> dict:
        feature = tf_example_pb2.Example.FromString(record).features.feature
        out = {"image": np.frombuffer(feature["image"].bytes_list.value[0], np.uint8)}
        if self.lesion_mask:  # stored zlib-compressed (see builder)
            out["lesion_mask"] = np.frombuffer(
                zlib.decompress(feature["lesion_mask"].bytes_list.value[0]), np.uint8)
        return {**{k: v.reshape(self.shape) for k, v in out.items()},
                "label": np.int32(feature["label"].int64_list.value[0])}

    def __getitem__(self, index: int) -> dict:
        return self._parse(self.records[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._parse(r) for r in self.records.__getitems__(indices)]


def _host_slice(global_batch: int, process_index: int | None, process_count: int | None
                ) -> tuple[int, int, int]:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch % pc:
        raise ValueError(f"batch size {global_batch} is not divisible by {pc} processes")
    return pi, pc, global_batch // pc


def _check_flags_parsed(num_workers: int) -> None:
    """grain up to 0.2.18 reads one of its absl flags (`--grain_enable_multiprocess_worker_
    profiling`) when its worker processes start, and fails in a thread if no one parsed absl's
    flags (google/grain#1355; its fix, #1362, came after 0.2.18). Parsing them is an entry point's
    business, never a library's: `python -m pneumojax.main` parses them through `absl.app`. A
    caller without them hears the fix here, before any work, rather than grain's error."""
    if flags.FLAGS.is_parsed():
        return
    version = metadata.version("grain")
    if tuple(int(n) for n in re.findall(r"\d+", version)[:3]) <= (0, 2, 18):
        raise RuntimeError(
            f"num_workers={num_workers} needs absl's flags parsed: grain {version} reads its "
            "own when its workers start (google/grain#1355). Entry points parse them "
            "(python -m pneumojax.main does); in a script or notebook, call "
            "absl.flags.FLAGS(sys.argv[:1]) first, or use num_workers=0")


def train_dataset(source: Sequence[dict], *, batch_size: int, seed: int, num_workers: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  lesion_mask: bool = False) -> grain.IterDataset:
    """Endless shuffled batches of this process's share of `batch_size` (the global batch).

    Every process shuffles with the same seed and takes its own contiguous block of each
    global batch, so the hosts' batches, concatenated in process order, are exactly the batch a
    single process would read: a run gives the same result on any number of hosts. Each epoch
    is a fresh permutation. `get_state`/`set_state` on the iterator make it resumable.
    Batches hold `image` and `label`, and `lesion_mask` if asked for.
    """
    pi, pc, per_host = _host_slice(batch_size, process_index, process_count)
    ds = grain.MapDataset.source(ImageLabels(source, lesion_mask)).seed(seed).shuffle().repeat()
    # Batching is lazy, so each process reads only the examples of its own blocks.
    ds = ds.batch(per_host, drop_remainder=True)[pi::pc]
    # grain's default of 16 read threads per process thrashes small hosts once workers fork;
    # 2 threads and 8 batches ahead measured best (5,600 vs 600 images/s on 2 cores).
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
    if num_workers > 0:
        _check_flags_parsed(num_workers)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


class _Padded(Sequence):
    """This process's examples of each global batch, padded with blank `valid=False` ones."""

    def __init__(self, source: Sequence[dict], batch_size: int, pi: int, pc: int):
        self.source, self.per_host, self.pi, self.pc = source, batch_size // pc, pi, pc
        self.length = math.ceil(len(source) / batch_size) * self.per_host
        self.blank = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> dict:
        batch, offset = divmod(j, self.per_host)
        index = (batch * self.pc + self.pi) * self.per_host + offset
        if index < len(self.source):
            return {**self.source[index], "valid": True, "index": np.int64(index)}
        if self.blank is None:
            self.blank = {"image": np.zeros_like(self.source[0]["image"]), "label": np.int32(0),
                          "valid": False, "index": np.int64(-1)}
        return self.blank


def eval_batches(source: Sequence[dict], *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
    """Every example exactly once, in order; the last batch is padded and `valid` masks it.

    `source` is a prepared split from `data_source`, or any sequence of {"image", "label"}
    dicts (images decoded in memory). Batches carry `index`, each example's position in the
    source (-1 for padding), so predictions can be joined back to file names and patients.
    """
    if len(source) == 0:
        raise ValueError("cannot evaluate on an empty split")
    pi, pc, per_host = _host_slice(batch_size, process_index, process_count)
    if hasattr(source, "data_source"):  # a TFDS source: parse only image and label
        source = ImageLabels(source)
    padded = _Padded(source, batch_size, pi, pc)
    return iter(grain.MapDataset.source(padded).batch(per_host))


DeviceData = dict[str, jax.Array]  # a whole split: `image`, `label` (and `lesion_mask`)


def to_device(source: Sequence[dict], sharding: jax.sharding.Sharding | None = None,
              chunk: int = 256, lesion_mask: bool = False) -> DeviceData:
    """Reads the split once, replicated on the accelerator; afterwards a step needs no host
    work at all. Holds what `train_dataset`'s batches do."""
    source = ImageLabels(source, lesion_mask)
    arrays = {"image": np.empty((len(source), *source.shape), np.uint8),
              "label": np.empty((len(source),), np.int32)}
    if lesion_mask:
        arrays["lesion_mask"] = np.empty_like(arrays["image"])
    for start in range(0, len(source), chunk):
        part = source.__getitems__(list(range(start, min(start + chunk, len(source)))))
        for i, example in enumerate(part, start):
            for name, array in arrays.items():
                array[i] = example[name]
    put = (lambda x: jax.device_put(x, sharding)) if sharding else jax.device_put
    return {name: put(array) for name, array in arrays.items()}


def device_batch(data: DeviceData, key: jax.Array, step: jax.Array, batch_size: int
                 ) -> dict[str, jax.Array]:
    """Batch `step` of a fresh permutation per epoch, gathered on the device (jit-friendly),
    as a dict like `train_dataset`'s.

    It depends only on (key, step), so resuming needs nothing but the step.
    """
    n = data["label"].shape[0]
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} examples on the device")
    epoch, i = jnp.divmod(step, n // batch_size)
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
    return {name: array[idx] for name, array in data.items()}
