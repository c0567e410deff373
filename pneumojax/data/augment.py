"""Per-example chest X-ray augmentation, on the accelerator, in pure JAX.

It runs inside the jitted train step, so the grain host pipeline and the
device-resident pipeline share one implementation, and a batch sharded along B
needs no communication (no host callbacks, no custom calls).

Coordinates are (row, col) with rows pointing down, as an image is displayed.
A positive rotation turns the image counter-clockwise on screen: a point right
of the centre moves up (towards row 0).
"""

import dataclasses
import functools
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from pneumojax.data.intensity import normalize


def family(draws: int, kind: str, off: Any) -> dict[str, Any]:
    """Field metadata that makes a config field an augmentation family: `draws` U(0, 1) numbers
    per example, from a key folded in from the field's name; the family is on unless the
    field's value is `off` (its identity)."""
    return {"draws": draws, "kind": kind, "off": off}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Sampling ranges. Frozen, hence hashable, so it can be a static jit argument.

    Each field but `enabled` is a family of augmentation (its `family` metadata): it is on
    when its value is not the identity, and draws its own random numbers by its name
    (`draws`), so adding a family is adding a field and shifts no other family's draws.
    """

    enabled: bool = True
    # angle ~ U(-r, r)
    rotation_deg: float = dataclasses.field(default=10.0, metadata=family(1, "geometric", 0.0))
    # shift ~ U(-t, t) * size, independently in rows and columns
    translate: float = dataclasses.field(default=0.08, metadata=family(2, "geometric", 0.0))
    # scale ~ U(lo, hi)
    zoom: tuple[float, float] = dataclasses.field(
        default=(0.9, 1.1), metadata=family(1, "geometric", (1.0, 1.0)))
    # off by default: a mirrored chest film shows the heart on the wrong side
    hflip: bool = dataclasses.field(default=False, metadata=family(1, "geometric", False))
    # additive delta ~ U(-b, b), images in [0, 1]
    brightness: float = dataclasses.field(default=0.1, metadata=family(1, "photometric", 0.0))
    # factor ~ U(1-c, 1+c) around the per-image mean
    contrast: float = dataclasses.field(default=0.1, metadata=family(1, "photometric", 0.0))
    # The next three mimic another scanner or exposure (issue 22); off by default.
    # exponent ~ exp(U(-g, g)): x ** exponent, a film's tone curve
    gamma: float = dataclasses.field(default=0.0, metadata=family(1, "photometric", 0.0))
    # Gaussian blur, sigma ~ U(0, s) pixels: a softer detector or resampling
    blur: float = dataclasses.field(default=0.0, metadata=family(1, "photometric", 0.0))
    # additive Gaussian noise, std ~ U(0, n): a lower dose (its field: `_random_photometric`)
    noise: float = dataclasses.field(default=0.0, metadata=family(1, "photometric", 0.0))

    def __post_init__(self) -> None:
        # Configs may hand over a list, which would make the dataclass unhashable.
        object.__setattr__(self, "zoom", tuple(float(z) for z in self.zoom))

    def families(self, kind: str | None = None) -> dict[str, int]:
        """The families that are on (of `kind`, if given), each with its number of draws."""
        return {f.name: f.metadata["draws"] for f in dataclasses.fields(self)
                if "draws" in f.metadata and getattr(self, f.name) != f.metadata["off"]
                and kind in (None, f.metadata["kind"])}

    @property
    def geometric(self) -> bool:
        """Whether any warp is sampled; if not, the per-example gather is skipped."""
        return bool(self.families("geometric"))

    @property
    def photometric(self) -> bool:
        return bool(self.families("photometric"))


def stream(name: str) -> int:
    """The constant a family's name folds into the key: a CRC-32 of the name, the same in
    every process and release (Python's `hash` of a string is salted per process)."""
    return zlib.crc32(name.encode())


def draws(key: jax.Array, config: AugmentConfig) -> dict[str, jax.Array]:
    """One example's random numbers: for each family that is on, its own U(0, 1) draws from
    `fold_in(key, stream(name))`. A family's draws depend on the key and its name alone."""
    return {name: jax.random.uniform(jax.random.fold_in(key, stream(name)), (n,))
            for name, n in config.families().items()}


def to_float(images: jax.Array) -> jax.Array:
    """uint8 -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def model_input(images_uint8: jax.Array, intensity: str) -> jax.Array:
    """uint8 (B, H, W, C) -> the float32 batch a model reads: `to_float`, then each image's
    intensity normalisation. Evaluation, prediction and Grad-CAM all start here, and training
    applies the same `normalize` (in `augment_image`), so a model never sees another input."""
    return jax.vmap(functools.partial(normalize, method=intensity))(to_float(images_uint8))


TTA_VIEWS = ((1.0, 0.0, 0.0), (1.06, 0.0, 0.0), (0.94, 0.0, 0.0), (1.0, 0.04, 0.0),
             (1.0, -0.04, 0.0), (1.0, 0.0, 0.04), (1.0, 0.0, -0.04))
"""Test-time views as (zoom, row shift, column shift as fractions of the size), the identity
first: small zooms and shifts inside the default training ranges, so each view is one the model
has seen the like of. No horizontal flip: a mirrored film shows the heart on the wrong side."""


def tta_views(x: jax.Array, views: int) -> list[jax.Array]:
    """The first `views` of TTA_VIEWS of a normalised float batch (B, H, W, C). View 0 is `x`
    itself, so one view is exactly the input without test-time augmentation."""
    if not 1 <= views <= len(TTA_VIEWS):
        raise ValueError(f"views={views}: must be from 1 to {len(TTA_VIEWS)} (TTA_VIEWS)")
    size = x.shape[1:3]
    return [x] + [jax.vmap(warp, in_axes=(0, None))(x, affine_matrix(
        size, 0.0, zoom, jnp.array([rows * size[0], cols * size[1]]), False))
        for zoom, rows, cols in TTA_VIEWS[1:views]]


def affine_matrix(
    size: tuple[int, int],
    rotation: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    flip: jax.Array,
) -> jax.Array:
    """3x3 FORWARD map from input pixel coordinates (row, col, 1) to output coordinates.

    About the image centre: flip columns if `flip`, then rotate by `rotation`
    radians (positive = counter-clockwise as displayed), scale (>1 zooms in),
    then shift by (rows, cols) pixels.
    """
    h, w = size
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
    rotation = jnp.asarray(rotation, jnp.float32)
    # On (row, col) offsets with rows down, cos * I + sin * [[0, -1], [1, 0]] turns
    # counter-clockwise on screen; the flip negates the column offset: the second column.
    quarter_turn = jnp.array([[0.0, -1.0], [1.0, 0.0]])
    rotate = jnp.cos(rotation) * jnp.eye(2) + jnp.sin(rotation) * quarter_turn
    linear = scale * rotate * jnp.where((jnp.arange(2) == 1) & flip, -1.0, 1.0)
    translation = centre + jnp.asarray(shift, jnp.float32) - linear @ centre
    # Padded and added, never concatenated: under vmap with explicit sharding, concatenating
    # a constant or unbatched block onto a batch-sharded one is an error.
    return (
        jnp.pad(linear, ((0, 1), (0, 1)))
        + jnp.pad(translation[:, None], ((0, 1), (2, 0)))
        + jnp.diag(jnp.array([0.0, 0.0, 1.0]))
    )


def _invert_affine(forward: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Closed-form inverse as (2x2 linear, translation).

    Elementwise only, unlike jnp.linalg.inv's batched LU custom call.
    """
    (a, b), (c, d) = forward[0, :2], forward[1, :2]
    linear = jnp.array([[d, -b], [-c, a]]) / (a * d - b * c)
    return linear, -linear @ forward[:2, 2]


def warp(image: jax.Array, forward: jax.Array) -> jax.Array:
    """(H, W, C) float -> (H, W, C): output pixel p samples the input at inverse(forward) @ p.

    Bilinear, zero outside (X-ray background is black). Matches
    jax.scipy.ndimage.map_coordinates(order=1, mode="constant", cval=0), but fetches
    the four corners of every pixel, all channels, in a single gather.
    """
    h, w, _ = image.shape
    linear, translation = _invert_affine(forward)
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")).astype(jnp.float32)
    src = jnp.einsum("ij,jhw->ihw", linear, grid) + translation[:, None, None]  # (2, H, W)
    base = jnp.floor(src)
    frac = src - base
    offsets = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]])[:, :, None, None]  # (4, 2, 1, 1)
    corner = base.astype(jnp.int32)[None] + offsets  # (4, 2, H, W)
    weight = jnp.prod(jnp.where(offsets == 1, frac[None], 1.0 - frac[None]), axis=1)
    limit = jnp.array([h, w])[None, :, None, None]
    inside = jnp.all((corner >= 0) & (corner < limit), axis=1)
    corner = jnp.clip(corner, 0, limit - 1)
    values = image[corner[:, 0], corner[:, 1]]  # (4, H, W, C)
    return jnp.sum(jnp.where(inside, weight, 0.0)[..., None] * values, axis=0)


def _between(u: jax.Array, lo: float, hi: float) -> jax.Array:
    return lo + (hi - lo) * u


def _random_affine(u: dict[str, jax.Array], config: AugmentConfig,
                   size: tuple[int, int]) -> jax.Array:
    """Geometry from the draws of the geometric families that are on; the others are identity."""
    r, t = config.rotation_deg, config.translate
    rotation = jnp.deg2rad(_between(u["rotation_deg"][0], -r, r)) if "rotation_deg" in u else 0.0
    scale = _between(u["zoom"][0], *config.zoom) if "zoom" in u else 1.0
    shift = (_between(u["translate"], -t, t) * jnp.array(size, jnp.float32)
             if "translate" in u else jnp.zeros(2))
    flip = u["hflip"][0] < 0.5 if "hflip" in u else False
    return affine_matrix(size, rotation, scale, shift, flip)


def gaussian_blur(image: jax.Array, sigma: jax.Array | float, radius: int) -> jax.Array:
    """Separable Gaussian blur of one float (H, W, C) image, edges replicated, as 2 * radius
    + 1 weighted shifted copies per axis: `sigma` may differ per example under vmap, where a
    convolution with a per-example kernel would not batch cheaply."""
    k = jnp.arange(-radius, radius + 1)
    w = jnp.exp(-0.5 * (k / jnp.maximum(sigma, 1e-3)) ** 2)  # sigma -> 0: the identity
    w = (w / w.sum()).astype(image.dtype)
    for axis in (0, 1):
        n = image.shape[axis]
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(image, pad, mode="edge")
        image = sum(w[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
                    for i in range(2 * radius + 1))
    return image


def _random_photometric(x: jax.Array, key: jax.Array, u: dict[str, jax.Array],
                        config: AugmentConfig) -> jax.Array:
    """Contrast about the per-image mean, brightness, gamma, blur, then noise, each if its
    family is on. The noise field comes from `fold_in(key, stream("noise field"))`, a name no
    family has, so it shifts no family's draws."""
    b, c, g = config.brightness, config.contrast, config.gamma
    if "contrast" in u:
        mean = jnp.mean(x)
        x = (x - mean) * _between(u["contrast"][0], 1.0 - c, 1.0 + c) + mean
    if "brightness" in u:
        x = x + _between(u["brightness"][0], -b, b)
    if "gamma" in u:  # clipped first: a power of a negative number is not a grey level
        x = jnp.clip(x, 0.0, 1.0) ** jnp.exp(_between(u["gamma"][0], -g, g))
    if "blur" in u:
        x = gaussian_blur(x, config.blur * u["blur"][0], math.ceil(3 * config.blur))
    if "noise" in u:
        field = jax.random.normal(jax.random.fold_in(key, stream("noise field")), x.shape)
        x = x + config.noise * u["noise"][0] * field
    return x


def augment_image(image: jax.Array, key: jax.Array, config: AugmentConfig,
                  mask: jax.Array | None = None, intensity: str = "none"
                  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """uint8 (H, W, C) -> float32 (H, W, C) in [0, 1]; one example of augment_batch.

    Photometric first, then the intensity normalisation (`intensity.normalize`), then the
    warp: the normalisation meets a simulated scanner as it would a real one, and the warp's
    zero fill stays black rather than picking up a brightness shift or a histogram. Each
    family draws by its name (`draws`), so turning one on or adding one leaves the others'
    numbers as they were. A lesion `mask` (H, W, 1) takes the same warp as extra channels,
    in the same gather, and comes back as float32 in [0, 1] (bilinear, soft at its edge).
    """
    x = to_float(image)
    m = None if mask is None else mask.astype(jnp.float32)
    if not config.enabled:
        x = normalize(x, intensity)
        return x if m is None else (x, m)
    u = draws(key, config)
    if config.photometric:
        x = _random_photometric(x, key, u, config)
    x = normalize(x, intensity)
    if config.geometric:
        c = x.shape[-1]
        x = warp(x if m is None else jnp.concatenate([x, m], -1),
                 _random_affine(u, config, x.shape[:2]))
        x, m = (x, m) if m is None else (x[..., :c], x[..., c:])
    x = jnp.clip(x, 0.0, 1.0)
    return x if m is None else (x, m)


@functools.partial(jax.jit, static_argnames=("config", "intensity"))
def augment_batch(images: jax.Array, key: jax.Array, config: AugmentConfig,
                  masks: jax.Array | None = None, intensity: str = "none"
                  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """uint8 (B, H, W, C) -> float32 (B, H, W, C) in [0, 1]; with lesion `masks`
    (B, H, W, 1), (images, masks) warped alike. `intensity` names the normalisation
    (`intensity.METHODS`).

    One key per example (jax.random.split(key, B)), vmapped. Exactly
    model_input(images, intensity) when config.enabled is False. Jitted so that eager
    callers (plots, notebooks) don't dispatch op by op; inside the train step it inlines.
    """
    if not config.enabled:
        x = model_input(images, intensity)
        return x if masks is None else (x, masks.astype(jnp.float32))
    keys = jax.random.split(key, images.shape[0])
    # Under explicit sharding vmap wants the keys split over devices exactly like the images.
    sharding = jax.typeof(images).sharding
    if sharding.spec[0] is not None:
        keys = jax.sharding.reshard(keys, sharding.update(spec=jax.P(sharding.spec[0])))
    one = functools.partial(augment_image, config=config, intensity=intensity)
    if masks is None:
        return jax.vmap(one)(images, keys)
    return jax.vmap(lambda x, k, m: one(x, k, mask=m))(images, keys, masks)
