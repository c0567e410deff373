r"""Where the trainer's step spends its time, kernel by kernel, from a `jax.profiler` trace.

    python experiments/profile_step.py                                # deep CNN, 128 px, batch 64
    python experiments/profile_step.py --model resnet50 --image-size 224 --batch 256 \
        --dtype bfloat16 --augment

It jits `bench_train.pneumojax_step` (the trainer's own step; augmentation off unless
`--augment`, which profiles the step as training runs it), warms it up, traces `--steps` steps
and sums the trace's events by name (`pneumojax.profiling.kernel_times`): XLA's fusions
(`transpose_copy_*`, `broadcast_*`, `__ynn_fusion`s, ...), convolutions and copies. Names are
those of the compiled HLO, which `--hlo FILE` writes, so that each fusion can be read. Events
that nest (e.g. the ops inside a conditional) are counted where they run; on an accelerator
only the device's own kernels count.

`by_category` sorts the same time by what the kernels compute, read by
`pneumojax.profiling.hlo_categories` from the JAX name stack that XLA keeps in each HLO
instruction's metadata (for a fusion, of every op fused into it): `convolution` (forward and
both gradients), `input` (the uint8 batch made float and augmented on the device,
`data.augment.augment_batch`), `batch_norm` (the `batch_norm` name scope of the models'
BatchNorm), `optimizer` (the `optimizer` scope of the train step), `layout` (copies and
transposes) and `elementwise` (the rest: activations, pooling, the loss, casts). The step's
wall time is printed beside the events' sum; on CPU the gap is the convolutions, which run on
Eigen's threads without events of their own. Results go to experiments/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script

from experiments import bench_train, common
from pneumojax import profiling, xla_cpu

RESULTS = ROOT / "experiments" / "results" / "profile_step.json"


def main(argv: list[str] | None = None) -> None:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deep_cnn", help="configs/<model>.py, name:arg allowed")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--augment", action="store_true",
                        help="augment on the device, as training does (default: off)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", type=pathlib.Path, help="write the compiled step's HLO here")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)

    name, _, arg = args.model.partition(":")
    config = bench_train.model_config(name, arg or None, args.image_size, args.batch, args.dtype)
    config.data.augment.enabled = args.augment
    hlo = args.hlo or pathlib.Path(tempfile.mkdtemp()) / "step.hlo"
    step = bench_train.pneumojax_step(config, hlo_to=hlo)
    categories = profiling.hlo_categories(hlo.read_text())
    for _ in range(3):
        step()
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                step()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
        kernels = profiling.kernel_times(trace_dir, args.steps)
    kinds: collections.Counter[str] = collections.Counter()
    by_category: collections.Counter[str] = collections.Counter()
    for kernel, ms in kernels.items():
        kinds[kernel.rstrip("0123456789").rstrip(".")] += ms
        by_category[categories.get(kernel, "unmatched")] += ms
    record = dict(model=args.model, image_size=args.image_size, batch=args.batch,
                  dtype=args.dtype, augment=args.augment, device=common.device_name(),
                  commit=common.commit(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  step_ms=round(wall_ms, 1), events_ms=round(sum(kernels.values()), 1),
                  by_category={k: round(v, 1) for k, v in by_category.most_common()},
                  by_kind={k: round(v, 1) for k, v in kinds.most_common()},
                  top={k: round(v, 1) for k, v in list(kernels.items())[:args.top]})
    print(f"step {wall_ms:.0f} ms (traced), events {record['events_ms']:.0f} ms")
    for category, ms in by_category.most_common():
        print(f"  {ms:8.1f} ms  {category}  ({100 * ms / max(record['events_ms'], 1e-9):.0f} %)")
    print("by kind:")
    for kind, ms in kinds.most_common(12):
        print(f"  {ms:8.1f} ms  {kind}")
    print("largest:")
    for kernel, ms in record["top"].items():
        print(f"  {ms:8.1f} ms  {kernel}")
    common.merge_results(args.out, [record],
                         ("model", "image_size", "batch", "dtype", "augment", "device"))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
