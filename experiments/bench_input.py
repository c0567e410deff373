"""Input-pipeline throughput: grain host pipeline (0 and all workers) vs the device-resident path.

    python experiments/bench_input.py                      # synthetic phantoms, 224 px
    python experiments/bench_input.py --source folder:PATH/chest_xray

Records merge into experiments/results/bench_input.json (one per path, workers, batch, size,
augmentation, data set and device). Goal: the host pipeline >= 3,000 images/s on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import jax
from absl import flags as absl_flags

from pneumojax import data, xla_cpu
from pneumojax.data import augment

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from experiments import common

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_input.json"
KEY = ("path", "workers", "batch", "image_size", "augment", "data", "device")


def _rate(next_batch, batch: int, seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        next_batch()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 5:
        next_batch()
        n += 1
    return n * batch / elapsed


def bench_host(source, batch: int, workers: int, seconds: float) -> float:
    it = iter(data.train_dataset(source, batch_size=batch, seed=0, num_workers=workers))
    try:
        return _rate(lambda: next(it), batch, seconds)
    finally:
        it.close()  # stops the worker processes now, not noisily at interpreter exit


def bench_device(dd: data.DeviceData, batch: int, seconds: float, with_augment: bool) -> float:
    """The on-device gather, alone or followed by augmentation as the train step runs it."""
    cfg = augment.AugmentConfig()

    @jax.jit
    def fetch(key, step):
        images = data.device_batch(dd, key, step, batch)["image"]
        if with_augment:
            images = augment.augment_batch(images, jax.random.fold_in(key, step), cfg)
        return images, step + 1

    state = [jax.random.key(0), jax.numpy.asarray(0)]

    def next_batch():
        images, state[1] = fetch(*state)
        images.block_until_ready()
    return _rate(next_batch, batch, seconds)


def main(argv: list[str] | None = None) -> None:
    xla_cpu.set_flags()  # before JAX's backend starts
    absl_flags.FLAGS(sys.argv[:1])  # grain's workers read its absl flags (data.pipeline)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="synthetic")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--synthetic-count", type=int, default=2000)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)

    name = data.ensure_prepared(args.source, data_dir=args.data_dir, image_size=args.image_size,
                                synthetic_count=args.synthetic_count)
    source = data.data_source(name, "train", data_dir=args.data_dir)
    device = common.device_name()
    stamp = dict(device=device, data=name, commit=common.commit(),
                 date=datetime.datetime.now().isoformat(timespec="seconds"))
    records = []
    for workers in sorted({0, os.cpu_count() or 1}):
        rate = bench_host(source, args.batch, workers, args.seconds)
        records.append(dict(path="host", workers=workers, batch=args.batch,
                            image_size=args.image_size, images_per_s=round(rate, 1),
                            augment=False, **stamp))
        print(json.dumps(records[-1]), flush=True)
    dd = data.to_device(source)
    for with_augment in (False, True):
        rate = bench_device(dd, args.batch, args.seconds, with_augment)
        records.append(dict(path="device", workers=0, batch=args.batch,
                            image_size=args.image_size, images_per_s=round(rate, 1),
                            augment=with_augment, **stamp))
        print(json.dumps(records[-1]), flush=True)
    common.merge_results(args.out, records, KEY)


if __name__ == "__main__":
    main()
