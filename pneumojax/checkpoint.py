"""Orbax checkpoints: train state, grain iterator state and run metadata, saved together.

A checkpoint is written to a temporary folder and renamed when complete, so a run killed
mid-write leaves the previous one usable. The latest checkpoints are kept for resuming and the
best one by validation ROC-AUC for evaluation. A checkpoint damaged later (a truncated or lost
file) is set aside on resuming, and the run resumes from the newest one that reads back whole.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from pneumojax import cli

BEST_METRIC = "roc_auc"


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys become raw uint32 data, concrete or abstract: orbax stores plain arrays."""
    return jax.tree.map(lambda x: jax.eval_shape(jax.random.key_data, x) if
                        isinstance(x, jax.ShapeDtypeStruct) and _is_key(x) else
                        jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(restored: Any, like: Any) -> Any:
    """Back to typed keys, of JAX's default implementation: every key here is made with it."""
    return jax.tree.map(lambda r, ref: jax.random.wrap_key_data(r) if _is_key(ref) else r,
                        restored, like)


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """orbax stops a restore at its first unreadable array and closes its event loop while
    tensorstore finishes the other reads, each of which then reports "Event loop is closed" as
    an unraisable exception: dozens of tracebacks for one damaged file. They are dropped while
    this block runs (the next restore lasts long enough for them all); the rest go on to the
    usual hook."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Ctrl-C is held until the block ends, then raised. A KeyboardInterrupt inside orbax's
    wait for its finalising thread is logged by orbax as a failed save, traceback and all,
    although the checkpoint it was writing is fine; held, the save completes and the run stops
    with its one line. A second Ctrl-C raises at once. Outside the main thread (where signal
    handlers cannot be set) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None
                      else previous)
    if received:
        raise KeyboardInterrupt


class Checkpointer:
    """`save`/`restore` of (state pytree, grain iterator, metadata dict) by step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, cleanup_tmp_directories=True, read_only=read_only,
            create=not read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),  # it can restore a subset
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, meta: dict, *, metrics: dict | None = None,
             data_iterator: Any = None) -> None:
        items = {"state": ocp.args.PyTreeSave(_keys_to_data(state)),
                 "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        with _interrupt_after():  # it waits for the previous save to finalise
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)

    def wait(self) -> None:
        with _interrupt_after():
            self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self.manager.restore(step, args=args)["meta"]

    def resolve(self, which: str | int) -> int:
        """'latest', 'best' (highest validation ROC-AUC, later step on ties) or a step number."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoints")
        if which == "latest":
            return steps[-1]
        if which == "best":
            scored = [(self.meta(s).get("validation", {}).get(BEST_METRIC), s) for s in steps]
            scored = [(m, s) for m, s in scored if m is not None]
            if not scored:
                raise FileNotFoundError(f"{self.directory}: no checkpoint has validation metrics")
            return max(scored)[1]
        step = int(which)
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; "
                                    f"available: {steps}")
        return step

    def restore(self, step: int, like: Any, *, data_iterator: Any = None,
                partial: bool = False) -> tuple[Any, dict]:
        """State shaped (and sharded) like `like`; the iterator, if given, is set in place.

        `partial`: `like` names a subset of the saved state (evaluation needs no optimizer).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(like))
        items = {"state": ocp.args.PyTreeRestore(
                     abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                     partial_restore=partial),
                 "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return _data_to_keys(restored["state"], like), restored["meta"]

    def restore_latest(self, like: Callable[[dict], Any], *, data_iterator: Any = None
                       ) -> tuple[int, Any, dict, list[str]] | None:
        """(step, state, meta, set aside) of the newest checkpoint that reads back whole, or
        None if there is none. `like(meta)` is the state's shape at a step (it may depend on
        the step's metadata). Each newer checkpoint, unreadable, is renamed
        `<step>.unreadable` (kept for a post-mortem, no longer a step), so the run redoes its
        steps; `set aside` says so, one short line each. If no checkpoint reads, the newest
        one's error is raised: then the fault is not a damaged checkpoint."""
        unreadable: dict[int, Exception] = {}
        with _quiet_abandoned_reads():
            for step in reversed(self.steps()):
                try:
                    meta = self.meta(step)
                    state, meta = self.restore(step, like(meta), data_iterator=data_iterator)
                # orbax and tensorstore report a damaged file as ValueError, OSError, KeyError,
                # or a bare Exception; a fault that is not damage fails the older steps too.
                except Exception as e:
                    unreadable[step] = e
                    continue
                return step, state, meta, self._set_aside(unreadable)
        if unreadable:
            raise next(iter(unreadable.values()))
        return None

    def _set_aside(self, unreadable: dict[int, Exception]) -> list[str]:
        lines = []
        for step, error in unreadable.items():
            names = (f"{step}.unreadable" + (f".{n}" if n else "") for n in itertools.count())
            name = next(n for n in names if not (self.directory / n).exists())
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(self.directory / name)
            lines.append(f"step {step} (now {name}: {cli.one_line(error)[:120]})")
        if unreadable and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("unreadable checkpoints set aside")
        self.manager.reload()
        return lines

    def close(self) -> None:
        with _interrupt_after():  # it waits for a save being written
            self.manager.close()
