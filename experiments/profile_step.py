r"""Where the trainer's step spends its time, kernel by kernel, from a `jax.profiler` trace.

    python experiments/profile_step.py                                # deep CNN, 128 px, batch 64
    python experiments/profile_step.py --model resnet50 --image-size 224 --batch 256 \
        --dtype bfloat16

It jits `bench_train.pneumojax_step` (the trainer's own step, augmentation off), warms it up,
traces `--steps` steps and sums the trace's events by name: XLA's fusions (`transpose_copy_*`,
`broadcast_*`, `__ynn_fusion`s, ...), convolutions and copies. Names are those of the compiled
HLO, which `--hlo FILE` writes, so that each fusion can be read. Events that nest (e.g. the
ops inside a conditional) are counted where they run. The step's wall time is printed beside
the events' sum; on CPU the gap is the convolutions, which run on Eigen's threads without
events of their own. Results go to experiments/results/profile_step.json.
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

RESULTS = ROOT / "experiments" / "results" / "profile_step.json"


def kernel_times(trace_dir: str, steps: int) -> dict[str, float]:
    """ms per step of every event on the device's and XLA's threads, by name, largest first."""
    from jax.profiler import ProfileData

    path = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    totals: collections.Counter[str] = collections.Counter()
    for plane in ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if "Execute" not in event.name and not event.name.startswith("end:"):
                    totals[event.name] += event.duration_ns / 1e6 / steps
    return dict(totals.most_common())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deep_cnn", help="configs/<model>.py, name:arg allowed")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", type=pathlib.Path, help="write the compiled step's HLO here")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)

    name, _, arg = args.model.partition(":")
    config = bench_train.model_config(name, arg or None, args.image_size, args.batch, args.dtype)
    step = bench_train.pneumojax_step(config, hlo_to=args.hlo)
    for _ in range(3):
        step()
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                step()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
        kernels = kernel_times(trace_dir, args.steps)
    kinds: collections.Counter[str] = collections.Counter()
    for kernel, ms in kernels.items():
        kinds[kernel.rstrip("0123456789").rstrip(".")] += ms
    record = dict(model=args.model, image_size=args.image_size, batch=args.batch,
                  dtype=args.dtype, device=common.device_name(), commit=common.commit(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  step_ms=round(wall_ms, 1), events_ms=round(sum(kernels.values()), 1),
                  by_kind={k: round(v, 1) for k, v in kinds.most_common()},
                  top={k: round(v, 1) for k, v in list(kernels.items())[:args.top]})
    print(f"step {wall_ms:.0f} ms (traced), events {record['events_ms']:.0f} ms")
    for kind, ms in kinds.most_common(12):
        print(f"  {ms:8.1f} ms  {kind}")
    print("largest:")
    for kernel, ms in record["top"].items():
        print(f"  {ms:8.1f} ms  {kernel}")
    common.merge_results(args.out, [record], ("model", "image_size", "batch", "dtype", "device"))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
