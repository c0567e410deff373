"""experiments/device_suite.py: the one GPU call, exercised on the CPU so it cannot rot."""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import bench_train, device_suite, profile_step


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_and_bundles_what_comes_back(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "experiments/device_suite.sh", "--dry-run", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device suite: ready on "), proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-1].startswith("device suite: 10 of 10 stages ok")
    assert any(x.startswith("bench_train deep_cnn:cpu 32 px batch 16: pytorch") for x in lines)
    # What the device tool brings back: at most 8 files, no deeper than two folders.
    files = [f for f in out.rglob("*") if f.is_file()]
    assert sorted(f.name for f in files) == [
        "deep_cnn_run.tar.gz", "logs.tar.gz", "results.tar.gz", "suite.json"]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["dry_run"] and suite["seconds"] < suite["budget"]
    stages = suite["stages"]
    assert [s for s, r in stages.items() if r["status"] != "ok"] == []
    assert set(stages) == {s.name for s in device_suite.stages(
        device_suite.Paths(*[tmp_path] * 5), device_suite.DRY, True)}
    assert stages["tests"]["figures"]["collected"] >= 10  # the gpu-marked tests
    for name in ("deep_cnn", "resnet50"):
        assert stages[f"train_{name}"]["figures"]["validation"]
        assert stages[f"evaluate_{name}"]["figures"]["n"] == 8  # the phantom val films
    # Every timing stage recorded figures with the device that made them.
    for script in ("bench_train", "profile_step", "bench_input", "bench_gradcam"):
        records = stages[script]["figures"]
        assert records and all(r["device"] == suite["device"] for r in records), script
    jax_rec, torch_rec = stages["bench_train"]["figures"]
    assert jax_rec["batch_search"]["batch"] == jax_rec["batch"] == torch_rec["batch"] == 16
    assert {"convolution", "input", "batch_norm", "optimizer"} <= set(
        stages["profile_step"]["figures"][0]["by_category"])
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "experiments/results/bench_train.json" in tar.getnames()
    with tarfile.open(out / "deep_cnn_run.tar.gz") as tar:
        names = tar.getnames()
    best = str(stages["train_deep_cnn"]["figures"]["best_step"])
    assert "deep_cnn/summary.json" in names and "deep_cnn/eval/val.json" in names
    assert {n.split("/")[2] for n in names if n.startswith("deep_cnn/checkpoints/")} == {best}
    # The same call again (a warm machine after a cut-short call) runs only what did not finish.
    again = subprocess.run(["bash", "experiments/device_suite.sh", "--dry-run", f"--out={out}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already done at " in again.stdout, again.stdout
    assert "start " not in again.stdout
    assert json.loads((out / "suite.json").read_text())["stages"] == stages
    # The dry run never writes into the repository's results.
    assert not any("dry_run\": true" in (ROOT / "experiments" / "results" / f).read_text()
                   for f in device_suite.RESULT_FILES
                   if (ROOT / "experiments" / "results" / f).exists())


def test_without_an_accelerator_or_data_the_first_line_says_so_and_it_stops(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "experiments/device_suite.py", f"--out={tmp_path / 'out'}",
         f"--state={tmp_path / 'state'}", f"--data={tmp_path / 'none'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    first = proc.stdout.splitlines()[0]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert first.startswith("device suite: missing ") and first.endswith("Stopping.")
    assert "an accelerator" in first and "device_prepare.sh" in first
    assert not (tmp_path / "out").exists()


def test_a_stage_that_fails_or_overruns_is_recorded_and_the_rest_go_on(tmp_path):
    paths = device_suite.Paths(work=tmp_path, out=tmp_path / "out", state=tmp_path,
                               data=tmp_path, results=tmp_path)
    paths.logs.mkdir()
    py = lambda code: (lambda: [sys.executable, "-c", code])
    plan = [
        device_suite.Stage("fails", py("raise SystemExit(3)"), limit=60),
        device_suite.Stage("needs_failed", py("pass"), limit=60, after=("fails",)),
        device_suite.Stage("hangs", py("import time; time.sleep(60)"), limit=6),
        device_suite.Stage("alone", py("print('timed')"), limit=60, exclusive=True),
        device_suite.Stage("done_before", py("raise SystemExit(1)"), limit=60, exclusive=True),
    ]
    import time
    done = {"done_before": {"status": "ok", "seconds": 1.0}}
    results = device_suite.schedule(plan, paths, dict(os.environ), time.monotonic() + 120, done,
                                    say=lambda m: None)
    assert results["fails"]["status"] == "failed" and results["fails"]["rc"] == 3
    assert results["needs_failed"]["status"] == "skipped"
    assert results["hangs"]["status"] == "timeout" and results["hangs"]["seconds"] < 30
    assert results["alone"]["status"] == "ok"
    assert (paths.logs / "alone.log").read_text().splitlines()[-1] == "timed"
    assert results["done_before"] == done["done_before"]  # not run again
    late = device_suite.run_stage(plan[3], paths, dict(os.environ), time.monotonic() + 2)
    assert late["status"] == "skipped"  # too little of the budget left to start


def test_the_largest_batch_is_the_line_through_two_probes_confirmed_by_running(monkeypatch):
    c = bench_train.model_config("shallow_cnn", image_size=32, batch=1)
    fixed, per_image = 1000, 100
    monkeypatch.setattr(bench_train, "step_bytes",
                        lambda c: fixed + per_image * c.train.batch_size)
    monkeypatch.setattr(bench_train, "memory_limit", lambda: 10_000)
    found = bench_train.largest_batch(c, cap=4096)
    assert found["predicted"] == (9000 - fixed) // per_image == 80
    assert found["batch"] == 80 and found["bytes_per_image"] == per_image
    assert bench_train.largest_batch(c, cap=64)["batch"] == 64
    tried = []

    def make(batch):
        tried.append(batch)
        if batch > 20:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes")
        return lambda: None

    assert bench_train.fit(make, 80)[1] == 20 and tried == [80, 40, 20]
    with pytest.raises(ValueError):  # anything but running out of memory is not swallowed
        bench_train.fit(lambda b: (_ for _ in ()).throw(ValueError("shape")), 8)


def test_step_bytes_grows_with_the_batch_on_this_device():
    c = bench_train.model_config("shallow_cnn", image_size=32, batch=4,
                                 model_kwargs=dict(width=4))
    small = bench_train.step_bytes(c)
    c.train.batch_size = 16
    assert bench_train.step_bytes(c) > small > 0


HLO = """HloModule jit_step

%fused_conv (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %convolution.1 = f32[2]{0} convolution(%p,%p), metadata={op_name="jvp(conv_general_dilated)"}
}

%fused_norm (p.1: f32[2]) -> f32[1] {
  %p.1 = f32[2]{0} parameter(0)
  ROOT %reduce.2 = f32[1]{0} reduce(%p.1), metadata={op_name="transpose(jvp(batch_norm))/add"}
}

ENTRY %main (a: f32[2]) -> f32[1] {
  %a = f32[2]{0} parameter(0)
  %input_fusion = f32[2]{0} fusion(%a), calls=%f, metadata={op_name="jit(augment_batch)/convert"}
  %conv_fusion.3 = f32[2]{0} fusion(%input_fusion), kind=kCustom, calls=%fused_conv
  %copy.4 = f32[2]{0} copy(%conv_fusion.3)
  %adam_fusion = f32[2]{0} fusion(%a), kind=kLoop, calls=%f, metadata={op_name="optimizer/mul"}
  %relu_fusion = f32[2]{0} fusion(%copy.4), kind=kLoop, calls=%f, metadata={op_name="max"}
  ROOT %norm_fusion = f32[1]{0} fusion(%relu_fusion), kind=kInput, calls=%fused_norm
}
"""


def test_kernels_are_sorted_by_the_name_stack_of_what_they_fuse():
    categories = profile_step.hlo_categories(HLO)
    assert categories["convolution.1"] == "convolution"  # inside a fusion too
    assert {k: v for k, v in categories.items() if "_" in k or k.startswith("copy")} == {
        "input_fusion": "input", "conv_fusion.3": "convolution", "copy.4": "layout",
        "adam_fusion": "optimizer", "relu_fusion": "elementwise", "norm_fusion": "batch_norm"}


def test_only_the_best_checkpoint_travels():
    import tarfile as tf
    keep = lambda name: device_suite._keep_checkpoint(tf.TarInfo(name), "40") is not None
    assert keep("deep_cnn/checkpoints/40/state/x") and keep("deep_cnn/summary.json")
    assert keep("deep_cnn/checkpoints") and not keep("deep_cnn/checkpoints/20/state/x")
