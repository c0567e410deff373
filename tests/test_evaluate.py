"""The evaluation CLI on a finished run: folders of unseen images at any size, and tfds splits."""

import csv
import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from pneumojax import cli, evaluate


def _folder(root, rng):
    """Kaggle layout of images at odd sizes and modes, and one broken file."""
    for i in range(5):
        for cls in ("NORMAL", "PNEUMONIA"):
            (root / cls).mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(40, 300)), int(rng.integers(40, 300)))
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert("RGB" if i % 2 else "L").save(
                root / cls / f"person{i}_virus_{i}.jpeg" if cls == "PNEUMONIA"
                else root / cls / f"IM-{i:04d}-0001.png")
    (root / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8 not really")


@pytest.mark.gpu
def test_a_folder_of_unseen_images_at_any_size(trained, tmp_path, capsys):
    _folder(tmp_path / "test", np.random.default_rng(0))
    out = tmp_path / "result.json"
    assert evaluate.main(["--workdir", str(trained), "--data", f"folder:{tmp_path / 'test'}",
                          "--out", str(out), "--n-boot", "100"]) == 0
    printed = capsys.readouterr().out
    assert "10 images" in printed and "1 rejected" in printed and "IM-9999-0001.jpeg" in printed
    result = json.loads(out.read_text())
    assert result["n"] == 10 and len(result["rejected"]) == 1
    summary = json.loads((trained / "summary.json").read_text())
    assert result["checkpoint"] == summary["best_step"]
    assert set(result["metrics"]) == {"0.5", "validation"}
    assert result["metrics"]["validation"]["threshold"] == summary["threshold"]
    for m in result["metrics"].values():
        assert sum(map(sum, m["confusion_matrix"])) == 10
        lo, hi = m["ci95"]["accuracy"]
        assert lo <= m["accuracy"] <= hi
    rows = list(csv.DictReader(out.with_suffix(".predictions.csv").open()))
    assert len(rows) == 10 and {r["patient"] for r in rows} >= {"person0", "IM-0000"}
    for name in ("roc", "confusion_0.5", "confusion_validation", "threshold_sweep"):
        assert (tmp_path / f"result_{name}.png").stat().st_size > 1000


@pytest.mark.gpu
def test_tfds_validation_reproduces_the_training_summary(trained):
    result = evaluate.evaluate(trained, "tfds:validation", n_boot=50)
    summary = json.loads((trained / "summary.json").read_text())
    ours, theirs = result["metrics"]["validation"], summary["validation"]["validation"]
    assert ours["confusion_matrix"] == theirs["confusion_matrix"]
    for key in ("accuracy", "roc_auc", "threshold"):
        assert ours[key] == pytest.approx(theirs[key])
    assert (trained / "eval" / "tfds-validation.json").exists()


def _error_line(capsys) -> str:
    """The one line a user's mistake prints (absl may log warnings beside it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{constant} in JSON")
    return json.loads(text, parse_constant=refuse)


def _steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_bad_arguments_are_one_line_and_status_2(trained, tmp_path, capsys):
    steps = ", ".join(map(str, _steps(trained)))
    assert cli.run(evaluate.main, ["--workdir", str(tmp_path), "--data", "tfds:validation"]) == 2
    assert "config.json" in _error_line(capsys)
    assert cli.run(evaluate.main, ["--workdir", str(trained), "--data", "s3:bucket"]) == 2
    assert "folder:PATH or tfds:SPLIT" in _error_line(capsys)
    for wrong in ("999999", "nosuch", "-1"):
        assert cli.run(evaluate.main, ["--workdir", str(trained), "--data", "tfds:validation",
                                       "--checkpoint", wrong]) == 2
        line = _error_line(capsys)
        assert f"--checkpoint {wrong!r}" in line
        assert f"best, latest or a saved step: {steps}" in line


def test_a_workdir_without_a_run_is_one_line(trained, tmp_path, capsys):
    def fails(workdir: pathlib.Path) -> str:
        args = ["--workdir", str(workdir), "--data", "tfds:validation"]
        assert cli.run(evaluate.main, args) == 2
        return _error_line(capsys)
    assert "no such folder" in fails(tmp_path / "nosuch")
    assert "not a training run (no config.json)" in fails(tmp_path)
    shutil.copy(trained / "config.json", tmp_path)
    assert "no checkpoints" in fails(tmp_path)
    (tmp_path / "config.json").write_text('{"model": ')
    assert f"{tmp_path / 'config.json'}: unreadable (JSONDecodeError" in fails(tmp_path)


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: pathlib.Path) -> None:
    path.write_bytes(b"\0garbage" * max(1, path.stat().st_size // 8))


@pytest.mark.parametrize("which, item, damage", [
    ("best", "meta/metadata", _truncate),  # `best` reads every step's metadata
    ("latest", "state/manifest.ocdbt", _garble),
    ("latest", "state/_METADATA", _truncate),
    ("latest", "", shutil.rmtree),  # a step folder left empty
])
def test_a_damaged_checkpoint_names_its_step(trained, tmp_path, capsys, which, item, damage):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    step = _steps(workdir)[-1]
    folder = workdir / "checkpoints" / str(step)
    damage(folder / item)
    folder.mkdir(exist_ok=True)
    args = ["--workdir", str(workdir), "--data", "tfds:validation", "--checkpoint", which]
    assert cli.run(evaluate.main, args) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {folder}: checkpoint unreadable, corrupt or incomplete")
    assert "choose another with --checkpoint (saved steps:" in line


@pytest.mark.parametrize("present, undefined", [
    ("NORMAL", {"recall", "sensitivity", "roc_auc", "pr_auc"}),
    ("PNEUMONIA", {"specificity", "roc_auc", "pr_auc"}),
])
def test_a_folder_of_one_class_reports_what_is_defined(trained, tmp_path, capsys, present,
                                                       undefined):
    rng = np.random.default_rng(0)
    (tmp_path / "test" / present).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 80), dtype=np.uint8)).save(
            tmp_path / "test" / present / f"person{i}_virus_{i}.png")
    out = tmp_path / "one.json"
    assert cli.run(evaluate.main, ["--workdir", str(trained), "--data",
                                   f"folder:{tmp_path / 'test'}", "--out", str(out),
                                   "--n-boot", "20"]) == 0
    printed = capsys.readouterr().out
    assert "roc_auc     n/a (ranking needs both classes" in printed
    result = _strict_json(out.read_text())
    for m in result["metrics"].values():
        assert undefined <= set(m["undefined"]) and "both classes" in m["undefined"]["roc_auc"]
        assert all(m[k] is None and m["ci95"][k] is None for k in m["undefined"])
        assert 0 <= m["accuracy"] <= 1


def test_an_empty_or_unreadable_folder_is_one_line(trained, tmp_path, capsys):
    folder = tmp_path / "test"
    (folder / "NORMAL").mkdir(parents=True)
    assert cli.run(evaluate.main, ["--workdir", str(trained), "--data", f"folder:{folder}"]) == 2
    assert "no images found" in _error_line(capsys)
    (folder / "NORMAL" / "IM-0001-0001.jpeg").write_bytes(b"\xff\xd8 not really")
    assert cli.run(evaluate.main, ["--workdir", str(trained), "--data", f"folder:{folder}"]) == 2
    assert "none of its 1 file(s) is a usable image" in _error_line(capsys)
