r"""Training throughput, pneumojax against PyTorch, same architectures, same run, same device.

    python experiments/bench_train.py                                      # all 3 models, 64 px
    python experiments/bench_train.py --models deep_cnn --image-size 128 --batch 64
    python experiments/bench_train.py --models deep_cnn,shallow_cnn --config-arg cpu
    python experiments/bench_train.py --models resnet50 --image-size 64 --batch 16
    python experiments/bench_train.py --models resnet50,deep_cnn --image-size 224 \
        --batch auto --dtype bfloat16                                      # on a GPU

What is measured, per model, in images/s of training (forward, backward, optimizer update):

- pneumojax: the trainer's own step, `pneumojax.training.step.build` (clip + AdamW, class
  weights), jitted as
  `train_and_evaluate` does it (replicated state donated, batch sharded over the mesh). The
  batch is uint8 (B, H, W, 1) and already on the device: the input pipeline is not measured
  (see bench_input.py). Augmentation is off (`data.augment.enabled=False`, so the step only
  converts uint8 to [0, 1]), because the PyTorch side has none. `--dtype` is `model.dtype`.
- PyTorch: `pneumojax.torch_twins` (the same topology, NCHW), `model.train()`, uint8 -> float / 255,
  class-weighted BCE with logits, global-norm clipping at the config's `grad_clip`, then AdamW
  with the config's learning rate and weight decay on kernels only. On CPU it runs eager in
  float32 (`amp` autocasts to bf16 with `--dtype bfloat16`); on CUDA it runs with bf16
  autocast and channels_last, with and without `torch.compile`. The `setup` field says which.

Model kwargs come from the configs (`configs/<model>.py`, `--config-arg cpu` for the `:cpu`
variants, or `name:arg` in `--models`; ResNet50 always from scratch); `--model-kwargs` (JSON)
overrides them. Image size and batch are always the command line's, never the config's.
Every step is compiled and warmed up first; then the frameworks alternate in
`--rounds` rounds of `--seconds / --rounds` each, and the median round is reported, so load
from other jobs on a shared machine hits both sides alike.

`--batch auto` takes, per model, the largest batch that fits
(`pneumojax.profiling.largest_batch`: XLA's own memory accounting of the compiled step at two
small batches, extrapolated to the device's limit, then confirmed by running it); PyTorch runs
at the same batch, halved only if it runs out of memory. On a GPU the two frameworks share the
device in one process, so each gets the share `XLA_PYTHON_CLIENT_MEM_FRACTION` names (PyTorch
through `set_per_process_memory_fraction`); the device suite sets 0.45 with
`XLA_PYTHON_CLIENT_PREALLOCATE=false`.

Results merge into experiments/results/bench_train.json: a record replaces the one with the
same (model, framework, image_size, batch, device, dtype, setup, model_kwargs), so CPU and GPU
runs coexist. The printed ratio is pneumojax / PyTorch images/s.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # configs/

from experiments import common
from pneumojax import profiling, sharding, transfer, xla_cpu
from pneumojax.training import step as steps

RESULTS = ROOT / "experiments" / "results" / "bench_train.json"
# The Kaggle chest_xray train split: realistic class weights, not that they change the cost.
COUNTS = {"NORMAL": 1341, "PNEUMONIA": 3875}
KEY = ("model", "framework", "image_size", "batch", "device", "dtype", "setup", "model_kwargs")

Step = Callable[[], None]  # one training step, blocking until it is done


def model_config(name: str, config_arg: str | None = None, image_size: int = 64,
                 batch: int = 64, dtype: str = "float32",
                 model_kwargs: dict | None = None) -> ml_collections.ConfigDict:
    """`configs/<name>.py:<config_arg>` sized for the benchmark, augmentation off, no download."""
    c = importlib.import_module(f"configs.{name}").get_config(config_arg)
    c.model.init = "scratch"
    c.model.dtype = dtype
    c.model.kwargs.update(model_kwargs or {})
    c.data.image_size = image_size
    c.data.augment.enabled = False
    c.train.batch_size = batch
    return c


def _batch(c: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    b, s = c.train.batch_size, c.data.image_size
    return (rng.integers(0, 256, (b, s, s, 1), dtype=np.uint8),
            rng.integers(0, 2, (b,), dtype=np.int32))


def _pneumojax_jit(c: ml_collections.ConfigDict) -> tuple[Callable, dict, dict]:
    """(jitted step, replicated state, sharded batch): the trainer's step as
    `train_and_evaluate` jits it (replicated state donated, batch sharded over the mesh)."""
    mesh = sharding.make_mesh(c.train.num_devices)
    jitted, state = steps.build(c, mesh, class_counts=COUNTS, pretrained=False,
                                frozen=transfer.frozen_groups(c, 0.0))
    images, labels = _batch(c)
    return jitted, state, sharding.global_batch({"image": images, "label": labels}, mesh)


def pneumojax_step(c: ml_collections.ConfigDict, hlo_to: pathlib.Path | None = None) -> Step:
    """The trainer's jitted train step on a fixed batch, its state carried from call to call;
    `hlo_to` receives the compiled step's HLO."""
    jitted, state, batch = _pneumojax_jit(c)
    if hlo_to:
        hlo_to.write_text(jitted.lower(state, batch).compile().as_text())
    box = [state]

    def run() -> None:
        box[0], m = jitted(box[0], batch)
        jax.block_until_ready((box[0], m))
    return run


def _free_torch_cache() -> None:
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def torch_setups(device: str, dtype: str) -> list[str]:
    """CUDA: AMP + channels_last, eager and compiled; CPU: eager, autocast with bfloat16."""
    if device == "cuda":
        return ["amp+channels_last", "amp+channels_last+compile"]
    return ["amp" if dtype == "bfloat16" else "eager"]


def pytorch_step(c: ml_collections.ConfigDict, setup: str = "eager",
                 device: str | None = None) -> Step:
    """The same model and update in PyTorch; `setup` is '+'-joined amp, channels_last, compile."""
    import torch
    from pneumojax import torch_twins

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    flags = set(setup.split("+")) - {"eager"}
    if unknown := flags - {"amp", "channels_last", "compile"}:
        raise ValueError(f"unknown setup parts {sorted(unknown)}")
    torch.manual_seed(c.train.seed)
    model = torch_twins.create(c.model.name, in_channels=1, **c.model.kwargs).to(device)
    memory_format = torch.channels_last if "channels_last" in flags else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [dict(params=[p for p in params if p.ndim > 1], weight_decay=c.train.weight_decay),
         dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)],
        lr=c.train.learning_rate)
    weights = torch.as_tensor(np.array(steps.class_weights(COUNTS, c.train.class_weights)),
                              device=device)
    images, labels = _batch(c)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).contiguous(
        memory_format=memory_format)
    y = torch.from_numpy(labels).long().to(device)
    forward = torch.compile(model) if "compile" in flags else model

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled="amp" in flags):
            logits = forward(x.float() / 255.0).float()
        w = weights[y]
        per_example = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.float(), reduction="none")
        loss = (w * per_example).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.train.grad_clip)
        opt.step()
        loss.item()
    return run


def rate(step: Step, batch: int, seconds: float, min_steps: int = 2) -> float:
    """Images/s over at least `seconds` and `min_steps` steps (the caller warmed up)."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < min_steps:
        step()
        n += 1
    return n * batch / elapsed


def _batch_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> None:
    xla_cpu.set_flags()  # before JAX's backend starts
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shallow_cnn,deep_cnn,resnet50",
                        help="comma-separated; name:arg picks configs/name.py:arg")
    parser.add_argument("--config-arg", default=None, help="config variant for every model")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='JSON overriding the config\'s model kwargs, e.g. \'{"width": 8}\'')
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=_batch_arg, default=64,
                        help="a number, or auto: the largest that fits (profiling.largest_batch)")
    parser.add_argument("--max-batch", type=int, default=4096, help="the cap of --batch auto")
    parser.add_argument("--seconds", type=float, default=20.0, help="per framework and setup")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--frameworks", default="pneumojax,pytorch")
    parser.add_argument("--torch-setups", default=None,
                        help="comma-separated, e.g. eager,amp+channels_last+compile; "
                             "default: see torch_setups()")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)

    frameworks = args.frameworks.split(",")
    device = common.device_name()
    shared = dict(image_size=args.image_size, device=device,
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  commit=common.commit(), jax_version=jax.__version__)
    if "pytorch" in frameworks:
        import torch
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        shared["torch_version"] = torch.__version__
        setups = (args.torch_setups.split(",") if args.torch_setups
                  else torch_setups(torch_device, args.dtype))
        if torch_device == "cuda" and "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ:
            torch.cuda.set_per_process_memory_fraction(
                float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]))
    records = []
    for spec in args.models.split(","):
        name, _, arg = spec.partition(":")
        arg = arg or args.config_arg
        c = model_config(name, arg, args.image_size, 1, args.dtype, args.model_kwargs)
        label = f"{name}:{arg}" if arg else name
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in c.model.kwargs.items()}

        def sized(b: int, c: ml_collections.ConfigDict = c) -> ml_collections.ConfigDict:
            c.train.batch_size = b
            return c

        search = (profiling.largest_batch(
            lambda b: profiling.step_bytes(*_pneumojax_jit(sized(b))), args.max_batch)
            if args.batch == "auto" else None)
        if search:
            print(f"{label}: batch search {json.dumps(search)}", flush=True)
        batch = search["batch"] if search else args.batch

        runs: list[tuple[dict, Step, int]] = []  # compiled and warmed up before any timing
        if "pneumojax" in frameworks:
            on_cpu = jax.default_backend() == "cpu"
            step, batch = profiling.fit(lambda b: pneumojax_step(sized(b)), batch,
                                        free=_free_torch_cache)
            runs.append((dict(framework="pneumojax", dtype=args.dtype, setup="jit",
                              threads=os.cpu_count() if on_cpu else None,
                              batch_search=search), step, batch))
        if "pytorch" in frameworks:
            for setup in setups:
                amp = "amp" in setup.split("+")
                step, b = profiling.fit(
                    lambda b, s=setup: pytorch_step(sized(b), s, torch_device), batch,
                    free=_free_torch_cache)
                runs.append((dict(framework="pytorch", dtype="bfloat16" if amp else "float32",
                                  setup=setup,
                                  threads=torch.get_num_threads() if torch_device == "cpu"
                                  else None), step, b))
        rounds: list[list[float]] = [[] for _ in runs]
        for _ in range(args.rounds):
            for i, (_, step, b) in enumerate(runs):
                rounds[i].append(rate(step, b, args.seconds / args.rounds))
        for (meta, _, b), rates in zip(runs, rounds):
            records.append(dict(model=label, batch=b, **meta,
                                images_per_s=round(statistics.median(rates), 2),
                                round_rates=[round(r, 2) for r in rates], model_kwargs=kwargs,
                                augment=False, **shared))
            print(json.dumps(records[-1]), flush=True)
        runs.clear()
        gc.collect()
        _free_torch_cache()
        common.merge_results(args.out, records, KEY)  # each model's records as soon as it ends

    print(f"\n{'model':<16}{'px':>5}{'batch':>6}  {'framework / setup':<34}{'img/s':>9}"
          f"{'pneumojax/this':>16}")
    for r in records:
        jax_rate = next((q["images_per_s"] for q in records if q["framework"] == "pneumojax"
                         and q["model"] == r["model"]), None)
        ratio = f"{jax_rate / r['images_per_s']:.2f}x" if jax_rate and r["framework"] == \
            "pytorch" else ""
        print(f"{r['model']:<16}{r['image_size']:>5}{r['batch']:>6}  "
              f"{r['framework'] + ' ' + r['setup'] + ' ' + r['dtype']:<34}"
              f"{r['images_per_s']:>9.1f}{ratio:>16}")


if __name__ == "__main__":
    main()
