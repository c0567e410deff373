"""Intensity normalisation of one X-ray: a lever against acquisition shift (issue 22).

Films of another hospital, scanner or exposure differ first in their grey levels. Mapping each
image through its own histogram makes a brighter, darker or differently curved film look
alike to the model, in training, evaluation and prediction (`augment.model_input`).

Pure jnp on one float32 (H, W, C) image in [0, 1], quantised to the 256 levels of the stored
uint8 images: it runs inside the jitted train step under vmap, on a batch sharded over
devices, so it uses no host callback and no custom call. Histograms are scatter-adds: on a
2-core CPU those of 32 images of 224 px took 18 ms that way, 3.4 s as one-hot sums.
"""

import jax
import jax.numpy as jnp

METHODS = ("none", "equalize", "clahe")
LEVELS = 256
"""Grey levels of the histograms: those of the uint8 images the data set stores."""
TILES = (8, 8)
"""CLAHE's grid (rows, cols), OpenCV's default: fine enough to lift local contrast in each
lung field, coarse enough that a tile of a 64 px image still holds 64 pixels."""
CLIP_LIMIT = 2.0
"""CLAHE's clip limit as a multiple of the mean bin count (OpenCV's default clipLimit): it caps
how steep a tile's mapping can get, so the noise of a flat region is not stretched to full
range."""


def normalize(x: jax.Array, method: str) -> jax.Array:
    """One float32 (H, W, C) image in [0, 1] -> the same shape in [0, 1], each channel alone.
    "none" returns `x` itself."""
    if method == "none":
        return x
    if method not in METHODS:
        raise ValueError(f"intensity method {method!r}: unknown; choose one of "
                         f"{', '.join(METHODS)}")
    levels = jnp.clip(jnp.floor(x * (LEVELS - 1) + 0.5), 0, LEVELS - 1).astype(jnp.int32)
    one = _equalize if method == "equalize" else _clahe
    return jax.vmap(one, in_axes=-1, out_axes=-1)(levels)


def _histogram(levels: jax.Array, bins: jax.Array | int = 0, count: int = 1) -> jax.Array:
    """(count, LEVELS) float32 counts of int `levels`, each pixel into histogram `bins` (an
    array of the same shape, or one for all)."""
    return jnp.zeros((count, LEVELS), jnp.float32).at[bins, levels].add(1.0)


def _equalize(levels: jax.Array) -> jax.Array:
    """(H, W) -> (H, W) through the cumulative histogram, as OpenCV's equalizeHist: the darkest
    level present goes to 0, the brightest to 1. A flat image keeps its level."""
    cdf = jnp.cumsum(_histogram(levels)[0])
    low, n = cdf[jnp.min(levels)], levels.size
    lut = (cdf - low) / jnp.maximum(n - low, 1.0)
    return jnp.where(low < n, lut[levels], levels / (LEVELS - 1))


def _clahe(levels: jax.Array) -> jax.Array:
    """(H, W) -> (H, W): contrast-limited adaptive histogram equalisation (Zuiderveld 1994) as
    OpenCV's createCLAHE defines it: per tile a histogram clipped at CLIP_LIMIT times its mean
    bin, the excess spread evenly over all bins, its cumulative sum as the tile's mapping;
    each pixel maps through the four nearest tiles', blended bilinearly between tile centres
    (tiles at the border clamp). A size that TILES does not divide is padded at the bottom
    and right by reflection. Unlike OpenCV, mappings stay float (not rounded to uint8), the
    limit is not truncated to an integer, and tile centres sit at pixel centres."""
    h, w = levels.shape
    (ty, tx) = TILES
    padded = jnp.pad(levels, ((0, -h % ty), (0, -w % tx)), mode="reflect")
    th, tw = padded.shape[0] // ty, padded.shape[1] // tx
    # Each pixel into its tile's histogram: reshaping the image into tiles instead is refused
    # for a batch sharded with explicit axes.
    tile = (jnp.arange(padded.shape[0]) // th)[:, None] * tx + jnp.arange(padded.shape[1]) // tw
    hist = _histogram(padded, tile, ty * tx)  # (ty * tx, LEVELS)
    limit = max(CLIP_LIMIT * th * tw / LEVELS, 1.0)
    excess = jnp.sum(jnp.maximum(hist - limit, 0.0), axis=-1, keepdims=True)
    lut = jnp.cumsum(jnp.minimum(hist, limit) + excess / LEVELS, axis=-1) / (th * tw)
    lut = jnp.minimum(lut, 1.0)  # rounding may overshoot 1 by an ulp

    def neighbours(n: int, size: int, count: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Per pixel along one axis: the tile before and after it (clamped), and the weight
        of the one after."""
        t = (jnp.arange(n) + 0.5) / size - 0.5
        first = jnp.floor(t)
        return (jnp.clip(first, 0, count - 1).astype(jnp.int32),
                jnp.clip(first + 1, 0, count - 1).astype(jnp.int32), t - first)

    r0, r1, a = neighbours(h, th, ty)
    c0, c1, b = neighbours(w, tw, tx)

    def mapped(rows: jax.Array, cols: jax.Array) -> jax.Array:
        return lut[rows[:, None] * tx + cols[None, :], levels]

    a, b = a[:, None], b[None, :]
    return ((1 - a) * ((1 - b) * mapped(r0, c0) + b * mapped(r0, c1))
            + a * ((1 - b) * mapped(r1, c0) + b * mapped(r1, c1)))
