"""Grad-CAM, Grad-CAM++ and HiResCAM for any `pneumojax.models` model, batched and jitted.

A stage activation is an output of the model, not an input, so jax.grad cannot take it
directly, and the models carry no hooks. Instead the forward pass is traced to a jaxpr and
evaluated again with a zero `delta` added where the stage's tensor is produced: every later
stage consumes the perturbed tensor (the models return the very tensors the next stage
reads), so d(score)/d(delta) at delta = 0 is d(score)/d(activation), for any architecture
and any named stage, with one forward and one backward pass.

Targets are signed logits: PNEUMONIA is the logit, NORMAL its negation. A one-logit model's
evidence for NORMAL is evidence against PNEUMONIA; pytorch-grad-cam's binary target instead
maps a negative logit to its magnitude (its issue #428), which flips the sign of the map.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jex_core

from pneumojax import models
from pneumojax.data import augment

METHODS = ("hirescam", "gradcam", "gradcam++")  # the first is the default: see `cams`
MIN_GRID = 7  # cells a side: ResNet50's last stage at 224 px, where Grad-CAM was introduced
TARGETS = {"PNEUMONIA": 1.0, "NORMAL": -1.0}


def _forward(graphdef: nnx.GraphDef, layer: str, params: nnx.State, rest: nnx.State,
             images: jax.Array) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits, inter = model(augment.to_float(images))
    if layer not in inter or inter[layer].ndim != 4:
        spatial = [k for k, v in inter.items() if v.ndim == 4]
        raise ValueError(f"no spatial stage {layer!r}; this model has {', '.join(spatial)}")
    return logits, inter[layer]


def _eval_with_delta(closed: jex_core.ClosedJaxpr, args: list, delta: jax.Array) -> list:
    """`jax.core.eval_jaxpr` of `_forward`'s jaxpr, but with `delta` added to its second
    output (the stage) at the equation that produces it, before any consumer reads it."""
    jaxpr = closed.jaxpr
    target = jaxpr.outvars[1]
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    def write(v, value) -> None:
        env[v] = value + delta if v is target else value

    for v, value in zip([*jaxpr.constvars, *jaxpr.invars], [*closed.consts, *args]):
        write(v, value)
    for eqn in jaxpr.eqns:
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*map(read, eqn.invars),
                                     **eqn.primitive.get_bind_params(eqn.params))
        for v, value in zip(eqn.outvars, out if eqn.primitive.multiple_results else [out]):
            write(v, value)
    return [read(v) for v in jaxpr.outvars]


def activation_gradients(graphdef: nnx.GraphDef, state: dict, images_uint8: jax.Array, *,
                         layer: str, target: str = "PNEUMONIA"
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits (B,), activation A (B, h, w, c) at `layer`, d score / dA), not jitted.

    `graphdef` must be in eval mode: the summed score then separates per image (batch norm
    reads running statistics), so one backward pass yields every image's own gradient.
    """
    args = (state["params"], state["rest"], images_uint8)
    closed = jax.make_jaxpr(functools.partial(_forward, graphdef, layer))(*args)
    flat = jax.tree.leaves(args)
    stage = closed.out_avals[1]

    def score(delta: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        logits, activation = _eval_with_delta(closed, flat, delta)
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
def _compiled(graphdef: nnx.GraphDef, layer: str, target: str, method: str):
    def run(params: nnx.State, rest: nnx.State, images: jax.Array) -> dict:
        logits, a, g = activation_gradients(graphdef, {"params": params, "rest": rest}, images,
                                            layer=layer, target=target)
        raw = nnx.relu(_COMBINE[method](a.astype(jnp.float32), g.astype(jnp.float32)))
        maps = jax.image.resize(raw, images.shape[:3], "bilinear")
        # Scaled by the peak, not min-max stretched: zero stays "no evidence", so the share
        # of a map's mass inside a region is not inflated by subtracting a floor.
        peak = maps.max(axis=(1, 2), keepdims=True)
        return {"raw": raw, "maps": maps / jnp.where(peak > 0, peak, 1),
                "probability": jax.nn.sigmoid(logits), "score": TARGETS[target] * logits}

    return jax.jit(run)


def cams(graphdef: nnx.GraphDef, state: dict, images_uint8: jax.Array, *, layer: str,
         target: str = "PNEUMONIA", method: str = METHODS[0]) -> dict[str, jax.Array]:
    """Class activation maps of a batch of uint8 (B, H, W, C) images.

    Returns {"raw": (B, h, w) at the layer's resolution after ReLU, "maps": (B, H, W)
    bilinearly upsampled and scaled to [0, 1] per image, "probability": (B,) P(PNEUMONIA),
    "score": (B,) the target's score}. `state` is {params, rest, ...} as `train.restore`
    returns it, with its eval `graphdef`. Compiled once per (graphdef, layer, target, method)
    and input shape.

    The default method is HiResCAM (Draelos & Carin 2020): it sums gradient x activation per
    cell, where Grad-CAM first averages the gradient over the grid and so can paint cells the
    score does not depend on. On the real validation images Grad-CAM failed the deletion test
    (blurring its top pixels cost less than blurring random ones) where HiResCAM passed:
    experiments/results/deletion.json. At a last stage followed by global pooling the two
    coincide.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    return _compiled(graphdef, layer, target, method)(state["params"], state["rest"],
                                                      jnp.asarray(images_uint8))


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
    radius = max(1, int(3 * sigma))
    k = jnp.exp(-0.5 * (jnp.arange(-radius, radius + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(images.dtype)
    x = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    x = jnp.apply_along_axis(lambda r: jnp.convolve(r, k, mode="valid"), 1, x)
    return jnp.apply_along_axis(lambda r: jnp.convolve(r, k, mode="valid"), 2, x)


@functools.lru_cache(maxsize=8)
def _compiled_deletion(graphdef: nnx.GraphDef, count: int, sigma: float):
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
        x = augment.to_float(images)
        blurred = gaussian_blur(x, sigma)
        noise = jax.random.uniform(key, maps.shape)
        return {name: probability(params, rest, v) for name, v in (
            ("original", x), ("salient", blur_top(x, blurred, maps)),
            ("random", blur_top(x, blurred, noise)))}

    return jax.jit(run)


def deletion(graphdef: nnx.GraphDef, state: dict, images_uint8: jax.Array, maps: jax.Array, *,
             fraction: float = 0.2, sigma: float | None = None, seed: int = 0
             ) -> dict[str, jax.Array]:
    """Faithfulness by deletion (Samek et al. 2017; Petsiuk et al. 2018): P(PNEUMONIA) of each
    image as it is ("original"), with the `fraction` of its pixels that `maps` rank highest
    blurred ("salient"), and with as many pixels drawn at random blurred ("random").

    If a map shows what the model uses, removing its top pixels must cost more probability
    than removing the same number anywhere. Blurring (default sigma: 1/16 of the image side)
    removes detail without the out-of-distribution black holes that zeroing would punch.
    Exactly round(fraction * H * W) pixels per image are blurred, ties broken by position.
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
    return _compiled_deletion(graphdef, count, sigma)(
        state["params"], state["rest"], images_uint8, jnp.asarray(maps, jnp.float32),
        jax.random.key(seed))
