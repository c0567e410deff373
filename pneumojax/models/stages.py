"""Named stages: how a model exposes the activations that Grad-CAM and feature extraction read.

A model records each stage with `stage`, and goes on with the tensor it returns:

    x = stage(out, "block1", block(x))

Normally that is the tensor itself. Under `perturbed({"block1": delta})` it is the tensor plus
`delta`, so every later layer reads the perturbed value, and d(score)/d(delta) at delta = 0 is
d(score)/d(activation): one forward and one backward pass, with public JAX only (jax.grad of a
function of `delta`), for any architecture. That is why a model must consume what `stage`
returns: a stage recorded beside the computation (`out["s"] = y * 1.0`) would have no
gradient, which `pneumojax.models.contract.check` catches.

The perturbation lives in a context variable that is read while a function is traced, so it
changes nothing outside the `with` block (nor in another thread).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax

Intermediates = dict[str, jax.Array]

_DELTAS: contextvars.ContextVar[Mapping[str, jax.Array] | None] = contextvars.ContextVar(
    "pneumojax_stage_deltas", default=None)


def stage(out: Intermediates, name: str, x: jax.Array) -> jax.Array:
    """Records `x` as stage `name` in `out` and returns what the next layer must read: `x`,
    plus its delta under `perturbed`. `out[name]` is that same returned tensor."""
    if name in out:
        raise ValueError(f"stage {name!r} recorded twice")
    delta = (_DELTAS.get() or {}).get(name)
    if delta is not None:
        if delta.shape != x.shape:
            raise ValueError(f"stage {name!r}: delta of shape {delta.shape} for an activation "
                             f"of shape {x.shape}")
        x = x + delta.astype(x.dtype)
    out[name] = x
    return x


@contextlib.contextmanager
def perturbed(deltas: Mapping[str, jax.Array]) -> Iterator[None]:
    """Within the block, `stage(out, name, x)` returns `x + deltas[name]`."""
    token = _DELTAS.set(dict(deltas))
    try:
        yield
    finally:
        _DELTAS.reset(token)
