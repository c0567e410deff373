"""Acquisition shifts: what another hospital's films may do to the same chests, in numpy.

    from pneumojax import shifts
    shifted = shifts.apply("blur", 1, images)    # uint8 (N, H, W, 1) -> same; level 1 = strong

A proxy for a new cohort (`pneumojax.cohort`) scores validation under each shift at a mild and
a strong severity (`LEVELS`). The shifts are chosen by us, not measured on another hospital:
they say how fragile a model is to each kind of change, not how it will score elsewhere.

They run host side, outside any training step, and share no code with the training
augmentation (`pneumojax.data.augment`): a proxy that reused the training transforms would
mostly reward having trained on them. Exposure and contrast overlap augment's brightness and
contrast families in kind, so their levels lie beyond augment's default ranges (±0.1).

Each function takes uint8 (N, H, W, 1), a severity (0 = unchanged, except where the docstring
says) and a generator, and returns uint8 of the same shape. `apply` gives each image its own
generator, seeded from (seed, shift, level, the image's bytes): every run, batch size and order
sees identical shifted images.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Shift = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
LEVEL_NAMES = ("mild", "strong")


def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _pil_each(images: np.ndarray, f: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """`f` on each (H, W) image as a PIL "L" image; f must keep the size."""
    return np.stack([np.asarray(f(Image.fromarray(im[..., 0], "L")))[..., None] for im in images])


def exposure_up(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Brighter films: gain 1 + s and offset s / 4, highlights clipping as on a burnt film."""
    return _uint8(_unit(images) * (1 + s) + s / 4)


def exposure_down(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Darker films: gain 1 - s and offset -s / 4."""
    return _uint8(_unit(images) * (1 - s) - s / 4)


def gamma(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Another display curve: x ** 2**s (s > 0 darkens the mid-tones, s < 0 lifts them)."""
    return _uint8(_unit(images) ** np.float32(2.0 ** s))


def _contrast(images: np.ndarray, factor: float) -> np.ndarray:
    x = _unit(images)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _uint8(mean + (x - mean) * factor)


def contrast_low(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Flatter films: deviations from each image's mean scaled by 1 - s."""
    return _contrast(images, 1 - s)


def contrast_high(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Harder films: deviations from each image's mean scaled by 1 + s."""
    return _contrast(images, 1 + s)


def _blur_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    r = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    padded = np.pad(x, pad, mode="reflect" if x.shape[axis] > r else "edge")
    n = x.shape[axis]
    return sum(w * np.take(padded, np.arange(i, i + n), axis=axis) for i, w in enumerate(kernel))


def blur(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Softer focus: a Gaussian of sigma s x the image side (the same blur of the film at any
    input size), as two 1-D convolutions, edges reflected. At small inputs a mild blur is
    lost in the downsampling (sigma 0.25 px at 64 px barely moves a pixel), as on the film."""
    sigma = s * min(images.shape[1:3])
    if sigma <= 0:
        return images.copy()
    t = np.arange(-int(np.ceil(3 * sigma)), int(np.ceil(3 * sigma)) + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    return _uint8(_blur_axis(_blur_axis(_unit(images), kernel, 1), kernel, 2))


def noise(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """A noisier detector: Gaussian of variance s² (1 + x) / 2, a constant (electronic) part
    and a part growing with the signal x (quantum, Poisson-like), in [0, 1] units."""
    x = _unit(images)
    return _uint8(x + s * np.sqrt((1 + x) / 2) * rng.standard_normal(x.shape, np.float32))


def resolution(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """A coarser detector or scan: each side shrunk to (1 - s) of it, then enlarged back
    (bilinear both ways, PIL's antialiasing on the way down)."""
    h, w = images.shape[1:3]
    small = (max(1, round(w * (1 - s))), max(1, round(h * (1 - s))))
    if small == (w, h):
        return images.copy()
    bilinear = Image.Resampling.BILINEAR
    return _pil_each(images, lambda im: im.resize(small, bilinear).resize((w, h), bilinear))


def jpeg(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Lossy archiving: JPEG recompression at quality round(100 (1 - s)), at least 1. At s = 0
    the images are returned as they are (quality 100 is still lossy, but is no shift)."""
    if s <= 0:
        return images.copy()
    quality = max(1, round(100 * (1 - s)))

    def recompress(im: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("L")
    return _pil_each(images, recompress)


def border(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """A film scanned with a margin: a black frame of about s x the side on each edge, the
    image shrunk into what is left, placed off centre by up to half the margin."""
    n, h, w, _ = images.shape
    mh, mw = round(s * h), round(s * w)
    if mh == 0 and mw == 0:
        return images.copy()
    inner = (max(1, w - 2 * mw), max(1, h - 2 * mh))
    out = np.zeros_like(images)
    for i, im in enumerate(images):
        top = mh + int(rng.integers(-(mh // 2), mh // 2 + 1))
        left = mw + int(rng.integers(-(mw // 2), mw // 2 + 1))
        small = Image.fromarray(im[..., 0], "L").resize(inner, Image.Resampling.BILINEAR)
        out[i, top:top + inner[1], left:left + inner[0], 0] = np.asarray(small)
    return out


_MARKER_TEXT = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE")


def _glyphs(text: str) -> np.ndarray:
    """White-on-black bool mask of `text` in PIL's default font, cropped to the ink."""
    font = ImageFont.load_default()
    canvas = Image.new("L", (12 * len(text) + 8, 24))
    ImageDraw.Draw(canvas).text((2, 2), text, fill=255, font=font)
    return canvas.crop(canvas.getbbox())


def markers(images: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Burnt-in annotations, as on real films: a side marker ("R"/"L") s x the height tall in
    one corner, and a white label box with a word of text in the opposite corner."""
    n, h, w, _ = images.shape
    tall = round(s * h)
    if tall == 0:
        return images.copy()
    out = images.copy()
    for i in range(n):
        im = Image.fromarray(out[i, ..., 0], "L")
        corner = int(rng.integers(4))  # 0 top left, 1 top right, 2 bottom right, 3 bottom left
        for k, text in enumerate((_MARKER_TEXT[int(rng.integers(2))],
                                  _MARKER_TEXT[2 + int(rng.integers(4))])):
            glyphs = _glyphs(text)
            gw = max(1, round(glyphs.width * tall / glyphs.height))
            mask = glyphs.resize((min(gw, w // 2), tall), Image.Resampling.NEAREST)
            c = (corner + 2 * k) % 4
            pad = max(1, h // 32)
            x = pad if c in (0, 3) else w - mask.width - pad
            y = pad if c in (0, 1) else h - mask.height - pad
            if k == 1:  # the label: a white box, the word cut out of it in black
                im.paste(255, (max(0, x - pad), max(0, y - pad),
                               min(w, x + mask.width + pad), min(h, y + mask.height + pad)))
                im.paste(0, (x, y), mask)
            else:
                im.paste(255, (x, y), mask)
        out[i, ..., 0] = np.asarray(im)
    return out


SHIFTS: dict[str, Shift] = {f.__name__: f for f in (
    exposure_up, exposure_down, gamma, contrast_low, contrast_high, blur, noise, resolution,
    jpeg, border, markers)}
# (mild, strong) severity of each shift, in its own units (see its docstring).
LEVELS: dict[str, tuple[float, float]] = {
    "exposure_up": (0.1, 0.25),
    "exposure_down": (0.1, 0.25),
    "gamma": (0.3, 0.7),          # x ** 1.23, x ** 1.62
    "contrast_low": (0.25, 0.5),
    "contrast_high": (0.25, 0.6),
    "blur": (0.004, 0.01),        # 0.9 and 2.2 px at 224 px
    "noise": (0.03, 0.08),
    "resolution": (0.5, 0.75),    # half, quarter of each side
    "jpeg": (0.7, 0.9),           # quality 30, 10
    "border": (0.05, 0.12),
    "markers": (0.08, 0.15),
}


def apply(name: str, level_index: int, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Shift `name` at `LEVELS[name][level_index]` on uint8 (N, H, W, 1); each image draws
    from its own generator, so its result does not depend on the batch it comes in."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; valid: {', '.join(SHIFTS)}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images must be uint8 (N, H, W, 1), got {images.dtype} {images.shape}")
    severity = LEVELS[name][level_index]
    shift = SHIFTS[name]
    out = [shift(im[None], severity, np.random.default_rng(
               [seed, zlib.crc32(name.encode()), level_index, zlib.crc32(im.tobytes())]))
           for im in images]
    return np.concatenate(out) if out else images.copy()
