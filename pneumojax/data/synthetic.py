"""Synthetic chest-X-ray phantoms: the built-in demo and test data set. No real patient.

Geometry lives in normalised [0, 1] patient coordinates (x to the image's right, y down), so
one seed renders the same scene at 32 or 224 px; an example depends only on (seed, patient,
image), so any one regenerates alone. PNEUMONIA images carry 1-3 consolidations, masked.
Speed (a few ms at 224 px) comes from separable grids, x a (1, S) row and y an (S, 1) column
(pose is zoom and shift; rotation is left to augmentation): waves and lesions are outer
products, and each organ is drawn only inside its bounding box.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator

import numpy as np

_MASK_LEVEL = 0.35  # fraction of a lesion's peak opacity that the mask marks
_LUNG_LEVEL = 0.3  # air fraction above which a point counts as lung field
_SITE_GRID = 64  # cells per side of the grid that lesion centres are drawn from


def _jitter(rng: np.random.Generator, value: float, sd: float) -> float:
    return value + float(rng.normal(0.0, sd))


def _waves(rng: np.random.Generator, count: int, fmin: float, fmax: float) -> np.ndarray:
    """Random plane waves, resolution-free smooth noise, as rows (wx, wy, phase x, phase y, amp):
    cos(a + b) = cos a cos b + cos(a + pi/2) cos(b - pi/2) makes each wave two separable rows."""
    freq, angle = rng.uniform(fmin, fmax, count), rng.uniform(0, 2 * np.pi, count)
    phase, amp = rng.uniform(0, 2 * np.pi, count), rng.uniform(0.5, 1.0, count)
    rows = np.stack([2 * np.pi * freq * np.cos(angle), 2 * np.pi * freq * np.sin(angle),
                     phase, np.zeros(count), amp / amp.sum()], axis=1)
    return np.concatenate([rows, rows + [0, 0, np.pi / 2, -np.pi / 2, 0]]).astype(np.float32)


def _wave_field(waves: np.ndarray, x: np.ndarray, y: np.ndarray, scale: float = 1.0,
                terms: tuple[tuple[np.ndarray, np.ndarray], ...] = ()) -> np.ndarray:
    """Sum of the waves on the grid, in [-scale, scale], plus terms column * row: one matmul."""
    wx, wy, px, py, amp = waves.T
    cols = np.hstack([np.cos(wy * y + py), *(c for c, _ in terms)])
    rows = np.vstack([np.cos(wx * x.T + px).T * (amp * np.float32(scale))[:, None],
                      *(r for _, r in terms)])
    return cols @ rows


def _inside(r2: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of r2 < 1, a ramp `edge` wide: the film's blur, size-independent."""
    return np.clip(np.float32(0.5 + 1 / edge) - r2 * np.float32(1 / edge), 0, 1)


def _window(x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float]
            ) -> tuple[slice, slice]:
    """(rows, cols) of the grid inside box (x0, x1, y0, y1)."""
    j0, j1 = np.searchsorted(x[0], box[:2])
    i0, i1 = np.searchsorted(y[:, 0], box[2:])
    return slice(i0, i1), slice(j0, j1)


def _stamp(out: np.ndarray, x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float],
           shape: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """out = max(out, shape) inside box, the only place the shape is non-zero."""
    rows, cols = _window(x, y, box)
    view = out[rows, cols]
    np.maximum(view, shape(x[:, cols], y[rows]), out=view)


def _anatomy(rng: np.random.Generator) -> dict:
    """One patient's build: lung, heart and rib geometry, jittered around an average chest."""
    mid = 0.5 + _jitter(rng, 0.0, 0.01)
    lungs = [{"cx": mid + side * _jitter(rng, 0.195, 0.01), "cy": _jitter(rng, 0.45, 0.012),
              "rx": _jitter(rng, 0.15, 0.008), "ry": _jitter(rng, 0.33, 0.012),
              "flare": _jitter(rng, 0.4, 0.05), "dome": _jitter(rng, 0.72 + 0.04 * side, 0.015),
              "waves": _waves(rng, 3, 0.8, 2.5)}
             for side in (-1, 1)]  # the image-left lung (patient's right) sits on a higher dome
    return {"lungs": lungs, "mid": mid,
            "heart": (mid + _jitter(rng, 0.06, 0.01), _jitter(rng, 0.64, 0.012),
                      _jitter(rng, 0.145, 0.01), _jitter(rng, 0.11, 0.008)),
            "rib_top": _jitter(rng, 0.1, 0.01), "rib_gap": _jitter(rng, 0.075, 0.003),
            "rib_bend": _jitter(rng, 2.2, 0.2),
            "tissue": _jitter(rng, 0.55, 0.03), "depth": _jitter(rng, 0.45, 0.03),
            "mottle": _waves(rng, 4, 0.5, 2.0), "markings": _waves(rng, 6, 6, 16)}


def _lung(lung: dict) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Air fraction of one lung: a chord through a wobbly egg (apex narrow, base wide), cut
    below by the diaphragm dome, which leaves the costophrenic angles low and sharp."""
    def shape(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dy = (y - lung["cy"]) / lung["ry"]
        inv_rx = 1 / (lung["rx"] * (1 + lung["flare"] * np.clip(dy, -1, 1)))
        dx = x - lung["cx"]
        free = _wave_field(lung["waves"], x, y, -0.08,  # 1 - r2
                           ((1 - dy * dy, np.ones_like(dx)), (inv_rx * inv_rx, -dx * dx)))
        air = np.sqrt(np.clip(free, 0, 1, out=free), out=free)
        air *= np.clip(50 * (lung["dome"] + 2.5 * dx * dx) - 50 * y, 0, 1)  # a 0.02 ramp
        return air
    return shape


def _fields(anat: dict, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lung air fraction, mediastinum) on the grid; also used to place lesions."""
    mid = anat["mid"]
    hx, hy, hrx, hry = anat["heart"]
    med = np.zeros((y.size, x.size), np.float32)
    _stamp(med, x, y, (mid - 0.13, mid + 0.13, -1, 2), lambda x, y: _inside(
        ((x - mid) / (0.04 + 0.06 * y)) ** 2 + ((y - 0.55) / 0.5) ** 4, 0.6))
    _stamp(med, x, y, (hx - 1.2 * hrx, hx + 1.2 * hrx, hy - 1.2 * hry, hy + 1.2 * hry),
           lambda x, y: _inside(((x - hx) / hrx) ** 2 + ((y - hy) / hry) ** 2, 0.5))
    _stamp(med, x, y, (mid, mid + 0.09, 0.24, 0.32),  # aortic knob
           lambda x, y: _inside(((x - mid - 0.045) ** 2 + (y - 0.28) ** 2) / 0.035 ** 2, 0.6))
    air = np.zeros_like(med)
    for lung in anat["lungs"]:
        half = 1.1 * lung["rx"] * (1 + lung["flare"])
        _stamp(air, x, y, (lung["cx"] - half, lung["cx"] + half,
                           lung["cy"] - 1.1 * lung["ry"], lung["cy"] + 1.1 * lung["ry"]),
               _lung(lung))
    return air * (1 - med), med


def _sites(anat: dict) -> np.ndarray:
    """Candidate lesion centres: a coarse grid eroded 3 cells (0.047) into the lung fields, so a
    lesion's centre pixel is lung at any size and no PNEUMONIA mask is ever empty."""
    g = (np.arange(_SITE_GRID, dtype=np.float32) + 0.5) / _SITE_GRID
    ok = np.pad(_fields(anat, g[None, :], g[:, None])[0] > _LUNG_LEVEL, 3)
    for _ in range(2):  # erode along rows, then (transposed) along columns
        ok = np.logical_and.reduce([ok[k:k + len(ok) - 6] for k in range(7)]).T
    rows, cols = np.nonzero(ok)
    return np.stack([g[cols], g[rows]], 1)


def _lesion(anat: dict, rng: np.random.Generator, x: np.ndarray, y: np.ndarray
            ) -> tuple[tuple[slice, slice], np.ndarray]:
    """One consolidation, peak about 1: a few gaussian lobes (outer products) with a wavy edge.
    Returns the window it covers (its lobes to 3.5 sigma) and its opacity there."""
    if "sites" not in anat:  # once per patient, on first need: NORMAL patients never pay
        anat["sites"] = _sites(anat)
    cx, cy = rng.choice(anat["sites"]) + rng.uniform(-0.5, 0.5, 2) / _SITE_GRID
    lobes = rng.integers(2, 5)
    dx, dy = rng.normal(0, 0.035, (2, lobes))
    dx[0] = dy[0] = 0
    sigma = rng.uniform(0.03, 0.06, lobes)
    amp = np.r_[1.0, rng.uniform(0.4, 0.8, lobes - 1)]
    edge = _waves(rng, 3, 6, 14)
    rows, cols = _window(x, y, (cx + min(dx - 3.5 * sigma), cx + max(dx + 3.5 * sigma),
                                cy + min(dy - 3.5 * sigma), cy + max(dy + 3.5 * sigma)))
    x, y = x[:, cols], y[rows]
    gx = (amp * np.exp(-0.5 * ((x.reshape(-1, 1) - cx - dx) / sigma) ** 2)).astype(np.float32)
    gy = np.exp(-0.5 * ((y.reshape(-1, 1) - cy - dy) / sigma) ** 2).astype(np.float32)
    out = np.minimum(gy @ gx.T, 1.4)
    out *= 1 + 0.35 * _wave_field(edge, x, y)
    return (rows, cols), out


def _ribs(anat: dict, d: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior ribs: bright arcs y = top - 0.25 d + bend d^2 (d from the spine), rising a
    little then falling laterally, wider apart going down. The band phase is a column (warped
    y) minus a row (the arc), so a rib cage costs a few passes."""
    v = y - anat["rib_top"]
    arc = 0.25 * d - anat["rib_bend"] * d * d
    q = (v - 0.2 * v * v + arc) * np.float32(1 / anat["rib_gap"])
    p = q - np.floor(q) - 0.5
    band = np.maximum(1 - 25 * p * p, 0)
    return band * band


def _bones(anat: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Attenuation of the ribs inside the thoracic cage, from the spine out, and the clavicles."""
    mid = anat["mid"]
    out = np.zeros((y.size, x.size), np.float32)
    _stamp(out, x, y, (mid - 0.44, mid + 0.44, 0.03, 0.81), lambda x, y: (
        (0.1 * _inside(((x - mid) / 0.4) ** 2, 0.3) * np.clip(30 * np.abs(x - mid) - 1, 0, 1))
        * _inside(((y - 0.42) / 0.36) ** 2, 0.3) * _ribs(anat, np.abs(x - mid), y)))
    _stamp(out, x, y, (mid - 0.34, mid + 0.34, 0.0, 0.22), lambda x, y: (
        np.exp(-((y + (0.25 * np.abs(x - mid) - 0.3 * (x - mid) ** 2 - 0.14)) / 0.014) ** 2)
        * (0.14 * _inside(((x - mid) / 0.3) ** 2, 0.5) * (np.abs(x - mid) > 0.035))))
    return out


def _render(anat: dict, rng: np.random.Generator, size: int, pneumonia: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, mask, lung field bool): one image's pose, lesions and noise on a patient's build."""
    if size < 32:
        raise ValueError(f"phantoms need size >= 32, got {size}")
    u = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    zoom, breath, sx, sy = rng.uniform([0.96, 0.97, -0.02, -0.02], [1.04, 1.03, 0.02, 0.02])
    x = (u / np.float32(zoom) + np.float32(0.5 + sx))[None, :]
    y = (u / np.float32(zoom * breath) + np.float32(0.5 + sy))[:, None]

    air, med = _fields(anat, x, y)
    lung = air > _LUNG_LEVEL
    mask = np.zeros((size, size), bool)
    fill = _wave_field(anat["markings"], x, y, 0.04) + np.float32(0.04)  # vessels, interstitium
    for _ in range(rng.integers(1, 4) if pneumonia else 0):
        window, opacity = _lesion(anat, rng, x, y)
        mask[window] |= opacity > _MASK_LEVEL
        fill[window] += np.float32(rng.uniform(0.35, 0.85)) * opacity
    mask &= lung

    d = np.abs(x - anat["mid"])
    width = 0.14 + 0.34 * np.sqrt(np.clip((y + 0.02) / 0.22, 0, 1))  # neck into shoulders
    body = np.sqrt(np.clip(1 - (d * (1 / width)) ** 2, 0, 1))
    body *= _inside(((y - 0.5) / 0.6) ** 8, 0.5)
    spine = (0.8 + 0.2 * np.cos(np.float32(2 * np.pi / 0.055) * y),  # vertebrae
             0.04 * _inside((d / 0.03) ** 2, 0.8))

    # Attenuation, built in place: each 224 px temporary costs as much as the arithmetic.
    att = _wave_field(anat["mottle"], x, y, 0.04,  # uneven exposure and build
                      ((np.ones_like(y), np.full_like(x, 0.03)), spine))
    att += body * (_bones(anat, x, y) + anat["tissue"])
    att += 0.12 * med
    air *= np.subtract(1, np.minimum(fill, 0.9, out=fill), out=fill)
    air *= anat["depth"]
    att -= air
    att *= np.float32(-2.2 * rng.uniform(0.92, 1.08))  # film response at this exposure
    image = np.exp(att, out=att)
    image *= -270
    image += 270
    # Irwin-Hall noise from raw generator bytes, several times cheaper than standard_normal:
    # a uniform byte is a 3% speckle, three more sum to a near-Gaussian of sd 4 grey levels.
    raw = np.asarray(rng.bit_generator.random_raw(-(-size * size // 2)), "<u8").view(np.uint8)
    noise = raw[: 4 * size * size].reshape(4, size, size)
    image *= noise[3] * np.float32(0.03 / 73.9) + np.float32(1 - 127.5 * 0.03 / 73.9)
    image += noise[:3].sum(0, dtype=np.float32) * np.float32(4 / 128) - np.float32(382.5 * 4 / 128)
    image = np.clip(image, 0, 255, out=image).astype(np.uint8)
    return image[..., None], mask.astype(np.uint8)[..., None], lung


def phantom(rng: np.random.Generator, size: int, pneumonia: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image. Returns (image uint8 (size, size, 1), mask uint8 (size, size, 1) in {0, 1})."""
    image, mask, _ = _render(_anatomy(rng), rng, size, pneumonia)
    return image, mask


def examples(count: int, size: int, seed: int, *, pneumonia_fraction: float = 0.5
             ) -> Iterator[dict]:
    """Yields exactly `count` dicts: {"image", "mask", "label" (int 0=NORMAL, 1=PNEUMONIA),
    "patient_id" (str), "file_name" (str)}.

    Patients hold 1-3 images sharing label and anatomy; the label is drawn per patient.
    Patient p draws from rng [seed, p, 0], its j-th image (j from 1) from [seed, p, j].
    """
    if count < 0 or not 0.0 <= pneumonia_fraction <= 1.0:
        raise ValueError(f"need count >= 0 and pneumonia_fraction in [0, 1], "
                         f"got {count}, {pneumonia_fraction}")
    done, patient = 0, 0
    while done < count:
        prng = np.random.default_rng([seed, patient, 0])
        label = int(prng.random() < pneumonia_fraction)
        n_images = min(int(prng.integers(1, 4)), count - done)
        anat = _anatomy(prng)
        patient_id = f"synthetic-{patient:06d}"
        for j in range(1, n_images + 1):
            rng = np.random.default_rng([seed, patient, j])
            image, mask, _ = _render(anat, rng, size, bool(label))
            yield {"image": image, "mask": mask, "label": label, "patient_id": patient_id,
                   "file_name": f"{patient_id}-{j}.png"}
        done, patient = done + n_images, patient + 1


def write_folder(root: pathlib.Path, counts: dict[str, int], size: int = 48) -> None:
    """Phantoms as JPEG files in the Kaggle layout (`root/SPLIT/{NORMAL,PNEUMONIA}/`), named
    as Kermany's files are (`personN_bacteria_M.jpeg`, `IM-NNNN-MMMM.jpeg`), so that a folder
    source, its patient parsing included, can be exercised without the real data. Each split
    draws from its own seed, so no patient is in two splits."""
    from PIL import Image

    from pneumojax.data import sources  # it imports this module

    for seed, (split, count) in enumerate(counts.items()):
        for i, ex in enumerate(examples(count, size, seed)):
            patient = int(ex["patient_id"].rsplit("-", 1)[1]) + 1000 * seed
            name = (f"person{patient}_bacteria_{i}.jpeg" if ex["label"] else
                    f"IM-{patient:04d}-{i:04d}.jpeg")
            folder = pathlib.Path(root) / split / sources.CLASSES[ex["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ex["image"][..., 0]).save(folder / name, quality=95)
