"""A workdir holds one run: its config, checkpoints, log, summary and plots.

`claim` opens a workdir for training and refuses, with one line that names `--workdir`, before
it writes anything there:
- a path that is a file, or a folder it cannot create or write in;
- a folder another live run holds: an exclusive `flock` on WORKDIR/run.lock, which the OS
  releases when the holder dies, SIGKILL included, so a killed run never leaves it stuck;
- a folder whose checkpoints come from another config (its config.json), naming the fields
  that differ: resuming with other values would continue neither run.
Then it saves the resolved config as config.json. In a multi-host run process 0 decides and
tells the others, so that all stop together rather than wait for one another.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import jax
import ml_collections
import numpy as np

from pneumojax import cli, config_check, defaults

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"

# The fields a resumed run may change, each because the run stays what it was:
MAY_CHANGE = (
    # How many older checkpoints stay on disk: no trained value depends on it.
    "checkpoint.keep",
    # Where the prepared data set lives, not what it holds: data.source, image_size,
    # validation_fraction, synthetic_count and train.seed decide that, and they must match.
    "data.data_dir",
    # The mesh. Batches are global and their order depends only on (seed, step), so another
    # device count trains the same run up to float rounding (tests/test_distributed.py); and
    # with the default, all devices, a run moved to another machine changes it anyway.
    "train.num_devices",
)


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """A run's config, read from its workdir alone; fields added to the defaults
    (`pneumojax.defaults`) since the run was made get their defaults."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a training workdir (no {CONFIG_FILE})")
    saved = json.loads(path.read_text())
    config = defaults.get_config()
    _merge(config, saved)
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _merge(config[key], value)
        else:
            config[key] = value


def differences(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                ) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, new value)} for each field whose values differ, compared as
    config.json stores them (tuples as lists); a field only one has is None in the other."""
    flat = [dict(config_check.leaves(json.loads(c.to_json_best_effort()), whole=()))
            for c in (saved, config)]
    return {k: (flat[0].get(k), flat[1].get(k)) for k in sorted(flat[0].keys() | flat[1].keys())
            if flat[0].get(k) != flat[1].get(k)}


@contextlib.contextmanager
def claim(workdir: str | os.PathLike, config: ml_collections.ConfigDict
          ) -> Iterator[pathlib.Path]:
    """The workdir, held for this run until the block ends (see the module's docstring)."""
    path = pathlib.Path(workdir)
    lock, problem = None, None
    if jax.process_index() == 0:
        try:
            lock = _claim(path, config)
        except (cli.UserError, OSError) as e:  # the others must hear of any failure
            problem = e
    try:
        _agree(path, problem)
        yield path
    finally:
        if lock is not None:
            lock.close()


def _agree(path: pathlib.Path, problem: Exception | None) -> None:
    """Raises process 0's refusal, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        if refused and problem is None:
            problem = cli.UserError(f"--workdir {path}: refused by process 0, whose error "
                                    "says why")
    if problem is not None:
        raise problem


def _claim(path: pathlib.Path, config: ml_collections.ConfigDict) -> IO[str]:
    _check_folder(path)
    lock = _lock(path)
    try:
        check_config(path, config)
        lock.truncate(0)
        lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=1) + "\n")
    except BaseException:
        lock.close()
        raise
    return lock


def _check_folder(path: pathlib.Path) -> None:
    if path.exists() and not path.is_dir():
        raise cli.UserError(f"--workdir {path}: is a file, not a folder; choose another "
                            "--workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # a read-only mount or folder fails here
    except OSError as e:
        raise cli.UserError(f"--workdir {path}: cannot write there ({e.strerror}); choose a "
                            "folder you can write in") from e


def _lock(path: pathlib.Path) -> IO[str]:
    """WORKDIR/run.lock, locked; it says who holds it (written once the claim succeeds)."""
    lock = (path / LOCK_FILE).open("a+")  # created if absent, never truncated here
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise cli.UserError(f"--workdir {path}: another run is training in it ({holder}); "
                            "wait for it to end, or choose another --workdir") from None
    return lock


def _holds_checkpoints(path: pathlib.Path) -> bool:
    folder = path / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_config(path: str | os.PathLike, config: ml_collections.ConfigDict,
                 fix: str = "resume it with its own config, or choose another --workdir"
                 ) -> None:
    """Refuses a workdir whose checkpoints come from another config, naming the fields that
    differ and `fix`. One without checkpoints holds nothing to resume: any config may claim it."""
    path = pathlib.Path(path)
    if not (path / CONFIG_FILE).exists() or not _holds_checkpoints(path):
        return
    try:
        saved = load_config(path)
    except ValueError as e:
        raise cli.UserError(f"{path / CONFIG_FILE}: unreadable ({cli.one_line(e)}), so its "
                            "checkpoints cannot be resumed; choose another --workdir") from e
    changed = differences(saved, config)
    refused = {k: v for k, v in changed.items() if k not in MAY_CHANGE}
    if refused:
        listed = ", ".join(f"{k} is {a!r} there, {b!r} here" for k, (a, b) in refused.items())
        raise cli.UserError(f"--workdir {path} holds a run of another config ({listed}); {fix}")
    if changed:
        listed = ", ".join(f"{k}={b!r} (was {a!r})" for k, (a, b) in changed.items())
        print(f"resuming with {listed}", flush=True)
