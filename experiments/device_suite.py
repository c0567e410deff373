r"""One prepared call on a lent GPU machine measures every GPU figure.

    bash experiments/device_suite.sh                              # on the GPU machine ($OUT set)
    bash experiments/device_suite.sh --dry-run --out /tmp/suite   # here, on a CPU, tiny sizes

`bash experiments/device_prepare.sh PATH/chest_xray` builds, here, what the call carries (.whl/
and .gpudata/); device_suite.sh installs those wheels and runs this file. docs/gpu.md gives
the exact call.

The first line it prints says what is missing (a package, the accelerator, the carried data),
and if anything is, the suite stops there. Otherwise, within `--budget` seconds:

1. Together, since none of them is a timing: the GPU tests (`pytest -m gpu`: sharded train step,
   resume, evaluation, Grad-CAM, the device-resident path); the real X-rays prepared at 224 px,
   then the deep CNN and ResNet50 trained on them from scratch (device-resident data, early
   stopping within a fixed number of epochs), each best checkpoint then evaluated on the 16
   `val` films.
2. One at a time, alone on the device: bench_train.py (ResNet50 and the deep CNN at 224 px in
   bf16 at the largest batch that fits, against PyTorch AMP + channels_last, eager and
   compiled), profile_step.py (the ResNet50 bf16 step as training runs it, augmentation
   included), bench_input.py and bench_gradcam.py.

Each stage is its own process with a deadline and a log (`pneumojax.budget` runs them); one
that fails or runs out of time is recorded so and the rest go on. Stages that finished are
remembered in `--state` (.device_state/, git-ignored, kept while the machine stays warm), so
the same command run again at once skips them, and reuses the compilation cache kept there.

Written to `--out` (the device returns at most 8 files):
- suite.json: each stage's status, seconds and figures, the device and the versions;
- results.tar.gz: experiments/results/*.json as the benches left them; extract it at the
  repository root to take the new records;
- deep_cnn_run.tar.gz: the deep CNN's workdir (best checkpoint, summary.json, metrics.jsonl,
  plots, the `val` evaluation);
- logs.tar.gz: every stage's log, the tests' JUnit XML, ResNet50's workdir less its checkpoints.

`--dry-run` runs every stage on the CPU, at tiny sizes, on a folder of phantoms it writes in the
Kaggle layout, in under 3 minutes (tests/test_device_suite.py runs it in CI), so that the suite
cannot rot between GPU days. Its tests stage only collects the GPU tests, which CI runs anyway;
its PyTorch runs are eager, since CPUs get no compiled setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import re
import shutil
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script

# The standard library only, so it imports before the preflight can say what is missing.
from pneumojax.budget import Stage, schedule

PY = sys.executable
# Importable here or the suite stops: the GPU image's own packages and the carried wheels'.
PACKAGES = ("jax", "flax", "optax", "orbax.checkpoint", "numpy", "matplotlib", "torch", "PIL",
            "scipy", "pytest", "grain", "tensorflow_datasets", "ml_collections", "array_record",
            "pydicom")
RESULT_FILES = ("bench_train.json", "profile_step.json", "bench_input.json",
                "bench_gradcam.json", "device_suite.json")


@dataclasses.dataclass
class Paths:
    work: pathlib.Path      # scratch: data sets, runs, logs
    out: pathlib.Path       # what comes back
    state: pathlib.Path     # finished stages and the compilation cache, across reruns
    data: pathlib.Path      # the Kaggle-layout folder: train/, val/
    results: pathlib.Path   # where the benches merge their records

    @property
    def tfds(self) -> pathlib.Path:
        return self.work / "tfds"

    @property
    def runs(self) -> pathlib.Path:
        return self.work / "runs"

    @property
    def logs(self) -> pathlib.Path:
        return self.work / "logs"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the stages run at: the real suite's, or the dry run's."""

    image_size: int
    epochs: tuple[float, float]         # deep CNN, ResNet50
    train_overrides: tuple[str, ...]    # to both runs
    bench_models: str
    max_batch: int
    seconds: float                      # per framework and setup in bench_train
    rounds: int
    input_seconds: float                # per measurement in bench_input
    profile_model: str
    profile_steps: int
    input_batch: int
    gradcam_models: str
    gradcam_batch: int
    gradcam_seconds: float


REAL = Sizes(image_size=224, epochs=(30.0, 20.0),
             train_overrides=("--config.data.device_resident=True",),
             bench_models="resnet50,deep_cnn", max_batch=4096, seconds=6.0, rounds=3,
             input_seconds=3.0,
             profile_model="resnet50", profile_steps=5, input_batch=256,
             gradcam_models="deep_cnn,resnet50", gradcam_batch=64, gradcam_seconds=2.0)
DRY = Sizes(image_size=32, epochs=(1.0, 1.0),
            train_overrides=("--config.data.device_resident=True", "--config.train.batch_size=8",
                             "--config.train.eval_batch_size=16", "--config.train.log_every=1",
                             # two checkpoints, as a real run has many: only the best travels
                             "--config.train.eval_every=3"),
            bench_models="deep_cnn:cpu", max_batch=16, seconds=0.3, rounds=1,
            input_seconds=0.2,
            profile_model="deep_cnn:cpu", profile_steps=1, input_batch=8,
            gradcam_models="deep_cnn:cpu", gradcam_batch=4, gradcam_seconds=0.1)


def stages(p: Paths, s: Sizes, dry: bool) -> list[Stage]:
    """The suite's stages, in the order they start."""
    source = f"folder:{p.data}"
    # The prepare stage's split settings, pinned: a run asking for others would rebuild the
    # data set under the feet of the runs beside it.
    data = [f"--config.data.source={source}", f"--config.data.data_dir={p.tfds}",
            f"--config.data.image_size={s.image_size}", "--config.data.validation_fraction=0.1",
            "--config.train.seed=0"]
    tests = [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
             f"--junitxml={p.logs / 'tests.xml'}"] + (["--collect-only"] if dry else [])

    def train(name: str, config: str, epochs: float, extra: tuple[str, ...] = ()) -> Stage:
        return Stage(f"train_{name}", lambda: [
            PY, "-m", "pneumojax.main", f"--config={config}", f"--workdir={p.runs / name}",
            *data, f"--config.train.epochs={epochs}", *s.train_overrides, *extra],
            limit=240, after=("prepare",))

    def evaluate(name: str) -> Stage:
        return Stage(f"evaluate_{name}", lambda: [
            PY, "-m", "pneumojax.evaluate", f"--workdir={p.runs / name}",
            f"--data=folder:{p.data / 'val'}", f"--out={p.runs / name / 'eval' / 'val.json'}"],
            limit=60, after=(f"train_{name}",))

    def bench(script: str, *args: str, limit: float, env: dict | None = None) -> Stage:
        return Stage(script, lambda: [PY, str(ROOT / "experiments" / f"{script}.py"), *args,
                                      f"--out={p.results / f'{script}.json'}"],
                     limit=limit, exclusive=True, env=env or {})

    def profile() -> list[str]:
        batch = found_batch(p.results / "bench_train.json", s.profile_model) or s.max_batch
        return [PY, str(ROOT / "experiments" / "profile_step.py"), f"--model={s.profile_model}",
                f"--image-size={s.image_size}", f"--batch={batch}", "--dtype=bfloat16",
                "--augment", f"--steps={s.profile_steps}",
                f"--out={p.results / 'profile_step.json'}"]

    deep_cnn = "configs/deep_cnn.py" + (":cpu" if dry else "")
    resnet50 = "configs/resnet50.py:" + ("demo" if dry else "scratch")
    return [
        # The tests check float32 numerics as on a CPU, so no TF32 in their convolutions.
        Stage("tests", lambda: tests, limit=240, env={"JAX_DEFAULT_MATMUL_PRECISION": "highest"}),
        Stage("prepare", lambda: [PY, "-m", "pneumojax.data", "prepare", f"--source={source}",
                                  f"--image-size={s.image_size}", f"--data-dir={p.tfds}"],
              limit=150, env={"JAX_PLATFORMS": "cpu"}),
        train("deep_cnn", deep_cnn, s.epochs[0]),
        train("resnet50", resnet50, s.epochs[1], ("--config.model.dtype=bfloat16",)),
        evaluate("deep_cnn"),
        evaluate("resnet50"),
        bench("bench_train", f"--models={s.bench_models}", f"--image-size={s.image_size}",
              "--batch=auto", f"--max-batch={s.max_batch}", "--dtype=bfloat16",
              f"--seconds={s.seconds}", f"--rounds={s.rounds}", limit=330,
              env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.45"}),
        Stage("profile_step", profile, limit=120, exclusive=True),
        bench("bench_input", f"--source={source}", f"--data-dir={p.tfds}",
              f"--image-size={s.image_size}", f"--batch={s.input_batch}",
              f"--seconds={s.input_seconds}", limit=90),
        bench("bench_gradcam", f"--models={s.gradcam_models}", f"--image-size={s.image_size}",
              f"--batch={s.gradcam_batch}", f"--seconds={s.gradcam_seconds}", limit=150),
    ]


def found_batch(results: pathlib.Path, model: str) -> int | None:
    """The batch bench_train last ran pneumojax's `model` at on this device."""
    from experiments import common

    device = common.device_name()
    records = json.loads(results.read_text()) if results.exists() else []
    batches = [r["batch"] for r in records if r.get("model") == model
               and r.get("framework") == "pneumojax" and r.get("device") == device]
    return batches[-1] if batches else None


def preflight(p: Paths, dry: bool) -> tuple[list[str], dict]:
    """(what is missing, what is there): the suite's first line is made of these."""
    missing, found = [], {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", "?")
        except Exception as e:  # ImportError, or a package that fails while importing
            missing.append(f"{name} ({type(e).__name__}: {e})".replace("\n", " "))
    if "jax" in found:
        import jax
        found["backend"] = jax.default_backend()
        if not dry and found["backend"] == "cpu":
            missing.append("an accelerator (JAX sees only the CPU)")
    if "torch" in found:
        import torch
        found["torch_cuda"] = torch.cuda.is_available()
        if not dry and not found["torch_cuda"]:
            missing.append("CUDA for PyTorch")
    manifest = p.data.parent / "MANIFEST.json"  # written by device_prepare.sh
    if not dry:
        have = {f"{s.name}/{c.name}": sum(1 for f in c.iterdir() if f.is_file())
                for s in sorted(p.data.glob("*")) if s.is_dir()
                for c in sorted(s.iterdir()) if c.is_dir()}
        want = json.loads(manifest.read_text())["chest_xray"] if manifest.exists() else None
        if want is not None and have != want:
            missing.append(f"part of the carried data ({p.data} holds {have or 'nothing'}, "
                           f"{manifest} lists {want})")
        elif not any(have.get(f"train/{c}") for c in ("NORMAL", "PNEUMONIA")):
            missing.append(f"the X-rays ({p.data}/train/NORMAL and PNEUMONIA are empty or "
                           "absent): run `bash experiments/device_prepare.sh PATH/chest_xray` "
                           "and carry .gpudata, or pass --data PATH/chest_xray")
        found["data_files"] = sum(have.values())
    return missing, found


def figures(results: dict, p: Paths, since: str, device: str) -> None:
    """Adds to each stage that ran now what it measured, read from the files it wrote; a stage
    finished by an earlier call keeps the figures it had then."""
    def put(stage: str, value) -> None:
        if stage in results and "figures" not in results[stage]:
            results[stage]["figures"] = value

    if (xml := p.logs / "tests.xml").exists():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in
                            suite.iter("testcase")
                            if c.find("failure") is not None or c.find("error") is not None]
        if m := re.search(r"(\d+)(?:/\d+)? tests? collected", (p.logs / "tests.log").read_text()):
            counts["collected"] = int(m.group(1))  # --collect-only
        put("tests", counts)
    for name in ("deep_cnn", "resnet50"):
        run = p.runs / name
        if (summary := run / "summary.json").exists():
            put(f"train_{name}", json.loads(summary.read_text()))
        if (val := run / "eval" / "val.json").exists():
            put(f"evaluate_{name}", json.loads(val.read_text()))
    for script in ("bench_train", "profile_step", "bench_input", "bench_gradcam"):
        if (path := p.results / f"{script}.json").exists():
            put(script, [r for r in json.loads(path.read_text())
                         if r.get("device") == device and str(r.get("date", "")) >= since])


def report(stages: dict) -> list[str]:
    """A few lines of the headline figures, printed last: the device tool returns the end of
    the output, and the rest is in suite.json."""
    lines = []
    if t := stages["tests"].get("figures"):
        lines.append(f"tests: {t['tests'] - t['failures'] - t['errors'] - t['skipped']} passed, "
                     f"{t['failures'] + t['errors']} failed, {t['skipped']} skipped"
                     + (f", {t['collected']} collected" if "collected" in t else "")
                     + "".join(f"\n  failed {f}" for f in t["failed"]))
    for name in ("deep_cnn", "resnet50"):
        if summary := stages[f"train_{name}"].get("figures"):
            v = summary["validation"]["validation"]
            line = (f"{name}: validation accuracy {v['accuracy']:.3f}, AUC {v['roc_auc']:.3f} "
                    f"(best step {summary['best_step']}, {summary.get('images_per_s', 0):.0f} "
                    f"img/s)")
            if val := stages[f"evaluate_{name}"].get("figures"):
                m = val["metrics"]["validation"]
                line += f"; val films accuracy {m['accuracy']:.3f}, AUC {m['roc_auc']:.3f}"
            lines.append(line)
    records = stages["bench_train"].get("figures") or []
    for r in records:
        ours = next((q for q in records if q["model"] == r["model"]
                     and q["framework"] == "pneumojax"), None)
        ratio = (f" (pneumojax {ours['images_per_s'] / r['images_per_s']:.2f}x)"
                 if ours and r is not ours else "")
        lines.append(f"bench_train {r['model']} {r['image_size']} px batch {r['batch']}: "
                     f"{r['framework']} {r['setup']} {r['images_per_s']:.0f} img/s{ratio}")
    for r in stages["profile_step"].get("figures") or []:
        total = max(r["events_ms"], 1e-9)
        lines.append(f"profile {r['model']} batch {r['batch']}: step {r['step_ms']} ms; " +
                     ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in r["by_category"].items()))
    for r in stages["bench_input"].get("figures") or []:
        lines.append(f"bench_input {r['path']} workers {r['workers']} augment {r['augment']}: "
                     f"{r['images_per_s']:.0f} img/s")
    for r in stages["bench_gradcam"].get("figures") or []:
        lines.append(f"bench_gradcam {r['model']} {r['method']} {r['mode']}: "
                     f"{r['maps_per_s']:.0f} maps/s, {r['ratio_to_fwd_bwd']:.2f}x fwd+bwd")
    return lines


def bundle(p: Paths, record: dict) -> list[pathlib.Path]:
    """The files that come back: at most 8 (the device tool's limit)."""
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / "suite.json").write_text(json.dumps(record, indent=1) + "\n")
    made = [p.out / "suite.json"]
    with tarfile.open(p.out / "results.tar.gz", "w:gz") as tar:
        for name in RESULT_FILES:
            if (p.results / name).exists():
                tar.add(p.results / name, arcname=f"experiments/results/{name}")
    made.append(p.out / "results.tar.gz")
    run = p.runs / "deep_cnn"
    if run.exists():
        best = _best_step(run)
        with tarfile.open(p.out / "deep_cnn_run.tar.gz", "w:gz") as tar:
            tar.add(run, arcname="deep_cnn", filter=lambda t: _keep_checkpoint(t, best))
        made.append(p.out / "deep_cnn_run.tar.gz")
    with tarfile.open(p.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(p.logs, arcname="logs")
        if (p.runs / "resnet50").exists():
            tar.add(p.runs / "resnet50", arcname="resnet50",
                    filter=lambda t: None if "/checkpoints" in t.name else t)
    made.append(p.out / "logs.tar.gz")
    return made


def _best_step(run: pathlib.Path) -> str | None:
    try:
        return str(json.loads((run / "summary.json").read_text())["best_step"])
    except (OSError, KeyError, ValueError):
        return None


def _keep_checkpoint(info: tarfile.TarInfo, best: str | None) -> tarfile.TarInfo | None:
    """Of the checkpoints, only the best step's (the one summary.json reports) travels."""
    parts = pathlib.PurePath(info.name).parts
    if len(parts) >= 3 and parts[1] == "checkpoints" and parts[2].isdigit():
        return info if parts[2] == best else None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(os.environ.get("OUT", "workdirs/device_suite")))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, every stage")
    parser.add_argument("--budget", type=float, help="seconds in all (default 480; dry 170)")
    parser.add_argument("--state", type=pathlib.Path, default=ROOT / ".device_state",
                        help="finished stages and the compilation cache, kept for a rerun")
    parser.add_argument("--fresh", action="store_true", help="run every stage again")
    parser.add_argument("--data", type=pathlib.Path, default=ROOT / ".gpudata" / "chest_xray",
                        help="the carried X-rays, MANIFEST.json beside them (not in --dry-run)")
    args = parser.parse_args(argv)
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    budget = args.budget or (170.0 if args.dry_run else 480.0)
    out = args.out.resolve()
    work = out.parent / f".{out.name}-work" if args.dry_run else args.state / "work"
    state = work / "state" if args.dry_run else args.state
    p = Paths(work=work, out=out, state=state,
              data=work / "phantoms" if args.dry_run else args.data.resolve(),
              results=work / "results" if args.dry_run else ROOT / "experiments" / "results")
    # Before JAX starts: the suite's processes share the device, and reruns reuse compilations.
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=str(state / "jax_cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process's own JAX too

    missing, found = preflight(p, args.dry_run)
    if missing:
        print(f"device suite: missing {'; '.join(missing)}. Stopping.", flush=True)
        return 2
    from experiments import common

    device = common.device_name()
    print(f"device suite: ready on {device} ({found['backend']}); " + ", ".join(
        f"{k} {v}" for k, v in found.items() if k not in ("backend",)) +
        f"; budget {budget:.0f} s" + (f"; {note}" if (note := os.environ.get(
            "DEVICE_SUITE_NOTE")) else ""), flush=True)
    if args.fresh:
        shutil.rmtree(state, ignore_errors=True)
    for d in (p.logs, p.runs, p.results, state):
        d.mkdir(parents=True, exist_ok=True)
    if args.dry_run and not (p.data / "train").exists():
        from pneumojax.data import synthetic

        synthetic.write_folder(p.data, {"train": 48, "val": 8})
    done_file = state / "done.json"
    commit = common.commit()
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    done = {k: v for k, v in done.get(commit, {}).items() if v["status"] == "ok"}
    if done:
        print(f"already done at {commit}, not run again: {', '.join(done)}", flush=True)

    say = lambda m: print(f"[{time.monotonic() - t0:5.0f} s] {m}", flush=True)
    results = schedule(stages(p, DRY if args.dry_run else REAL, args.dry_run), p.logs, env,
                       t0 + budget - 15, done, say, cwd=ROOT)
    figures(results, p, started, device)
    done_file.write_text(json.dumps({commit: results}, indent=1))
    record = dict(device=device, dry_run=args.dry_run, commit=commit, date=started,
                  seconds=round(time.monotonic() - t0, 1), budget=budget, versions=found,
                  stages=results)
    common.merge_results(p.results / "device_suite.json", [record], ("device", "dry_run"))
    made = bundle(p, record)
    print("\n".join(["", *report(results)]), flush=True)
    failed = [k for k, v in results.items() if v["status"] != "ok"]
    print(f"device suite: {len(results) - len(failed)} of {len(results)} stages ok"
          + (f"; not ok: {', '.join(failed)}" if failed else "")
          + f"; {time.monotonic() - t0:.0f} s; wrote " + ", ".join(m.name for m in made),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
