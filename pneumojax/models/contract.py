"""The model contract of `pneumojax.models`, checked on a tiny input by one function, `check`.

    from pneumojax.models import contract
    contract.check("deep_cnn")           # a registered name, or a class before registering it

A broken rule raises `ContractError`, one line that names the model and the rule. What is
checked, in this order: the declarations (`TRANSFER_GROUPS`, `UNFREEZE_ORDER`) and the
constructor's keywords; then, on an instance built with three input channels (abstractly,
then filled with random values from the host, which compiles no initialiser): `standardize`
holding (3,) `nnx.Variable`s; float32 parameters, each under an attribute of a declared group;
`(logits, intermediates)` with float32 logits (B,); the stages in order, spatial ones first
and `pre_logits` (B, F) last; every stage's activation gradient not identically zero,
d(sum of logits)/d(delta) with `delta` added at the stage through `stages.perturbed`, so a
stage recorded beside the computation is named; eval mode deterministic, train mode running;
float32 parameters and logits when built with `dtype=bfloat16` (abstractly: no compute);
and, where the model declares `LESION_KWARGS`, the same again with them plus its
`lesion_logits` (B, h, w).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pneumojax.models import stages

# The constructor keywords every model takes (`pneumojax.models`); configs pass them all.
KEYWORDS = ("in_channels", "dtype", "rngs", "input_mean", "input_std", "pool_r")
HEAD = "head"  # the group `train.freeze=backbone` leaves trainable


class ContractError(ValueError):
    """A model breaks the contract of `pneumojax.models`."""


def declaration_problems(cls: type) -> list[str]:
    """What is wrong with `cls`'s class-level declarations and constructor, without building it."""
    groups = getattr(cls, "TRANSFER_GROUPS", None)
    order = getattr(cls, "UNFREEZE_ORDER", None)
    if not (isinstance(groups, Mapping) and groups
            and all(isinstance(k, str) and isinstance(v, str) for k, v in groups.items())):
        return [f"{cls.__name__}.TRANSFER_GROUPS must map each top-level attribute that holds "
                f"parameters to a group name, e.g. {{'features': 'backbone', 'head': 'head'}}; "
                f"got {groups!r}"]
    if HEAD not in groups.values():
        return [f"{cls.__name__}.TRANSFER_GROUPS has no {HEAD!r} group, which train.freeze="
                "backbone trains"]
    others = sorted(set(groups.values()) - {HEAD})
    if not (isinstance(order, tuple) and len(set(order)) == len(order)
            and sorted(order) == others):
        return [f"{cls.__name__}.UNFREEZE_ORDER must be a tuple of every group but {HEAD!r} "
                f"({', '.join(others)}), top down; got {order!r}"]
    params = inspect.signature(cls.__init__).parameters
    forwards = any(p.kind is p.VAR_KEYWORD for p in params.values())  # **kwargs: tried later
    if missing := [k for k in KEYWORDS if k not in params and not forwards]:
        return [f"the constructor lacks the keyword(s) {', '.join(missing)}"]
    return []


def check(model: str | type[nnx.Module], *, image_size: int = 32, batch: int = 2,
          **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """Checks the contract for the registered name or class `model`, built with its
    `TINY_KWARGS` updated by `kwargs`; returns {stage: shape} at `image_size`."""
    if isinstance(model, str):
        from pneumojax import models

        name, cls = model, models.get(model)
    else:
        name, cls = model.__name__, model

    def fail(why: str) -> None:
        raise ContractError(f"{name}: {why}")

    if problems := declaration_problems(cls):
        fail(problems[0])
    kwargs = {**getattr(cls, "TINY_KWARGS", {}), **kwargs}
    shapes = _check_instance(cls, kwargs, image_size, batch, fail)
    _check_bfloat16(cls, kwargs, image_size, batch, fail)
    lesion = getattr(cls, "LESION_KWARGS", None)
    if lesion is not None:
        lesion_shapes = _check_instance(cls, {**kwargs, **lesion}, image_size, batch, fail)
        cells = lesion_shapes.get("lesion_logits", ())
        if len(cells) != 3:
            fail(f"built with LESION_KWARGS={dict(lesion)} it must record `lesion_logits` "
                 f"(B, h, w); got {cells or 'none'}")
    return shapes


def _check_instance(cls: type[nnx.Module], kwargs: dict, size: int, batch: int, fail
                    ) -> dict[str, tuple[int, ...]]:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    try:  # abstractly: random initialisation would compile a kernel per shape
        abstract = nnx.eval_shape(lambda: cls(
            in_channels=3, input_mean=mean, input_std=std, dtype=jnp.float32,
            rngs=nnx.Rngs(params=0, dropout=1), **kwargs))
    except TypeError as e:
        fail(f"the constructor refused the contract's keywords: {e}")
    standardize = getattr(abstract, "standardize", None)
    if not (standardize is not None
            and all(type(v) is nnx.Variable and v.shape == (3,)
                    for v in (getattr(standardize, "mean", None),
                              getattr(standardize, "std", None)))):
        fail("inputs must be standardised by `standardize.mean` / `.std`, (in_channels,) "
             "nnx.Variables set from input_mean / input_std (cnn.Standardize)")

    undeclared, dtypes = set(), set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
        top = str(getattr(path[0], "key", path[0]))
        if top not in cls.TRANSFER_GROUPS:
            undeclared.add(top)
        dtypes.add(str(leaf.dtype))
    if undeclared:
        fail(f"attribute(s) {', '.join(sorted(undeclared))} hold parameters but are in no "
             f"transfer group; declare them in {cls.__name__}.TRANSFER_GROUPS")
    if dtypes != {"float32"}:
        fail(f"parameters must be float32, got {', '.join(sorted(dtypes))}")

    model = _filled(abstract)
    x = np.random.default_rng(0).uniform(size=(batch, size, size, 3)).astype(np.float32)
    names: list[str] = []  # the stages in the order recorded (eval_shape sorts dict keys)

    def forward(graphdef, state, deltas):
        model = nnx.merge(graphdef, state)
        with stages.perturbed(deltas):
            out = model(x)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) and not names:
            names.extend(out[1])
        return out, nnx.state(model)

    model.eval()
    graphdef, state = nnx.split(model)
    out, _ = jax.eval_shape(lambda s: forward(graphdef, s, {}), state)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        fail("model(x) must return (logits, intermediates), a dict of the named stages")
    logits, inter = out
    if getattr(logits, "shape", None) != (batch,) or logits.dtype != jnp.float32:
        fail(f"logits must be float32 of shape (B,) = ({batch},), got "
             f"{getattr(logits, 'dtype', type(logits).__name__)} {getattr(logits, 'shape', '')}")
    shapes = {k: tuple(inter[k].shape) for k in names}
    if not names or names[-1] != "pre_logits" or len(shapes["pre_logits"]) != 2:
        fail(f"the last stage must be `pre_logits` (B, features); the stages are {shapes}")
    if any(len(s) not in (3, 4) or s[0] != batch for k, s in shapes.items() if k != "pre_logits"):
        fail(f"the stages before `pre_logits` must be spatial, (B, h, w, c) or (B, h, w); "
             f"got {shapes}")
    if not any(len(s) == 4 for s in shapes.values()):
        fail(f"no spatial (B, h, w, c) stage for Grad-CAM; the stages are {shapes}")

    @jax.jit
    def probe(state, deltas):
        """The logits, the state after the pass, and d(sum of logits)/d(each stage's delta)."""
        def total(deltas):
            (logits, _), new_state = forward(graphdef, state, deltas)
            return logits.sum(), (logits, new_state)
        grads, (logits, new_state) = jax.grad(total, has_aux=True)(deltas)
        return logits, new_state, grads

    zeros = {k: np.zeros(v.shape, v.dtype) for k, v in inter.items()}  # host: no compiles
    first, state, grads = probe(state, zeros)
    for k in names:
        if not np.any(np.asarray(grads[k]) != 0):
            fail(f"stage {k!r} has an identically zero activation gradient, so the logits do "
                 f"not read it: write `x = stage(out, {k!r}, y)` and go on with that x, rather "
                 f"than recording a copy beside the computation")
    if not np.array_equal(probe(state, zeros)[0], first):  # the state the first pass left
        fail("eval mode must be deterministic: two forward passes gave different logits")

    model.train()
    graphdef_train, state = nnx.split(model)
    names_eval, names[:] = list(names), []
    (train_logits, _), _ = jax.eval_shape(lambda s: forward(graphdef_train, s, {}), state)
    if train_logits.shape != (batch,) or names != names_eval:
        fail("train mode must give the same logits shape and stages as eval mode")
    return shapes


def instance(model: str | type[nnx.Module], *, seed: int = 0, **kwargs: Any) -> nnx.Module:
    """The model built abstractly, then given random values drawn on the host: no kernel is
    compiled, where a random initialisation compiles one per parameter shape (seconds on a
    small CPU). For checks and tests: the values are not the model's own initialisation."""
    if isinstance(model, str):
        from pneumojax import models

        model = models.get(model)
    return _filled(nnx.eval_shape(lambda: model(rngs=nnx.Rngs(seed), **kwargs)), seed)


def _filled(abstract: nnx.Module, seed: int = 0) -> nnx.Module:
    """`abstract` with random values from the host, which compile nothing: parameters scaled
    by their fan-in, other floats (running statistics, the standardiser) in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract)

    def fill(path, leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed + 1)  # a stream's key, e.g. dropout's
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.zeros(leaf.shape, leaf.dtype)  # counters
        if len(leaf.shape) >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _check_bfloat16(cls: type[nnx.Module], kwargs: dict, size: int, batch: int, fail) -> None:
    """Built with the default in_channels and dtype=bfloat16, abstractly."""
    model = nnx.eval_shape(lambda: cls(dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kwargs))
    if {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} != {jnp.dtype("float32")}:
        fail("with dtype=bfloat16 the parameters must stay float32")
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x)[0], state,
                            jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32))
    if logits.dtype != jnp.float32:
        fail(f"with dtype=bfloat16 the logits must stay float32, got {logits.dtype}")
