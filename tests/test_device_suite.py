"""experiments/device_suite.py: the one GPU call, exercised on the CPU so it cannot rot; the
stages it runs within its budget (pneumojax.budget)."""

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

import pytest

from pneumojax import budget

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = {"tests", "prepare", "train_deep_cnn", "train_resnet50", "evaluate_deep_cnn",
          "evaluate_resnet50", "bench_train", "profile_step", "bench_input", "bench_gradcam"}


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_and_bundles_what_comes_back(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    # A budget well above the dry run's own 170 s: what is tested is that every stage runs and
    # what comes back, not this machine's speed while other tests share it (pytest -n 2).
    proc = subprocess.run(["bash", "experiments/device_suite.sh", "--dry-run", f"--out={out}",
                           "--budget=400"],
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
    assert set(stages) == STAGES
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
    probes = jax_rec["batch_search"]["probe_bytes"]  # the train step's, on this device
    assert probes["32"] > probes["16"] > 0
    assert {"convolution", "input", "batch_norm", "optimizer"} <= set(
        stages["profile_step"]["figures"][0]["by_category"])
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "experiments/results/bench_train.json" in tar.getnames()
    with tarfile.open(out / "deep_cnn_run.tar.gz") as tar:
        names = tar.getnames()
    best = str(stages["train_deep_cnn"]["figures"]["best_step"])
    assert "deep_cnn/summary.json" in names and "deep_cnn/eval/val.json" in names
    assert {n.split("/")[2] for n in names if n.startswith("deep_cnn/checkpoints/")} == {best}
    saved = {c.name for c in (tmp_path / ".out-work/runs/deep_cnn/checkpoints").iterdir()
             if c.name.isdigit()}
    assert best in saved and len(saved) > 1  # only the best of them travels
    # The same call again (a warm machine after a cut-short call) runs only what did not finish.
    again = subprocess.run(["bash", "experiments/device_suite.sh", "--dry-run", f"--out={out}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already done at " in again.stdout, again.stdout
    assert "start " not in again.stdout
    assert json.loads((out / "suite.json").read_text())["stages"] == stages
    # The dry run never writes into the repository's results.
    assert not any('"dry_run": true' in f.read_text()
                   for f in (ROOT / "experiments" / "results").glob("*.json"))


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
    py = lambda code: (lambda: [sys.executable, "-c", code])
    plan = [
        budget.Stage("fails", py("raise SystemExit(3)"), limit=60),
        budget.Stage("needs_failed", py("pass"), limit=60, after=("fails",)),
        budget.Stage("hangs", py("import time; time.sleep(60)"), limit=5),  # the least that starts
        budget.Stage("alone", py("print('timed')"), limit=60, exclusive=True),
        budget.Stage("done_before", py("raise SystemExit(1)"), limit=60, exclusive=True),
    ]
    done = {"done_before": {"status": "ok", "seconds": 1.0}}
    results = budget.schedule(plan, tmp_path, dict(os.environ), time.monotonic() + 120, done,
                              say=lambda m: None)
    assert results["fails"]["status"] == "failed" and results["fails"]["rc"] == 3
    assert results["needs_failed"]["status"] == "skipped"
    assert results["hangs"]["status"] == "timeout" and results["hangs"]["seconds"] < 30
    assert results["alone"]["status"] == "ok"
    assert (tmp_path / "alone.log").read_text().splitlines()[-1] == "timed"
    assert results["done_before"] == done["done_before"]  # not run again
    late = budget.run_stage(plan[3], tmp_path, dict(os.environ), time.monotonic() + 2)
    assert late["status"] == "skipped"  # too little of the budget left to start
