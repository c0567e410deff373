"""Heat maps per second, batched and one by one, against a forward+backward pass.

    python experiments/bench_gradcam.py                                   # GPU: 224 px ResNet50
    python experiments/bench_gradcam.py --image-size 64 --batch 16        # a 2-core CPU
    python experiments/bench_gradcam.py --models deep_cnn:cpu,resnet50:demo --image-size 32

For each model (configs' architectures, `name:arg` for a variant; random weights: speed does
not depend on them) and method, the time of `gradcam.cams` on a batch is divided by the time of
a forward+backward pass over the same batch: `jax.grad` of the summed logits with respect to
every parameter, in eval mode, which is what one training step costs without the optimizer.
"one_by_one" makes the same number of maps with batch 1 and compares with forward+backward
passes of batch 1. The goal is a ratio of at most 1.5. Writes
experiments/results/bench_gradcam.json (records with the same model, mode, method, batch,
image size and device are replaced), after each model and method.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script
from experiments import common
from pneumojax import gradcam, xla_cpu
from pneumojax.training import step as steps
from pneumojax.data import augment

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_gradcam.json"
KEY = ("model", "mode", "method", "batch", "image_size", "dtype", "device")


def model_config(spec: str):
    """`configs/<name>.py:<arg>` for `name:arg`."""
    name, _, arg = spec.partition(":")
    return importlib.import_module(f"configs.{name}").get_config(arg or None)


def _seconds_per_call(fn: Callable[[], object], seconds: float) -> float:
    """Median over rounds of the mean time per call, after a compiling call."""
    jax.block_until_ready(fn())
    rounds = []
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3 or n < 2:
            jax.block_until_ready(fn())
            n += 1
        rounds.append(elapsed / n)
    return float(np.median(rounds))


def _fwd_bwd(graphdef: nnx.GraphDef) -> Callable:
    @jax.jit
    def run(params: nnx.State, rest: nnx.State, images: jax.Array) -> nnx.State:
        def loss(p: nnx.State) -> jax.Array:
            model = nnx.merge(graphdef, p, rest, copy=True)
            return model(augment.to_float(images))[0].sum()
        return jax.grad(loss)(params)
    return run


def bench(model: str, *, image_size: int, batch: int, method: str, seconds: float,
          dtype: str = "float32") -> list[dict]:
    config = model_config(model)
    config.model.init, config.data.image_size, config.model.dtype = "scratch", image_size, dtype
    graphdef, state = steps.init_model(config, pretrained=False)
    params, rest = state["params"], state["rest"]
    layer = gradcam.default_layer(config.model.name, image_size, **config.model.kwargs)
    images = jnp.asarray(np.random.default_rng(0).integers(
        0, 256, (batch, image_size, image_size, 1), dtype=np.uint8))
    fwd_bwd = _fwd_bwd(graphdef)
    records = []
    for mode, chunk in (("batched", batch), ("one_by_one", 1)):
        parts = [images[i:i + chunk] for i in range(0, batch, chunk)]
        cam = _seconds_per_call(lambda parts=parts: [gradcam.cams(
            graphdef, state, x, layer=layer, method=method)["maps"] for x in parts], seconds)
        base = _seconds_per_call(lambda parts=parts: [fwd_bwd(params, rest, x) for x in parts],
                                 seconds)
        records.append(dict(model=model, mode=mode, method=method, layer=layer, batch=batch,
                            image_size=image_size, dtype=dtype, maps_per_s=batch / cam,
                            ratio_to_fwd_bwd=cam / base, fwd_bwd_images_per_s=batch / base,
                            device=common.device_name(), commit=common.commit(),
                            date=datetime.datetime.now().isoformat(timespec="seconds")))
        r = records[-1]
        print(f"{model:<9} {method:<9} {mode:<10} batch {batch:<4} {image_size} px: "
              f"{r['maps_per_s']:9.1f} maps/s, {r['ratio_to_fwd_bwd']:.2f}x fwd+bwd "
              f"({r['fwd_bwd_images_per_s']:.1f} img/s)", flush=True)
    return records


def main(argv: list[str] | None = None) -> None:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="deep_cnn,resnet50")
    parser.add_argument("--methods", default=",".join(gradcam.METHODS))
    parser.add_argument("--image-size", type=int, help="default: each config's own")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    for model in args.models.split(","):
        size = args.image_size or model_config(model).data.image_size
        for method in args.methods.split(","):
            records = bench(model, image_size=size, batch=args.batch, method=method,
                            seconds=args.seconds, dtype=args.dtype)
            common.merge_results(args.out, records, KEY)  # kept if a later one is cut short
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
