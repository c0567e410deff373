"""Every figure of the project, each written to a PNG whose path is returned.

Figures are built as `matplotlib.figure.Figure` objects drawn by the Agg canvas,
never through pyplot: pyplot keeps global state (current figure, backend) that would
leak figures in long runs and could switch the backend of a user's interactive
session. Styling is applied inside `matplotlib.rc_context` for the same reason.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from pneumojax import metrics

DPI: int = 120
CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
MAX_ASPECT: float = 3.0  # widest (and tallest) panel of an image figure, as width / height
OVERLAY_MAX_SIDE: int = 1024  # pixels an overlay draws a side: panels are 384 px tall
_STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
          "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
          "axes.spines.right": False}
_SPLIT_COLORS = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}
# Threshold markers: colours and dashes apart from the curves' red, blue and purple, since
# chosen thresholds often lie close together.
_MARK_COLORS = ("black", "tab:green", "tab:orange", "tab:brown", "tab:gray")
_MARK_STYLES = ("--", "-.", ":")


def _figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas attached; size in inches at `DPI`."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _color(split: str, index: int) -> str:
    """Fixed colours for the usual splits, so train is blue in every figure."""
    return _SPLIT_COLORS.get(split, f"C{(index + 3) % 10}")


def _series(records: Sequence[Mapping], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` in the records of `split`, sorted by step; keys may be missing."""
    points = sorted((r["step"], r[key]) for r in records
                    if r.get("split") == split and "step" in r and r.get(key) is not None)
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def learning_curves(records: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Loss, ROC AUC and accuracy against step, one line per split, plus the learning rate
    when records carry `learning_rate`.

    `records` are metrics.jsonl lines, {"step", "split", ...metrics}. Any key may be
    missing (no validation yet, a metric logged for one split only): a panel without data
    says so instead of failing, so the plot can be redrawn during training.
    """
    with matplotlib.rc_context(_STYLE):
        splits = list(dict.fromkeys(r["split"] for r in records if "split" in r))
        panels = [("loss", "Loss"), ("roc_auc", "ROC AUC"), ("accuracy", "Accuracy")]
        if any("learning_rate" in r for r in records):
            panels.append(("learning_rate", "Learning rate"))
        fig = _figure(4.0 * len(panels), 3.6)
        for ax, (key, title) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
            ax.set(title=title, xlabel="Step", ylabel=title)
            drawn = False
            for index, split in enumerate(splits):
                steps, values = _series(records, split, key)
                if steps.size:
                    marker = "o" if steps.size <= 30 else None
                    ax.plot(steps, values, marker=marker, markersize=3, label=split,
                            color=_color(split, index))
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, f"no {key} logged yet", transform=ax.transAxes,
                        ha="center", va="center", color="0.4")
                continue
            ax.legend()
            if key == "learning_rate":  # Rates like 3e-4 read better with a shared exponent.
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        fig.suptitle("Learning curves", fontsize=12)
        return _save(fig, path)


def roc(curves: Mapping[str, tuple], path: str | os.PathLike) -> Path:
    """ROC curve per named split, AUC and size in the legend, against the chance diagonal."""
    with matplotlib.rc_context(_STYLE):
        fig = _figure(5.5, 5.5)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", label="chance (AUC = 0.5)")
        for index, (name, (labels, probs)) in enumerate(curves.items()):
            fpr, tpr, _ = metrics.roc_curve(labels, probs)
            auc = metrics.roc_auc(labels, probs)
            label = f"{name}: AUC = {auc:.3f} (n = {len(labels)})"
            if np.isnan(auc):  # One class only: there is no curve to draw.
                ax.plot([], [], color=_color(name, index), label=f"{name}: one class only")
                continue
            ax.plot(fpr, tpr, color=_color(name, index), linewidth=2, label=label)
        # Limits just past [0, 1], so curves along an edge are not hidden under the spine.
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title="ROC curve",
               xlabel="False positive rate (1 - specificity)",
               ylabel="True positive rate (sensitivity)")
        ax.legend(loc="lower right")
        return _save(fig, path)


def precision_recall(curves: Mapping[str, tuple], path: str | os.PathLike) -> Path:
    """Precision-recall curve per named split, average precision in the legend; a dotted
    line marks each split's prevalence, the precision of a random classifier."""
    with matplotlib.rc_context(_STYLE):
        fig = _figure(5.5, 5.5)
        ax = fig.add_subplot()
        for index, (name, (labels, probs)) in enumerate(curves.items()):
            color, ap = _color(name, index), metrics.pr_auc(labels, probs)
            if np.isnan(ap):
                ax.plot([], [], color=color, label=f"{name}: one class only")
                continue
            precision, recall, _ = metrics.pr_curve(labels, probs)
            # Step-wise, as average precision sums it.
            ax.step(recall, precision, where="pre", color=color, linewidth=2,
                    label=f"{name}: AP = {ap:.3f} (n = {len(labels)})")
            prevalence = float(np.mean(labels))
            ax.axhline(prevalence, linestyle=":", color=color,
                       label=f"{name}: prevalence = {prevalence:.2f}")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
               title="Precision-recall curve",
               xlabel="Recall (sensitivity)", ylabel="Precision (PPV)")
        ax.legend(loc="lower left")
        return _save(fig, path)


def confusion_matrix(cm, path: str | os.PathLike, *, title: str = "",
                     class_names: Sequence[str] = CLASS_NAMES) -> Path:
    """Counts and row-normalised percentages (per true class, i.e. sensitivity and
    specificity on the diagonal); colour follows the percentage so that a rare class
    is as visible as a common one."""
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    with matplotlib.rc_context({**_STYLE, "axes.grid": False}):
        fig = _figure(4.8, 4.2)
        ax = fig.add_subplot()
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, f"{count}\n{100 * share[i, j]:.1f}%", ha="center", va="center",
                    fontsize=12, color="white" if share[i, j] > 0.5 else "black")
        ticks = np.arange(len(class_names))
        ax.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names,
               xlabel="Predicted", ylabel="True", title=title or "Confusion matrix")
        ax.tick_params(axis="y", labelrotation=90)
        fig.colorbar(image, ax=ax, label="share of true class", shrink=0.8)
        return _save(fig, path)


def threshold_sweep(labels, probs, path: str | os.PathLike, *,
                    marked: Mapping[str, float] | None = None) -> Path:
    """Sensitivity, specificity and F1 against the decision threshold, with chosen
    thresholds (e.g. {"0.5": 0.5, "validation Youden": t}) as labelled vertical lines:
    shows what moving the operating point trades."""
    grid = np.linspace(0, 1, 501)
    sweep = metrics.at_thresholds(labels, probs, grid)
    with matplotlib.rc_context(_STYLE):
        fig = _figure(8.5, 4.5)
        ax = fig.add_subplot()
        for key, label, color in (("sensitivity", "Sensitivity", "tab:red"),
                                  ("specificity", "Specificity", "tab:blue"),
                                  ("f1", "F1", "tab:purple")):
            ax.plot(grid, sweep[key], color=color, linewidth=2, label=label)
        for index, (name, t) in enumerate((marked or {}).items()):
            ax.axvline(t, color=_MARK_COLORS[index % len(_MARK_COLORS)],
                       linestyle=_MARK_STYLES[index % len(_MARK_STYLES)], linewidth=1.5,
                       label=f"{name} (t = {t:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Threshold on P(PNEUMONIA)", ylabel="Value",
               title=f"Threshold sweep (n = {len(labels)}, {int(np.sum(labels))} positive)")
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
        return _save(fig, path)


def image_grid(images, path: str | os.PathLike, *, titles: Sequence[str] | None = None,
               overlays=None, ncols: int = 8, cmap: str = "jet", alpha: float = 0.6,
               title: str = "") -> Path:
    """Grayscale images (N, H, W[, 1]), uint8 or floats in [0, 1], in a grid; optional
    heat maps (N, H, W) in [0, 1] drawn over them in `cmap`, with a colour bar.

    A heat map's opacity grows with its value up to `alpha`, so cold regions leave the
    X-ray untinted and the anatomy under a Grad-CAM stays readable. Intensities are shown
    on a fixed scale (no per-image contrast stretch), so images compare as the model sees them.
    """
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 1), got {images.shape}")
    if images.dtype == np.uint8:
        images = images / 255.0
    if overlays is not None:
        overlays = np.asarray(overlays)
        if overlays.shape != images.shape:
            raise ValueError(f"overlays {overlays.shape} must match images {images.shape}")
    n, height, width = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    cell = 1.7  # Inches per image: thumbnails stay readable with a title line above.
    with matplotlib.rc_context({**_STYLE, "axes.grid": False}):
        fig = _figure(cell * ncols * _aspect(height, width)
                      + (0.8 if overlays is not None else 0),
                      (cell + (0.3 if titles is not None else 0)) * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for index, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if index >= n:
                continue
            ax.imshow(images[index], cmap="gray", vmin=0, vmax=1)
            if overlays is not None:
                heat = np.clip(overlays[index], 0, 1)
                ax.imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=alpha * heat)
            if titles is not None:
                ax.set_title(titles[index], fontsize=8)
        if overlays is not None:
            scale = ScalarMappable(Normalize(0, 1), cmap)
            fig.colorbar(scale, ax=axes, shrink=0.8, label="heat")
        if title:
            fig.suptitle(title, fontsize=10)
        return _save(fig, path)


def _aspect(height: int, width: int) -> float:
    """Width / height of a panel, within `MAX_ASPECT` either way: the figure's size follows
    it, so a hostile 80,000 x 32 image must not make it 80,000 / 32 panels wide."""
    return float(np.clip(width / height, 1 / MAX_ASPECT, MAX_ASPECT))


def _resized(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D array resized bilinearly to `shape` (rows, columns); uint8 stays uint8, floats
    become float32."""
    image = Image.fromarray(array).resize((shape[1], shape[0]), Image.Resampling.BILINEAR,
                                          reducing_gap=3.0)
    return np.asarray(image)


def preview(image) -> np.ndarray:
    """An (H, W) image shrunk to at most `OVERLAY_MAX_SIDE` pixels a side (and at least 2):
    all that `heatmap_overlay` draws of it, so a caller may keep this instead of a large scan."""
    image = np.asarray(image)
    scale = min(1.0, OVERLAY_MAX_SIDE / max(image.shape))
    shape = (max(2, round(image.shape[0] * scale)), max(2, round(image.shape[1] * scale)))
    return image if shape == image.shape else _resized(image, shape)


def heatmap_overlay(image, heat, path: str | os.PathLike, *, title: str = "",
                    level: float = 0.5, cmap: str = "jet", alpha: float = 0.6) -> Path:
    """One X-ray three ways: as it is, with the heat map over it, and with the heat map's
    `level` contour, so a reader can check the anatomy under the hot region.

    `image` is (H, W), uint8 or floats in [0, 1], at any size; `heat` (h, w) in [0, 1] at
    any resolution is stretched over it, as the model's squashed input is. Both are drawn at
    the size of `preview(image)`, and an image beyond `MAX_ASPECT` is squashed to it (the
    panel says so): the PNG's size is bounded whatever the image's size or shape.
    """
    image, heat = np.asarray(image), np.asarray(heat)
    if image.ndim != 2 or heat.ndim != 2:
        raise ValueError(f"image {image.shape} and heat map {heat.shape} must be 2-D")
    shown = preview(image)
    heat = np.clip(_resized(heat.astype(np.float32), shown.shape), 0, 1)
    shown = shown / 255.0 if shown.dtype == np.uint8 else shown
    aspect = _aspect(*shown.shape)
    squash = (shown.shape[1] / shown.shape[0]) / aspect  # 1: drawn in its own shape
    first = "image" if squash == 1 else "image (squashed)"
    with matplotlib.rc_context({**_STYLE, "axes.grid": False}):
        fig = _figure(max(3 * 3.2 * aspect + 0.8, 8.0), 3.6)  # 8 in: the title fits
        axes = fig.subplots(1, 3)
        for ax, name in zip(axes, (first, "heat map", f"contour at {level:g}")):
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1, aspect=squash)
            ax.set_title(name, fontsize=9)
            ax.set_axis_off()
        axes[1].imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=alpha * heat, aspect=squash)
        if heat.max() > level:
            axes[2].contour(heat, levels=[level], colors="red", linewidths=1.2)
        fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=axes, shrink=0.8, label="heat")
        if title:
            fig.suptitle(title, fontsize=10, wrap=True)  # a long file name
        return _save(fig, path)
