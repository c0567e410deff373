"""Grad-CAM, Grad-CAM++ and HiResCAM for any `pneumojax.models` model, batched and jitted.

A stage activation is an output of the model, not an input, so jax.grad cannot take it
directly, and the models carry no hooks. Instead every model records its stages through
`pneumojax.models.stages.stage` and goes on with the tensor that returns; under
`stages.perturbed({layer: delta})` that tensor is the activation plus `delta`, which every
later layer reads. So jax.grad of the score as a function of a zero `delta` is
d(score)/d(activation), for any architecture and any named stage, with one forward and one
backward pass and public JAX only. A stage recorded beside the computation has no gradient,
and `cams` refuses it rather than draw a blank map.

Targets are signed logits: PNEUMONIA is the logit, NORMAL its negation. A one-logit model's
evidence for NORMAL is evidence against PNEUMONIA. pytorch-grad-cam's
`BinaryClassifierOutputTarget` does the same since release 1.5.0 (category 0 negates the
logit); earlier releases mapped a negative logit to its magnitude (its issue #428), which
flipped the sign of the map.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pneumojax import models
from pneumojax.data import augment
from pneumojax.models import stages

METHODS = ("hirescam", "gradcam", "gradcam++")  # the first is the default: see `cams`
MIN_GRID = 7  # cells a side: ResNet50's last stage at 224 px, where Grad-CAM was introduced
TARGETS = {"PNEUMONIA": 1.0, "NORMAL": -1.0}


def _forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, x: jax.Array,
             layer: str, deltas: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(logits, the activation at `layer`) of float images `x`, with `deltas` added to the
    stages they name (`stages.perturbed`)."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    with stages.perturbed(deltas):
        logits, inter = model(x)
    if layer not in inter or inter[layer].ndim != 4:
        spatial = [k for k, v in inter.items() if v.ndim == 4]
        raise ValueError(f"no spatial stage {layer!r}; this model has {', '.join(spatial)}")
    return logits, inter[layer]


def activation_gradients(graphdef: nnx.GraphDef, state: dict, images_uint8: jax.Array, *,
                         layer: str, target: str = "PNEUMONIA", intensity: str = "none"
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits (B,), activation A (B, h, w, c) at `layer`, d score / dA), not jitted.

    `graphdef` must be in eval mode: the summed score then separates per image (batch norm
    reads running statistics), so one backward pass yields every image's own gradient.
    """
    forward = functools.partial(_forward, graphdef, state["params"], state["rest"],
                                augment.model_input(images_uint8, intensity), layer)
    stage = jax.eval_shape(forward, {})[1]  # traced only: nothing runs

    def score(delta: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        logits, activation = forward({layer: delta})
        return TARGETS[target] * jnp.sum(logits), (logits, activation)

    grads, (logits, activation) = jax.grad(score, has_aux=True)(
        jnp.zeros(stage.shape, stage.dtype))
    return logits, activation, grads


def _gradcam(a: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.einsum("bhwc,bc->bhw", a, g.mean(axis=(1, 2)))


def _gradcam_pp(a: jax.Array, g: jax.Array) -> jax.Array:
    """Chattopadhay et al. (2018), eq. 19: with Y = exp(score) and a piecewise-linear head,
    Y's 2nd and 3rd derivatives are exp(score) g^2 and exp(score) g^3, so alpha needs g only.
    The weights' common factor exp(score) > 0 is dropped: the normalised map is unchanged,
    and raw maps do not overflow for confident images."""
    g2 = g * g
    denom = 2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g2 * g
    alpha = g2 / jnp.where(denom != 0, denom, 1)
    return jnp.einsum("bhwc,bc->bhw", a, (alpha * nnx.relu(g)).sum(axis=(1, 2)))


def _hirescam(a: jax.Array, g: jax.Array) -> jax.Array:
    return (a * g).sum(axis=-1)


_COMBINE = {"gradcam": _gradcam, "gradcam++": _gradcam_pp, "hirescam": _hirescam}


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, layer: str, target: str, method: str, intensity: str):
    def run(params: nnx.State, rest: nnx.State, images: jax.Array) -> dict:
        logits, a, g = activation_gradients(graphdef, {"params": params, "rest": rest}, images,
                                            layer=layer, target=target, intensity=intensity)
        raw = nnx.relu(_COMBINE[method](a.astype(jnp.float32), g.astype(jnp.float32)))
        maps = jax.image.resize(raw, images.shape[:3], "bilinear")
        # Scaled by the peak, not min-max stretched: zero stays "no evidence", so the share
        # of a map's mass inside a region is not inflated by subtracting a floor.
        peak = maps.max(axis=(1, 2), keepdims=True)
        return {"raw": raw, "maps": maps / jnp.where(peak > 0, peak, 1),
                "probability": jax.nn.sigmoid(logits), "score": TARGETS[target] * logits,
                "no_gradient": jnp.all(g == 0)}

    return jax.jit(run)


def cams(graphdef: nnx.GraphDef, state: dict, images_uint8: jax.Array, *, layer: str,
         target: str = "PNEUMONIA", method: str = METHODS[0], intensity: str = "none"
         ) -> dict[str, jax.Array]:
    """Class activation maps of a batch of uint8 (B, H, W, C) images.

    Returns {"raw": (B, h, w) at the layer's resolution after ReLU, "maps": (B, H, W)
    bilinearly upsampled and scaled to [0, 1] per image, "probability": (B,) P(PNEUMONIA),
    "score": (B,) the target's score}. `state` is {params, rest, ...} as
    `inference.load(workdir).state` holds it, with its eval `graphdef`; `intensity` is its
    `data.intensity`, so that the maps explain the very input the model reads
    (`augment.model_input`; no test-time views). Compiled once per (graphdef, layer, target,
    method, intensity) and input shape.

    The default method is HiResCAM (Draelos & Carin 2020): it sums gradient x activation per
    cell, where Grad-CAM first averages the gradient over the grid and so can paint cells the
    score does not depend on. On the real validation images Grad-CAM failed the deletion test
    (blurring its top pixels cost less than blurring random ones) where HiResCAM passed:
    experiments/results/deletion.json. At a last stage followed by global pooling the two
    coincide.

    A stage whose gradient is 0 everywhere for every image of the batch is refused with a
    ValueError rather than drawn blank (checked when `cams` is called eagerly, not under a
    trace). A map that is 0 after the ReLU (no positive evidence) is not refused.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    out = _compiled(graphdef, layer, target, method, intensity)(
        state["params"], state["rest"], jnp.asarray(images_uint8))
    try:
        no_gradient = bool(out.pop("no_gradient"))
    except jax.errors.ConcretizationTypeError:  # under a trace (jit, eval_shape): not known yet
        no_gradient = False
    if no_gradient:
        raise ValueError(
            f"stage {layer!r} has no gradient: d score / d activation is 0 everywhere for "
            f"every image, so its activation does not reach the logit (recorded beside the "
            f"computation, not as the tensor the next layer reads: pneumojax/models/stages.py)")
    return out


def default_layer(model_name: str, image_size: int, **model_kwargs) -> str:
    """The last spatial stage whose grid is at least `MIN_GRID` cells a side at `image_size`.

    The last stage holds the most class-specific features (Selvaraju et al.), but a map can
    be no finer than its grid: a 4x4 map of a 64 px X-ray (DeepCNN's fourth block) paints a
    whole lung at once, and on real images it failed the deletion test that the 8x8 stage
    before it passed (experiments/deletion.py). Found by tracing the model abstractly, so a
    model built with other `model_kwargs` (as in `config.model.kwargs`) gets its own stage.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def run() -> jax.Array:
        model = models.create(model_name, rngs=nnx.Rngs(0), **model_kwargs)
        x = jnp.zeros((1, image_size, image_size, model_kwargs.get("in_channels", 1)))
        logits, inter = model(x)
        shapes.update((k, v.shape) for k, v in inter.items() if v.ndim == 4)
        return logits

    jax.eval_shape(run)
    fine = [k for k, shape in shapes.items() if min(shape[1:3]) >= MIN_GRID]
    return fine[-1] if fine else next(iter(shapes))


def config_layer(config) -> str:
    """`default_layer` of a run's config (`model.name`, `model.kwargs`, `data.image_size`)."""
    return default_layer(config.model.name, config.data.image_size, **config.model.kwargs)


def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of float (B, H, W, C) images, edges replicated: the deletion
    test's stand-in for "this region carries no detail", keeping its mean brightness."""
    blur = functools.partial(augment.gaussian_blur, sigma=sigma, radius=max(1, int(3 * sigma)))
    return jax.vmap(blur)(images)


@functools.lru_cache(maxsize=8)
def _compiled_deletion(graphdef: nnx.GraphDef, count: int, sigma: float, intensity: str):
    def probability(params: nnx.State, rest: nnx.State, x: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, rest, copy=True)
        return jax.nn.sigmoid(model(x)[0])

    def blur_top(x: jax.Array, blurred: jax.Array, scores: jax.Array) -> jax.Array:
        flat = scores.reshape(len(scores), -1)
        top = jax.lax.top_k(flat, count)[1]
        mask = jnp.zeros_like(flat, bool).at[jnp.arange(len(flat))[:, None], top].set(True)
        return jnp.where(mask.reshape(x.shape[:3])[..., None], blurred, x)

    def run(params: nnx.State, rest: nnx.State, images: jax.Array, maps: jax.Array,
            key: jax.Array) -> dict[str, jax.Array]:
        x = augment.model_input(images, intensity)
        blurred = gaussian_blur(x, sigma)
        noise = jax.random.uniform(key, maps.shape)
        return {name: probability(params, rest, v) for name, v in (
            ("original", x), ("salient", blur_top(x, blurred, maps)),
            ("random", blur_top(x, blurred, noise)))}

    return jax.jit(run)


def deletion(graphdef: nnx.GraphDef, state: dict, images_uint8: jax.Array, maps: jax.Array, *,
             fraction: float = 0.2, sigma: float | None = None, seed: int = 0,
             intensity: str = "none") -> dict[str, jax.Array]:
    """Faithfulness by deletion (Samek et al. 2017; Petsiuk et al. 2018): P(PNEUMONIA) of each
    image as it is ("original"), with the `fraction` of its pixels that `maps` rank highest
    blurred ("salient"), and with as many pixels drawn at random blurred ("random").

    If a map shows what the model uses, removing its top pixels must cost more probability
    than removing the same number anywhere. Blurring (default sigma: 1/16 of the image side)
    removes detail without the out-of-distribution black holes that zeroing would punch.
    Exactly round(fraction * H * W) pixels per image are blurred, ties broken by position.
    The blur acts on the model's input (`augment.model_input` with the model's `intensity`).
    """
    images_uint8 = jnp.asarray(images_uint8)
    height, width = images_uint8.shape[1:3]
    if jnp.shape(maps) != images_uint8.shape[:3]:
        raise ValueError(f"maps {jnp.shape(maps)} must be (B, H, W) of images "
                         f"{images_uint8.shape}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    count = max(1, round(fraction * height * width))
    sigma = float(sigma or max(height, width) / 16)
    return _compiled_deletion(graphdef, count, sigma, intensity)(
        state["params"], state["rest"], images_uint8, jnp.asarray(maps, jnp.float32),
        jax.random.key(seed))


def deletion_summary(p: dict, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """`deletion`'s probabilities with the images' `label`s, summarised over all images and
    per true class: mean probability drops, the share of images where the salient drop is
    larger, and a bootstrap interval of the mean paired difference (salient - random drop)."""
    rng = np.random.default_rng(seed)
    result = {}
    for name, keep in (("all", np.ones_like(p["label"], bool)), ("PNEUMONIA", p["label"] == 1),
                       ("NORMAL", p["label"] == 0)):
        if not keep.any():
            continue
        salient = p["original"][keep] - p["salient"][keep]
        random = p["original"][keep] - p["random"][keep]
        diff = salient - random
        boot = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(axis=1)
        result[name] = dict(n=int(keep.sum()), drop_salient=float(salient.mean()),
                            drop_random=float(random.mean()), difference=float(diff.mean()),
                            difference_ci95=[float(np.quantile(boot, q)) for q in (0.025, 0.975)],
                            share_salient_larger=float((diff > 0).mean()))
    return result
