"""Tests for pneumojax.plots: each figure is a readable PNG of the intended size."""

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from pneumojax import metrics, plots

# A layout that does not fit, or a 0/0 in a share, shows up as a warning: treat it as a failure.
pytestmark = pytest.mark.filterwarnings("error")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _split(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    logits = rng.normal(0, 1, n) + separation * (2 * labels - 1)
    return labels, 1 / (1 + np.exp(-logits))


def _records(steps: int = 1000, every: int = 50, validate: bool = True) -> list[dict]:
    records = []
    for step in range(0, steps + 1, every):
        records.append({"step": step, "split": "train", "loss": 0.7 * np.exp(-step / 300) + 0.1,
                        "accuracy": 0.9 - 0.4 * np.exp(-step / 300),
                        "learning_rate": 1e-3 * min(1.0, step / 100)})
        if validate and step % 200 == 0:
            records.append({"step": step, "split": "validation",
                            "loss": 0.5 * np.exp(-step / 400) + 0.2,
                            "roc_auc": 0.95 - 0.3 * np.exp(-step / 300), "accuracy": 0.85})
    return records


def _check_png(path: Path, width: int, height: int) -> None:
    """A PNG by signature that matplotlib reads back at width x height pixels."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0  # Something was drawn.


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"validation": _split(400, 1.5, 0), "test": _split(624, 1.0, 1)}


def test_learning_curves(tmp_path):
    path = plots.learning_curves(_records(), tmp_path / "nested" / "curves.png")
    assert path == tmp_path / "nested" / "curves.png"
    _check_png(path, 1920, 432)  # Four 4 x 3.6 in panels at 120 dpi, learning rate included.


@pytest.mark.parametrize("records, width", [
    (_records(validate=False), 1920),  # No validation yet: the ROC AUC panel says so.
    ([{"step": 0, "split": "train", "loss": 0.7}, {"step": 9, "split": "train", "loss": None}],
     1440),
    ([{"step": 5, "split": "validation", "roc_auc": 0.8}, {"note": "no step or split"}], 1440),
    ([], 1440),
])
def test_learning_curves_missing_keys(tmp_path, records, width):
    _check_png(plots.learning_curves(records, tmp_path / "curves.png"), width, 432)


def test_roc(tmp_path, splits):
    _check_png(plots.roc(splits, tmp_path / "roc.png"), 660, 660)


def test_precision_recall(tmp_path, splits):
    _check_png(plots.precision_recall(splits, tmp_path / "pr.png"), 660, 660)


@pytest.mark.parametrize("plot", [plots.roc, plots.precision_recall])
def test_curves_survive_a_single_class_split(tmp_path, plot):
    # A tiny split may lack a class: it gets a legend entry, not an exception.
    curves = {"validation": _split(50, 1.5, 0),
              "positives only": (np.ones(10, int), np.linspace(0, 1, 10))}
    _check_png(plot(curves, tmp_path / "curves.png"), 660, 660)


def test_confusion_matrix(tmp_path, splits):
    labels, probs = splits["test"]
    cm = metrics.confusion(labels, probs, 0.5)
    _check_png(plots.confusion_matrix(cm, tmp_path / "cm.png", title="test at 0.5"), 576, 504)
    # A class with no examples gives an empty row, not a division warning.
    _check_png(plots.confusion_matrix([[0, 0], [3, 9]], tmp_path / "cm_empty.png"), 576, 504)


def test_threshold_sweep(tmp_path, splits):
    labels, probs = splits["validation"]
    marked = {"0.5": 0.5, "Youden": metrics.choose_threshold(labels, probs),
              "sensitivity 95%": metrics.choose_threshold(labels, probs, "sensitivity:0.95")}
    path = plots.threshold_sweep(labels, probs, tmp_path / "sweep.png", marked=marked)
    _check_png(path, 1020, 540)
    _check_png(plots.threshold_sweep(labels, probs, tmp_path / "plain.png"), 1020, 540)


def test_image_grid_with_overlays_and_titles(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64, 1), dtype=np.uint8)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    overlays = np.stack([np.exp(-((xx - 0.3) ** 2 + (yy - 0.1 * i) ** 2) / 0.02) for i in range(5)])
    path = plots.image_grid(images, tmp_path / "grid.png", overlays=overlays, ncols=3,
                            titles=[f"p = {p:.2f}" for p in rng.uniform(size=5)])
    _check_png(path, 708, 480)  # 3 x 1.7 in + 0.8 in colour bar; 2 rows of 1.7 + 0.3 in.


def test_image_grid_plain_floats(tmp_path):
    images = np.random.default_rng(0).uniform(size=(5, 32, 32))
    _check_png(plots.image_grid(images, tmp_path / "grid.png"), 1020, 204)  # ncols shrinks to 5.


def test_image_grid_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="images"):
        plots.image_grid(np.zeros((4, 8, 8, 3)), tmp_path / "grid.png")
    with pytest.raises(ValueError, match="overlays"):
        plots.image_grid(np.zeros((4, 8, 8)), tmp_path / "grid.png", overlays=np.zeros((4, 4, 4)))


def test_plotting_leaves_pyplot_alone(tmp_path):
    # pyplot state (and with it an interactive user's backend) must stay untouched.
    code = ("import sys; from pneumojax import plots; "
            f"plots.confusion_matrix([[1, 2], [3, 4]], {str(tmp_path / 'cm.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("height, width, size", [
    (300, 400, (1632, 432)),  # an ordinary film: three panels in its own shape
    (32, 80_000, (3552, 432)),  # a hostile strip: squashed to MAX_ASPECT, not 2,500 : 1
    (80_000, 32, (960, 432)),  # and upright: the figure keeps its minimum width for the title
])
def test_heatmap_overlay_is_bounded_whatever_the_aspect_ratio(tmp_path, height, width, size):
    image = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    heat = np.outer(np.hanning(16), np.hanning(16))  # the model's grid, stretched over it
    path = plots.heatmap_overlay(image, heat, tmp_path / "overlay.png",
                                 title="x.png: P(PNEUMONIA) = 0.500 -> NORMAL " * 3)
    _check_png(path, *size)


def _peak_bytes(image: np.ndarray, path: Path) -> int:
    tracemalloc.start()
    try:
        plots.heatmap_overlay(image, np.ones((8, 8)), path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_heatmap_overlay_memory_does_not_grow_with_the_scan(tmp_path):
    # Only the preview is drawn: the old float64 copies of image, heat and alpha took 24 bytes
    # a pixel more; shrinking takes about two.
    rng = np.random.default_rng(0)
    side = plots.OVERLAY_MAX_SIDE
    small = rng.integers(0, 256, (side, side), dtype=np.uint8)
    large = rng.integers(0, 256, (4 * side, 4 * side), dtype=np.uint8)
    assert _peak_bytes(large, tmp_path / "l.png") < _peak_bytes(small, tmp_path / "s.png") \
        + 4 * large.nbytes
    assert plots.preview(large).shape == (side, side) and plots.preview(large).dtype == np.uint8


def test_heatmap_overlay_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        plots.heatmap_overlay(np.zeros((40, 40, 3)), np.zeros((8, 8)), tmp_path / "o.png")
