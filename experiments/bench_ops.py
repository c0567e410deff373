"""Where a training step's time goes: the deep CNN's layers one by one, pneumojax against PyTorch.

    python experiments/bench_ops.py                          # 128 px, batch 64, the config's widths
    python experiments/bench_ops.py --image-size 64

`bench_train.py` times whole steps; this times each of the deep CNN's convolutions (forward,
then the gradients of input and kernel, as training needs them) and each batch norm + ReLU
(forward and backward, training mode), with the same shapes and in float32 on both sides:
the models' own `xla_cpu.Conv` and `xla_cpu.BatchNorm` (flax's plain layers with
`PNEUMOJAX_CPU_KERNELS=0`) jitted against `torch.nn.Conv2d` and `BatchNorm2d` (NCHW, eager).
The layer list is read from the deep CNN itself. The first convolution's input gradient is
skipped on both sides, as training skips it. Each time is the best of `--repeats` calls after
a warm-up, the two frameworks taking turns. Results merge into
experiments/results/bench_ops.json.

Alone, each op's input is a stored array. Inside a step, XLA can fuse the batch norm that
produced it into the op's first pass, so this cannot see costs that come from composition
(see `pneumojax.xla_cpu`, item 3).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from configs import deep_cnn
from experiments import common
from pneumojax import models, xla_cpu

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_ops.json"
KEY = ("op", "shape", "framework", "device")


def _best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each function in ms, the functions taking turns so that load from other
    jobs on a shared machine hits them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * min(t) for name, t in times.items()}


def _jax_op(module: nnx.Module, x: np.ndarray, dy: np.ndarray, need_dx: bool) -> Callable:
    graphdef, state = nnx.split(module)
    relu = isinstance(module, nnx.BatchNorm)

    def forward(state: nnx.State, x: jax.Array) -> jax.Array:
        y = nnx.merge(graphdef, state)(x)
        return nnx.relu(y) if relu else y

    @jax.jit
    def run(state: nnx.State, x: jax.Array, dy: jax.Array):
        y, vjp = jax.vjp(forward, state, x)
        d_state, dx = vjp(dy)
        return (y, d_state, dx) if need_dx else (y, d_state)

    x, dy = jax.numpy.asarray(x), jax.numpy.asarray(dy)
    return lambda: run(state, x, dy)


def _torch_op(module, x: np.ndarray, dy: np.ndarray, need_dx: bool) -> Callable:
    import torch

    relu = isinstance(module, torch.nn.BatchNorm2d)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(need_dx)
    tdy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())

    def run() -> None:
        y = module(tx)
        (torch.relu(y) if relu else y).backward(tdy)
        module.zero_grad(set_to_none=True)
        tx.grad = None
    return run


def layers(image_size: int, widths: tuple[int, ...]) -> list[tuple[str, int, int, int]]:
    """(op, side, channels in, channels out) of every conv and batch norm of the deep CNN with
    these widths, in order, read from the model (each block halves the side)."""
    model = nnx.eval_shape(lambda: models.create("deep_cnn", widths=widths, rngs=nnx.Rngs(0)))
    out, side = [], image_size
    for i, block in enumerate(model.blocks, 1):
        for j in (1, 2):
            c_in, c_out = getattr(block, f"conv{j}").kernel.shape[2:]
            out += [(f"block{i}.conv{j}", side, c_in, c_out),
                    (f"block{i}.bn{j}+relu", side, c_out, c_out)]
        side //= 2
    return out


def main(argv: list[str] | None = None) -> None:
    xla_cpu.set_flags()  # before JAX's backend starts
    import torch

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    widths = tuple(deep_cnn.get_config().model.kwargs.widths)
    rng = np.random.default_rng(0)
    shared = dict(batch=args.batch, image_size=args.image_size, device=common.device_name(),
                  commit=common.commit(), date=datetime.date.today().isoformat(),
                  torch_threads=torch.get_num_threads())
    records, totals = [], {"pneumojax": 0.0, "pytorch": 0.0}
    for op, side, c_in, c_out in layers(args.image_size, widths):
        x = rng.random((args.batch, side, side, c_in), np.float32)
        dy = rng.random((args.batch, side, side, c_out), np.float32)
        need_dx = c_in != 1  # the first convolution: no gradient of the input image
        if "conv" in op:
            jax_module = xla_cpu.Conv(c_in, c_out, (3, 3), padding="SAME", use_bias=False,
                                      rngs=nnx.Rngs(0))
            torch_module = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        else:
            jax_module = xla_cpu.BatchNorm(c_out, rngs=nnx.Rngs(0))
            torch_module = torch.nn.BatchNorm2d(c_out).train()
        ms = _best_ms({"pneumojax": _jax_op(jax_module, x, dy, need_dx),
                       "pytorch": _torch_op(torch_module, x, dy, need_dx)}, args.repeats)
        shape = [args.batch, side, side, c_in, c_out]
        for framework, value in ms.items():
            totals[framework] += value
            records.append(dict(shared, op=op, shape=shape, framework=framework, ms=value))
        print(f"{op:<16} {side:>4} px {c_in:>4}->{c_out:<4} pneumojax {ms['pneumojax']:7.1f} ms"
              f"  pytorch {ms['pytorch']:7.1f} ms  ratio {ms['pytorch'] / ms['pneumojax']:.2f}x",
              flush=True)
    print(f"{'all':<16} pneumojax {totals['pneumojax']:.0f} ms  pytorch {totals['pytorch']:.0f} ms")
    common.merge_results(args.out, records, KEY)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
