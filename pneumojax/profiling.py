"""What a compiled step costs: where its time goes, and how large a batch fits in memory.

Time: `kernel_times` sums a `jax.profiler` trace's events by the compiled HLO's instruction
names, and `hlo_categories` sorts those instructions by what they compute, read from the JAX
name stack that XLA keeps in each instruction's metadata (for a fusion, of every op fused into
it). experiments/profile_step.py applies both to the trainer's step.

Memory: `largest_batch` finds the largest batch whose step fits on the device from the step's
memory at two small batches (`step_bytes`), and `fit` confirms it by running, halving on an
out-of-memory error. experiments/bench_train.py's `--batch auto` uses them.
"""

from __future__ import annotations

import collections
import gc
import os
import pathlib
import re
from collections.abc import Callable

import jax

# First match wins, on the name stacks of the ops an HLO instruction runs: `convolution`
# (forward and both gradients), `input` (the uint8 batch made float and augmented on the
# device, `data.augment.augment_batch`), `batch_norm` (the `batch_norm` name scope of the
# models' BatchNorm) and `optimizer` (the `optimizer` scope of the train step). The rest is
# `layout` (copies and transposes) or `elementwise` (activations, pooling, the loss, casts).
CATEGORIES = (("convolution", "conv_general_dilated"), ("input", "augment_batch"),
              ("batch_norm", "batch_norm"), ("optimizer", "optimizer"))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = .*?\b([a-z][\w-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) ")

# Lines the profiler derives from the kernels' own: counting them would count kernels twice.
DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Framework Name Scope", "Steps",
                 "Framework Ops", "Source code", "Host Offload Ops"}


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """Each instruction of a compiled HLO module (`compiled.as_text()`) -> its category, one
    of `CATEGORIES`' or `layout` or `elementwise`."""
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


def kernel_times(trace_dir: str | os.PathLike, steps: int) -> dict[str, float]:
    """ms per step of every kernel in the `jax.profiler.trace` written to `trace_dir`, by its
    HLO instruction's name, largest first: on an accelerator the device planes' events, on a
    CPU those of XLA's threads. Events that nest (the ops inside a conditional) are counted
    where they run."""
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


def step_bytes(jitted, *args) -> int:
    """Device memory `jitted(*args)` needs: its arguments, outputs and scratch, from XLA's own
    accounting of the compiled function (`jitted` is a `jax.jit`); nothing runs. On a GPU the
    compile skips autotuning, which changes the kernels chosen, not what they hold."""
    lowered = jitted.lower(*args)
    try:
        fast = {"xla_gpu_autotune_level": 0} if jax.default_backend() == "gpu" else None
        compiled = lowered.compile(compiler_options=fast)
    except Exception as e:  # an XLA that no longer knows the option: compile as it is
        if is_oom(e):
            raise
        compiled = lowered.compile()
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def memory_limit() -> int:
    """Bytes this process may hold on the first device: the allocator's limit on an
    accelerator (it honours XLA_PYTHON_CLIENT_MEM_FRACTION), the machine's RAM on a CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def largest_batch(step_bytes: Callable[[int], int], cap: int,
                  probes: tuple[int, int] = (16, 32), usable: float = 0.9,
                  limit: int | None = None) -> dict:
    """The largest batch (a multiple of 8, at most `cap`) whose step fits in `usable` of
    `limit` bytes (default: `memory_limit()`), where `step_bytes(batch)` is the step's memory
    at a batch (`step_bytes` of the step jitted at that batch: nothing needs to run).
    Parameters and optimizer state are fixed and activations grow linearly with the batch, so
    the step's memory at two probe batches gives both, and the line through them the answer;
    `fit` then confirms it by running."""
    sizes = {b: step_bytes(b) for b in probes}
    (b1, m1), (b2, m2) = sorted(sizes.items())
    per_image = max((m2 - m1) / (b2 - b1), 1.0)
    limit = memory_limit() if limit is None else limit
    predicted = int((usable * limit - (m1 - per_image * b1)) // per_image)
    batch = max(1, min(cap, predicted // 8 * 8 if predicted >= 8 else predicted))
    return dict(batch=batch, predicted=predicted, cap=cap, memory_limit=limit,
                probe_bytes={str(b): m for b, m in sizes.items()},
                bytes_per_image=round(per_image))


def is_oom(error: Exception) -> bool:
    """Whether `error` is a device running out of memory (XLA's or PyTorch's, by message)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def fit(make: Callable[[int], Callable[[], None]], batch: int, warmup: int = 3,
        free: Callable[[], None] = lambda: None) -> tuple[Callable[[], None], int]:
    """(step, batch): the step `make(batch)` builds, warmed up, halving `batch` while it runs
    out of memory, so a predicted batch is confirmed by running it, not trusted. `free` runs
    after each failure (e.g. to empty another framework's cache); any other error is raised."""
    while True:
        try:
            step = make(batch)
            for _ in range(warmup):
                step()
            return step, batch
        except Exception as e:  # XlaRuntimeError or torch.OutOfMemoryError, by message
            if not is_oom(e) or batch == 1:
                raise
            print(f"out of memory at batch {batch}; trying {batch // 2}", flush=True)
            step = None
            gc.collect()
            free()
            batch //= 2
