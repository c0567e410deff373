"""experiments/reproduce.py end to end on a tiny Kaggle-layout folder: two models trained, the
ImageNet row skipped with its reason, `val` scored, `test` read once after training at the
frozen threshold (the published protocol), finished runs reused."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumojax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = ["data.image_size=32", "data.validation_fraction=0.25", "train.batch_size=8",
        "train.eval_batch_size=16", "train.epochs=1", "shallow_cnn:model.kwargs.width=4",
        "deep_cnn:model.kwargs.widths=(4, 4, 8, 8)"]


def _folder(root):
    """train (40 patients, 10 of them carved out as validation), val and test (8 each) of 32 px
    phantoms, Kermany file names."""
    rng = np.random.default_rng(0)
    for split, first, count in (("train", 0, 20), ("val", 100, 4), ("test", 200, 4)):
        for i in range(first, first + count):
            for cls, name in (("NORMAL", f"IM-{i:04d}-0001.png"),
                              ("PNEUMONIA", f"person{i}_bacteria_{i}.png")):
                image, _ = synthetic.phantom(rng, 32, cls == "PNEUMONIA")
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[..., 0]).save(root / split / cls / name)


def _reproduce(argv, env):
    """`python experiments/reproduce.py ARGV`, as a user runs it: (exit status, output)."""
    proc = subprocess.run([sys.executable, "experiments/reproduce.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _files(root):
    """Every file under `root` with its modification time: what a run would change."""
    return {str(f): f.stat().st_mtime_ns for f in root.rglob("*") if f.is_file()}


@pytest.mark.slow  # trains two models
def test_the_table_is_written_and_finished_runs_are_reused(tmp_path):
    _folder(tmp_path / "xray")
    env = dict(os.environ, PNEUMOJAX_CACHE=str(tmp_path / "cache"))  # no ImageNet weights
    argv = ["--source", f"folder:{tmp_path / 'xray'}", "--cpu",
            "--rows", "shallow_cnn,deep_cnn,resnet50_imagenet",
            "--workdir-root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--set", f"data.data_dir={tmp_path / 'tfds'}"] + [a for t in TINY for a in ("--set", t)]
    rc, output = _reproduce(argv, env)
    assert rc == 0, output

    table = json.loads((tmp_path / "out" / "table.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["shallow_cnn", "deep_cnn", "resnet50_imagenet"]
    for name in ("shallow_cnn", "deep_cnn"):
        r = rows[name]
        assert r["status"] == "ok" and not r["reused"] and r["wall_s"] > 0
        assert r["config"] == f"configs/{name}.py:cpu" and r["settings"]["data"]["image_size"] == 32
        assert r["validation"]["n"] == 10 and r["val"]["n"] == 8
        assert r["val"]["threshold"] == r["threshold"]  # val is scored at validation's threshold
        assert r["test"]["n"] == 8 and r["test"]["threshold"] == r["threshold"]
        # read once, after training ended: its evaluation is newer than every checkpoint
        runs = tmp_path / "runs" / f"{name}_cpu"
        tested = (runs / "eval" / "tfds-test.json").stat().st_mtime_ns
        assert all(f.stat().st_mtime_ns < tested for f in (runs / "checkpoints").rglob("*")
                   if f.is_file())
        for m in (r["validation"], r["val"]):
            lo, hi = m["ci95"]["accuracy"]
            assert lo <= m["accuracy"] <= hi
        assert r["device"] and r["date"] and r["commit"]
    skipped = rows["resnet50_imagenet"]
    assert skipped["status"] == "skipped"
    assert "python -m pneumojax.weights fetch resnet50 --source torchvision-v2" in skipped["reason"]
    assert [p["source"] for p in table["published"]] == [
        "seed 002", "seed 003", "seed 003", "Kermany et al. 2018", "MedMNIST v2", "MedMNIST v2"]
    assert table["published"][1]["figures"] == dict(accuracy=0.9071, precision=0.915,
                                                    recall=0.907, f1=0.904)

    md = (tmp_path / "out" / "table.md").read_text()
    accuracy = rows["deep_cnn"]["validation"]["accuracy"]
    assert f"{100 * accuracy:.1f} [" in md
    for text in ("Shallow CNN", "Deep CNN", "skipped: weights not cached",
                 "The same protocol on both sides", "ours, `test` split (n = 8)", "90.7",
                 "Cell 172(5):1122-1131", "Scientific Data 10:41"):
        assert text in md

    # Again: nothing trains (no file of the runs changes), the wall times of the first run stay.
    trained = _files(tmp_path / "runs")
    rc, output = _reproduce(argv, env)
    assert rc == 0, output
    assert _files(tmp_path / "runs") == trained
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    again = {r["name"]: r for r in table["rows"]}
    for name in ("shallow_cnn", "deep_cnn"):
        assert again[name]["reused"] and again[name]["wall_s"] == rows[name]["wall_s"]
        assert again[name]["val"]["accuracy"] == rows[name]["val"]["accuracy"]
    assert "(reused)" in (tmp_path / "out" / "table.md").read_text()

    # A finished workdir of another config is an error before anything runs, not a mixed run.
    rc, output = _reproduce(argv + ["--set", "train.epochs=2"], env)
    assert rc == 2 and "--retrain" in output, output
    assert _files(tmp_path / "runs") == trained
