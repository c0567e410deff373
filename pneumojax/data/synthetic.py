"""Synthetic chest-X-ray phantoms: the built-in demo and test data set. No real patient.

All geometry lives in normalised [0, 1] patient coordinates (x to the image's right, y down),
so one seed renders the same scene at 32 px or 224 px. Every example depends only on
(seed, patient, image), so any one can be regenerated alone, without its predecessors.
A PNEUMONIA image carries 1-3 consolidations whose thresholded opacity is the mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_MASK_LEVEL = 0.35  # fraction of a lesion's peak opacity that the mask marks
_EDGE = 0.06  # soft-edge width in squared-radius units: the film's blur, size-independent


def _jitter(rng: np.random.Generator, value: float, sd: float) -> float:
    return value + float(rng.normal(0.0, sd))


def _waves(rng: np.random.Generator, count: int, fmin: float, fmax: float) -> np.ndarray:
    """Random plane waves (fx, fy, phase, amplitude): resolution-free smooth noise."""
    freq, angle = rng.uniform(fmin, fmax, count), rng.uniform(0, 2 * np.pi, count)
    return np.stack([freq * np.cos(angle), freq * np.sin(angle),
                     rng.uniform(0, 2 * np.pi, count), rng.uniform(0.5, 1.0, count)], axis=1)


def _wave_field(waves: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sum of the waves, scaled into [-1, 1]."""
    out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), np.float32)
    for fx, fy, phase, amp in waves:
        out += np.float32(amp) * np.cos(np.float32(2 * np.pi * fx) * x
                                        + np.float32(2 * np.pi * fy) * y + np.float32(phase))
    return out / np.float32(waves[:, 3].sum())


def _inside(r2: np.ndarray, edge: float = _EDGE) -> np.ndarray:
    """Soft indicator of r2 < 1 (smoothstep across the edge)."""
    t = np.clip((1 - r2) / np.float32(edge) + np.float32(0.5), 0, 1)
    return t * t * (3 - 2 * t)


def _anatomy(rng: np.random.Generator) -> dict:
    """One patient's build: lung, heart and rib geometry, jittered around an average chest."""
    shift = _jitter(rng, 0.0, 0.01)
    lungs = [dict(cx=0.5 + shift + side * _jitter(rng, 0.175, 0.01),
                  cy=_jitter(rng, 0.45 + 0.01 * side, 0.012),
                  rx=_jitter(rng, 0.14, 0.008), ry=_jitter(rng, 0.255, 0.012),
                  flare=_jitter(rng, 0.45, 0.05), waves=_waves(rng, 3, 0.8, 2.5))
             for side in (-1, 1)]
    return dict(
        lungs=lungs, mid=0.5 + shift,
        heart=(0.5 + shift + _jitter(rng, 0.065, 0.01), _jitter(rng, 0.66, 0.012),
               _jitter(rng, 0.15, 0.01), _jitter(rng, 0.115, 0.008)),
        rib_top=_jitter(rng, 0.14, 0.01), rib_gap=_jitter(rng, 0.062, 0.003),
        rib_bend=_jitter(rng, 1.3, 0.1), tissue=_jitter(rng, 0.62, 0.03),
        depth=_jitter(rng, 0.42, 0.03), mottle=_waves(rng, 4, 0.5, 2.0))


def _fields(anat: dict, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lung air fraction, mediastinum) at points (x, y); also used to place lesions."""
    mid = anat["mid"]
    hx, hy, hrx, hry = anat["heart"]
    med = np.maximum(
        _inside(((x - mid) / (0.045 + 0.05 * y)) ** 2 + ((y - 0.55) / 0.5) ** 4, 0.4),
        _inside(((x - hx) / hrx) ** 2 + ((y - hy) / hry) ** 2, 0.15))
    med = np.maximum(med, _inside(((x - mid - 0.05) ** 2 + (y - 0.3) ** 2) / 0.035 ** 2, 0.3))
    air = np.zeros_like(med)
    for lung in anat["lungs"]:
        dy = (y - lung["cy"]) / lung["ry"]
        rx = lung["rx"] * (1 + lung["flare"] * np.clip(dy, -1, 1))  # apex narrow, base wide
        r2 = ((x - lung["cx"]) / rx) ** 2 + dy ** 2 + 0.08 * _wave_field(lung["waves"], x, y)
        air = np.maximum(air, np.sqrt(np.clip(1 - r2, 0, 1)) * _inside(r2))
    return air * (1 - med), med


def _place(anat: dict, rng: np.random.Generator) -> tuple[float, float]:
    """A lesion centre well inside a lung field (its neighbourhood too, so the mask is never empty)."""
    ring = 0.035 * np.exp(1j * np.linspace(0, 2 * np.pi, 8, endpoint=False))
    while True:
        lung = anat["lungs"][rng.integers(2)]
        r, a = np.sqrt(rng.random()) * 0.8, rng.uniform(0, 2 * np.pi)
        cx, cy = lung["cx"] + r * lung["rx"] * np.cos(a), lung["cy"] + r * lung["ry"] * np.sin(a)
        air, _ = _fields(anat, np.append(cx + ring.real, cx), np.append(cy + ring.imag, cy))
        if air.min() > 0.3:
            return cx, cy


def _lesion(anat: dict, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One consolidation, peak about 1: a few gaussian lobes with a wavy edge."""
    cx, cy = _place(anat, rng)
    out = np.zeros_like(x)
    for k in range(rng.integers(2, 5)):
        dx, dy = (0.0, 0.0) if k == 0 else rng.normal(0, 0.035, 2)
        sigma, amp = rng.uniform(0.03, 0.06), 1.0 if k == 0 else rng.uniform(0.4, 0.8)
        out += np.float32(amp) * np.exp(((x - cx - dx) ** 2 + (y - cy - dy) ** 2)
                                        * np.float32(-0.5 / sigma ** 2))
    return np.minimum(out, 1.4) * (1 + 0.35 * _wave_field(_waves(rng, 3, 6, 14), x, y))


def _render(anat: dict, rng: np.random.Generator, size: int, pneumonia: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, mask, lung field): this image's pose, lesions and noise on a patient's anatomy."""
    if size < 32:
        raise ValueError(f"phantoms need size >= 32, got {size}")
    # Pose: pixel centres mapped into patient coordinates by a small rotation, zoom and shift.
    angle, zoom = rng.uniform(-0.04, 0.04), rng.uniform(0.96, 1.04)
    u = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    c, s = np.float32(np.cos(angle) / zoom), np.float32(np.sin(angle) / zoom)
    sx, sy = rng.uniform(-0.02, 0.02, 2)
    x = (c * u[None, :] - s * u[:, None]) + np.float32(0.5 + sx)
    y = (s * u[None, :] + c * u[:, None]) + np.float32(0.5 + sy)

    air, med = _fields(anat, x, y)
    lung = air > 0.3
    mask = np.zeros((size, size), bool)
    fill = np.zeros_like(x)
    for _ in range(rng.integers(1, 4) if pneumonia else 0):
        opacity = _lesion(anat, rng, x, y)
        mask |= opacity > _MASK_LEVEL
        fill += np.float32(rng.uniform(0.35, 0.85)) * opacity
    mask &= lung

    d = np.abs(x - anat["mid"])
    body = np.sqrt(np.clip(1 - ((d / 0.47) ** 2 + ((y - 0.62) / 0.62) ** 2), 0, 1))
    # Posterior ribs: arcs rising from the spine and falling laterally, spaced wider going down.
    t = np.clip((y + 0.3 * d - anat["rib_bend"] * d * d - anat["rib_top"]) / 0.7, 0, None)
    ribs = ((1 + np.cos(np.float32(2 * np.pi * 0.7 / anat["rib_gap"]) * t ** 0.9)) / 2) ** 6
    cage = _inside((d / 0.36) ** 2 + ((y - 0.47) / 0.32) ** 2, 0.3) * (t > 0)
    clavicle = np.exp(-((y - 0.155 + 0.25 * d - 0.25 * d * d) / 0.013) ** 2) * _inside((d / 0.3) ** 2, 0.5)
    spine = _inside((d / 0.03) ** 2, 0.5) * (0.8 + 0.2 * np.cos(np.float32(2 * np.pi / 0.055) * y))

    att = (anat["tissue"] * body + 0.22 * med + 0.12 * spine
           - anat["depth"] * air * (1 - np.clip(fill, 0, 0.9))
           + body * (0.14 * ribs * cage + 0.16 * clavicle)
           + 0.05 * _wave_field(anat["mottle"], x, y))
    image = 1 - np.exp(-2.2 * att * np.float32(rng.uniform(0.9, 1.1)))  # film response
    image *= 1 + 0.03 * rng.standard_normal((size, size), np.float32)  # speckle
    image += 0.015 * rng.standard_normal((size, size), np.float32)
    image = np.clip(image * 290, 0, 255).astype(np.uint8)
    return image[..., None], mask.astype(np.uint8)[..., None], lung


def phantom(rng: np.random.Generator, size: int, pneumonia: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image. Returns (image uint8 (size, size, 1), mask uint8 (size, size, 1) with values in {0, 1})."""
    image, mask, _ = _render(_anatomy(rng), rng, size, pneumonia)
    return image, mask


def examples(count: int, size: int, seed: int, *, pneumonia_fraction: float = 0.5) -> Iterator[dict]:
    """Yields exactly `count` dicts: {"image", "mask", "label" (int 0=NORMAL, 1=PNEUMONIA), "patient_id" (str), "file_name" (str)}.

    Patients hold 1-3 images sharing label and anatomy; the label is drawn per patient.
    rng [seed, p, 0] is patient p's, [seed, p, j] its j-th image's (j from 1).
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
