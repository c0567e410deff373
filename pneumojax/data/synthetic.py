"""Synthetic chest-X-ray phantoms: the built-in demo and test data set. No real patient.

All geometry lives in normalised [0, 1] patient coordinates (x to the image's right, y down),
so one seed renders the same scene at 32 px or 224 px. Every example depends only on
(seed, patient, image), so any one can be regenerated alone, without its predecessors.
A PNEUMONIA image carries 1-3 consolidations whose thresholded opacity is the mask.

Pixel grids are kept separable (x a row, y a column; pose is zoom and shift, rotation is
left to augmentation) so that smooth fields are outer products: about 3 ms at 224 px.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_MASK_LEVEL = 0.35  # fraction of a lesion's peak opacity that the mask marks
_LUNG_LEVEL = 0.3  # air fraction above which a point counts as lung field
_TAU = np.float32(2 * np.pi)


def _jitter(rng: np.random.Generator, value: float, sd: float) -> float:
    return value + float(rng.normal(0.0, sd))


def _waves(rng: np.random.Generator, count: int, fmin: float, fmax: float) -> np.ndarray:
    """Random plane waves (fx, fy, phase, amplitude): resolution-free smooth noise."""
    freq, angle = rng.uniform(fmin, fmax, count), rng.uniform(0, 2 * np.pi, count)
    return np.stack([freq * np.cos(angle), freq * np.sin(angle), rng.uniform(0, 2 * np.pi, count),
                     rng.uniform(0.5, 1.0, count)], axis=1).astype(np.float32)


def _wave_field(waves: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sum of the waves in [-1, 1], via cos(a + b) = cos a cos b - sin a sin b.

    On a grid (x a (1, S) row, y an (S, 1) column) that sum is one small matmul.
    """
    fx, fy, phase, amp = waves.T
    ax, by = _TAU * fx * x.reshape(-1, 1) + phase, _TAU * fy * y.reshape(-1, 1)
    xs = np.concatenate([np.cos(ax), -np.sin(ax)], 1) * np.tile(amp / amp.sum(), 2)
    ys = np.concatenate([np.cos(by), np.sin(by)], 1)
    return ys @ xs.T if x.ndim == 2 else (ys * xs).sum(1)


def _inside(r2: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of r2 < 1, a smoothstep `edge` wide: the film's blur, size-independent."""
    t = np.clip(np.float32(0.5 + 1 / edge) - r2 * np.float32(1 / edge), 0, 1)
    return t * t * (3 - 2 * t)


def _anatomy(rng: np.random.Generator) -> dict:
    """One patient's build: lung, heart and rib geometry, jittered around an average chest."""
    mid = 0.5 + _jitter(rng, 0.0, 0.01)
    lungs = [dict(cx=mid + side * _jitter(rng, 0.195, 0.01), cy=_jitter(rng, 0.45, 0.012),
                  rx=_jitter(rng, 0.15, 0.008), ry=_jitter(rng, 0.33, 0.012),
                  flare=_jitter(rng, 0.4, 0.05), dome=_jitter(rng, 0.72 + 0.04 * side, 0.015),
                  waves=_waves(rng, 3, 0.8, 2.5))
             for side in (-1, 1)]  # image-left lung (patient's right) sits on a higher dome
    return dict(
        lungs=lungs, mid=mid,
        heart=(mid + _jitter(rng, 0.06, 0.01), _jitter(rng, 0.64, 0.012),
               _jitter(rng, 0.145, 0.01), _jitter(rng, 0.11, 0.008)),
        rib_top=_jitter(rng, 0.1, 0.01), rib_gap=_jitter(rng, 0.075, 0.003),
        tissue=_jitter(rng, 0.6, 0.03), depth=_jitter(rng, 0.4, 0.03),
        mottle=_waves(rng, 4, 0.5, 2.0))


def _fields(anat: dict, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lung air fraction, mediastinum) at points or on a grid; also used to place lesions."""
    mid = anat["mid"]
    hx, hy, hrx, hry = anat["heart"]
    dy4 = ((y - 0.55) / 0.5) ** 2
    med = _inside(((x - mid) / (0.04 + 0.06 * y)) ** 2 + dy4 * dy4, 0.6)
    med = np.maximum(med, _inside(((x - hx) / hrx) ** 2 + ((y - hy) / hry) ** 2, 0.3))
    med = np.maximum(med, _inside(((x - mid - 0.045) ** 2 + (y - 0.28) ** 2) / 0.035 ** 2, 0.6))
    air = np.zeros_like(med)
    for lung in anat["lungs"]:
        dy = (y - lung["cy"]) / lung["ry"]
        inv_rx = 1 / (lung["rx"] * (1 + lung["flare"] * np.clip(dy, -1, 1)))  # apex narrow, base wide
        dx = x - lung["cx"]
        r2 = (dx * inv_rx) ** 2 + dy * dy + 0.08 * _wave_field(lung["waves"], x, y)
        dome = lung["dome"] + 2.5 * dx * dx  # diaphragm: highest mid-lung, costophrenic angles low
        air = np.maximum(air, np.sqrt(np.clip(1 - r2, 0, 1))
                         * _inside(r2, 0.1) * np.clip((dome - y) / 0.02, 0, 1))
    return air * (1 - med), med


def _place(anat: dict, rng: np.random.Generator) -> tuple[float, float]:
    """A lesion centre well inside a lung, neighbourhood included, so no mask is ever empty."""
    ring = 0.035 * np.exp(1j * np.linspace(0, 2 * np.pi, 9))
    ring[-1] = 0
    while True:
        lung = anat["lungs"][rng.integers(2)]
        r, a = np.sqrt(rng.random()) * 0.8, rng.uniform(0, 2 * np.pi)
        cx, cy = lung["cx"] + r * lung["rx"] * np.cos(a), lung["cy"] + r * lung["ry"] * np.sin(a)
        air, _ = _fields(anat, (cx + ring.real).astype(np.float32), (cy + ring.imag).astype(np.float32))
        if air.min() > _LUNG_LEVEL:
            return cx, cy


def _lesion(anat: dict, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One consolidation, peak about 1: a few gaussian lobes (an outer product each), wavy edge."""
    cx, cy = _place(anat, rng)
    lobes = rng.integers(2, 5)
    dx, dy = rng.normal(0, 0.035, (2, lobes))
    dx[0] = dy[0] = 0
    inv = 1 / rng.uniform(0.03, 0.06, lobes) ** 2
    amp = np.r_[1.0, rng.uniform(0.4, 0.8, lobes - 1)]
    gx = np.exp(-0.5 * (x.reshape(-1, 1) - cx - dx) ** 2 * inv).astype(np.float32)
    gy = np.exp(-0.5 * (y.reshape(-1, 1) - cy - dy) ** 2 * inv).astype(np.float32)
    out = np.minimum(gy @ (gx * amp.astype(np.float32)).T, 1.4)
    return out * (1 + 0.35 * _wave_field(_waves(rng, 3, 6, 14), x, y))


def _ribs(anat: dict, d: np.ndarray, y: np.ndarray, slope: float, bend: float) -> np.ndarray:
    """Bright bands along y = top + slope * d + bend * d^2, spaced wider going down."""
    t = np.maximum(y - anat["rib_top"] - slope * d - bend * d * d, 0)
    c = (1 + np.cos((_TAU / anat["rib_gap"]) * (t - 0.2 * t * t))) * 0.5
    c *= c
    return c * c * c * (t > 0)


def _render(anat: dict, rng: np.random.Generator, size: int, pneumonia: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, mask, lung field bool): this image's pose, lesions and noise on a patient's anatomy."""
    if size < 32:
        raise ValueError(f"phantoms need size >= 32, got {size}")
    u = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    zoom, (sx, sy), breath = rng.uniform(0.96, 1.04), rng.uniform(-0.02, 0.02, 2), rng.uniform(0.97, 1.03)
    x = (u / np.float32(zoom) + np.float32(0.5 + sx))[None, :]
    y = (u / np.float32(zoom * breath) + np.float32(0.5 + sy))[:, None]

    air, med = _fields(anat, x, y)
    lung = air > _LUNG_LEVEL
    mask = np.zeros((size, size), bool)
    fill = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 4) if pneumonia else 0):
        opacity = _lesion(anat, rng, x, y)
        mask |= opacity > _MASK_LEVEL
        fill += np.float32(rng.uniform(0.35, 0.85)) * opacity
    mask &= lung

    d = np.abs(x - anat["mid"])
    width = 0.14 + 0.34 * np.clip((y + 0.02) / 0.22, 0, 1) ** 0.5  # neck into shoulders
    body = np.sqrt(np.clip(1 - (d / width) ** 2, 0, 1)) * _inside(((y - 0.5) / 0.6) ** 8, 0.5)
    cage = _inside((d / 0.4) ** 2, 0.3) * _inside(((y - 0.45) / 0.42) ** 2, 0.3)
    ribs = (_ribs(anat, d, y, -0.25, 2.2) + 0.4 * _ribs(anat, d, y - 0.1, 0.5, -0.6)) * cage
    clavicle = np.exp(-((y - 0.14 + 0.25 * d - 0.3 * d * d) / 0.014) ** 2) * _inside((d / 0.3) ** 2, 0.5)
    spine = _inside((d / 0.03) ** 2, 0.8) * (0.8 + 0.2 * np.cos((_TAU / 0.055) * y))

    att = (anat["tissue"] * body + 0.16 * med + 0.06 * spine
           - anat["depth"] * air * (1 - np.clip(fill, 0, 0.9))
           + body * (0.1 * ribs + 0.14 * clavicle) + 0.04 * _wave_field(anat["mottle"], x, y))
    image = 1 - np.exp(att * np.float32(-2.0 * rng.uniform(0.9, 1.1)))  # film response
    # Box-Muller: two independent normals, ~3x faster than rng.standard_normal here.
    u1, u2 = rng.random((2, size, size), np.float32)
    radius, angle = np.sqrt(-2 * np.log1p(-u1)), _TAU * u2
    image *= 1 + 0.03 * radius * np.sin(angle)  # speckle
    image += 0.015 * radius * np.cos(angle)
    image = np.clip(image * 300, 0, 255).astype(np.uint8)
    return image[..., None], mask.astype(np.uint8)[..., None], lung


def phantom(rng: np.random.Generator, size: int, pneumonia: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image. Returns (image uint8 (size, size, 1), mask uint8 (size, size, 1) with values in {0, 1})."""
    image, mask, _ = _render(_anatomy(rng), rng, size, pneumonia)
    return image, mask


def examples(count: int, size: int, seed: int, *, pneumonia_fraction: float = 0.5) -> Iterator[dict]:
    """Yields exactly `count` dicts: {"image", "mask", "label" (int 0=NORMAL, 1=PNEUMONIA), "patient_id" (str), "file_name" (str)}.

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
            image, mask, _ = _render(anat, np.random.default_rng([seed, patient, j]), size, bool(label))
            yield dict(image=image, mask=mask, label=label, patient_id=patient_id,
                       file_name=f"{patient_id}-{j}.png")
        done, patient = done + n_images, patient + 1
