r"""Where the trainer's step spends its time, kernel by kernel, from a `jax.profiler` trace.

    python experiments/profile_step.py                                # deep CNN, 128 px, batch 64
    python experiments/profile_step.py --model resnet50 --image-size 224 --batch 256 \
        --dtype bfloat16 --augment

It jits `bench_train.pneumojax_step` (the trainer's own step; augmentation off unless
`--augment`, which profiles the step as training runs it), warms it up, traces `--steps` steps
and sums the trace's events by name: XLA's fusions (`transpose_copy_*`, `broadcast_*`,
`__ynn_fusion`s, ...), convolutions and copies. Names are those of the compiled HLO, which
`--hlo FILE` writes, so that each fusion can be read. Events that nest (e.g. the ops inside a
conditional) are counted where they run; on an accelerator only the device's own kernels count.

`by_category` sorts the same time by what the kernels compute, read from the JAX name stack
that XLA keeps in each HLO instruction's metadata (for a fusion, of every op fused into it):
`convolution` (forward and both gradients), `input` (the uint8 batch made float and augmented
on the device, `data.augment.augment_batch`), `batch_norm` (the `batch_norm` name scope of
`models.norm`), `optimizer` (the `optimizer` scope of the train step), `layout` (copies and
transposes) and `elementwise` (the rest: activations, pooling, the loss, casts). The step's
wall time is printed beside the events' sum; on CPU the gap is the convolutions, which run on
Eigen's threads without events of their own. Results go to experiments/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import re
import pathlib
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script

from experiments import bench_train, common

RESULTS = ROOT / "experiments" / "results" / "profile_step.json"


# First match wins, on the name stacks of the ops an HLO instruction runs.
CATEGORIES = (("convolution", "conv_general_dilated"), ("input", "augment_batch"),
              ("batch_norm", "batch_norm"), ("optimizer", "optimizer"))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = .*?\b([a-z][\w-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) ")


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """Each instruction of a compiled HLO module -> its category (see the module docstring)."""
    called: dict[str, list[str]] = collections.defaultdict(list)  # computation -> callees
    names: dict[str, set[str]] = collections.defaultdict(set)     # computation -> op names
    instructions: dict[str, tuple[str, str, list[str], set[str]]] = {}
    computation = ""
    for line in hlo_text.splitlines():
        if m := _COMPUTATION.match(line):
            computation = m.group(1)
        elif m := _INSTRUCTION.match(line):
            ops = set(re.findall(r'op_name="([^"]*)"', line))
            callees = re.findall(r"(?:calls|to_apply|body|condition|branch_computations)="
                                 r"\{?([%\w., -]+)\}?", line)
            callees = [c.strip().lstrip("%") for group in callees for c in group.split(",")]
            instructions[m.group(1)] = (computation, m.group(2), callees, ops)
            names[computation] |= ops
            called[computation] += callees

    def stack(computation: str, seen: set[str]) -> set[str]:
        if computation in seen:
            return set()
        seen.add(computation)
        return names[computation].union(*(stack(c, seen) for c in called[computation]))

    result = {}
    for name, (_, opcode, callees, ops) in instructions.items():
        ops = ops.union(*(stack(c, set()) for c in callees))
        category = next((c for c, key in CATEGORIES if any(key in o for o in ops)), None)
        if category is None:
            layout = opcode in ("copy", "transpose") or "copy" in name or "transpose" in name
            category = "layout" if layout else "elementwise"
        result[name] = category
    return result


def kernel_times(trace_dir: str, steps: int) -> dict[str, float]:
    """ms per step of every kernel, by its HLO instruction's name, largest first: on an
    accelerator the device planes' events, on a CPU those of XLA's threads."""
    from jax.profiler import ProfileData

    path = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    planes = list(ProfileData.from_file(str(path)).planes)
    devices = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    totals: collections.Counter[str] = collections.Counter()
    for plane in devices or planes:
        for line in plane.lines:
            if line.name == "python" or line.name in DERIVED_LINES:
                continue
            for event in line.events:
                if "Execute" in event.name or event.name.startswith("end:"):
                    continue
                name = dict(event.stats).get("hlo_op") or event.name
                totals[name] += event.duration_ns / 1e6 / steps
    return dict(totals.most_common())


# Lines the profiler derives from the kernels' own: counting them would count kernels twice.
DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Framework Name Scope", "Steps",
                 "Framework Ops", "Source code", "Host Offload Ops"}


def main(argv: list[str] | None = None) -> None:
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
    categories = hlo_categories(hlo.read_text())
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
