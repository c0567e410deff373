"""What every weight port shares: reading torch files safely, checking a converted tree
against the model, folding RGB to grey, and loading it with its preprocessing.

A converter (`weights.resnet`, `weights.xception`) returns the backbone's nested pure dict
(params and batch stats, no `head`), the shape of
`nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))`. Weights are only half of
a pretrained model: the input preprocessing they were trained with travels beside them
(`PREPROCESSING`) and `load_into` writes both, because the same weights behind the wrong
mean/std give quietly worse features, not an error. Every model here takes RGB in [0, 1]:

- "torch" (torchvision, timm): ImageNet mean/std.
- "caffe" (Keras's ResNet50): BGR, 0-255, mean-subtracted, no scaling. The converter flips
  conv1's input channels BGR -> RGB, so the mode becomes mean = caffe mean / 255, std = 1 / 255.
- "tf" (Keras's Xception, Inception): x / 127.5 - 1, i.e. mean 0.5, std 0.5.

Loading never unpickles arbitrary objects: torch files go through
`torch.load(weights_only=True)`, which refuses anything but tensors and containers,
and safetensors and HDF5 files hold no code at all.

Errors: a file that cannot be read (truncated, corrupt, unsafe, a missing reader) raises
`cli.UserError` naming the file; a file that reads but whose arrays are not the model's
raises `WrongWeights`, which the caller words with the source it expected.
"""

import importlib
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from types import ModuleType

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from pneumojax.cli import UserError

PREPROCESSING: dict[str, dict] = {
    "torch": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "caffe": {"mean": (123.68 / 255, 116.779 / 255, 103.939 / 255), "std": (1 / 255,) * 3},
    "tf": {"mean": (0.5,) * 3, "std": (0.5,) * 3},
}
_LISTED_PROBLEMS = 6  # a ResNet101 has hundreds; the first few tell what the file is

Tree = dict
Flat = dict[tuple, np.ndarray]


class WrongWeights(ValueError):
    """The file reads, but its arrays are not the model's: their names or shapes differ."""


def require(module: str, package: str) -> ModuleType:
    """Imports an optional dependency, naming the pip package when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"this weight format needs {package}: pip install {package}") from e


def check_head(name: str, shape: tuple, imagenet: tuple | None) -> None:
    """The dropped classifier must still be ImageNet's: other weights sit behind another head."""
    if shape != imagenet:
        raise WrongWeights(f"classifier {name} is {shape}, ImageNet's is {imagenet}: "
                           "a fine-tuned model, not the published ImageNet weights")


def node(name: str) -> str | int:
    """Pure-dict keys of `nnx.List` entries are ints; everything else is a string."""
    return int(name) if name.isdigit() else name


def to_grayscale(tree: Tree, preprocessing: dict) -> tuple[Tree, dict]:
    """An RGB backbone and its preprocessing -> a 1-channel backbone for X-rays.

    conv1's kernel becomes the sum of its RGB kernels and the preprocessing the mean of
    the per-channel means and stds. The result equals, exactly, the 3-channel model fed
    the grey image replicated to RGB, *when that model standardises every channel with
    the same scalar mean/std*: then conv1 sees one standardised plane three times and
    sum_c W_c * z = (sum_c W_c) * z. With the per-channel ImageNet stats it is close
    rather than exact; X-rays carry no colour and those stats lie within 0.05 of their
    averages (0.449, 0.226), while the 1-channel model saves a 3x copy of every image
    and two thirds of conv1's input work.
    """
    flat = traverse_util.flatten_dict(tree)
    flat[("conv1", "kernel")] = flat[("conv1", "kernel")].sum(axis=2, keepdims=True)
    scalar = {k: (float(np.mean(preprocessing[k])),) for k in ("mean", "std")}
    return traverse_util.unflatten_dict(flat), scalar


def _dotted(key: tuple) -> str:
    return ".".join(map(str, key))


def _backbone(model: nnx.Module) -> dict:
    """Flat path -> variable value of the params and batch stats that ImageNet weights set."""
    state = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return {k: v for k, v in traverse_util.flatten_dict(state).items() if k[0] != "head"}


def _misfits(expected: dict, given: Flat) -> list[str]:
    """Every name missing from or foreign to `given`, and every shape or value that is off."""
    common = expected.keys() & given.keys()
    problems = [f"missing: {_dotted(k)}" for k in expected.keys() - given.keys()]
    problems += [f"unexpected: {_dotted(k)}" for k in given.keys() - expected.keys()]
    problems += [f"shape mismatch: {_dotted(k)} is {np.shape(given[k])}, "
                 f"model has {expected[k].shape}"
                 for k in common if np.shape(given[k]) != expected[k].shape]
    problems += [f"not finite: {_dotted(k)}" for k in common if not np.isfinite(given[k]).all()]
    return problems


def _raise_misfits(problems: list[str]) -> None:
    if problems:
        shown = sorted(problems)[:_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise WrongWeights("weights do not fit the model: " + "; ".join(shown)
                          + (f"; and {more} more" if more else ""))


def check(tree: Tree, model: str, **kwargs) -> None:
    """Raises `WrongWeights` unless `tree` is exactly the backbone of the 3-channel
    `models.create(model, **kwargs)`: the cache runs it before writing, so that a wrong file
    fails when it is converted, not at the first training run, and never replaces a good
    conversion."""
    from pneumojax import models

    abstract = nnx.eval_shape(lambda: models.create(model, in_channels=3, rngs=nnx.Rngs(0),
                                                    **kwargs))
    _raise_misfits(_misfits(_backbone(abstract), traverse_util.flatten_dict(tree)))


def load_into(model: nnx.Module, tree: Tree, preprocessing: dict) -> None:
    """Writes the backbone's params and batch stats, and `model.standardize`'s mean/std.

    Every key and shape is checked before anything is written, so a failed load leaves
    the model untouched; `head` is left as initialised.
    """
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    current = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    expected = _backbone(model)
    given = traverse_util.flatten_dict(tree)
    problems = _misfits(expected, given)
    stats = {k: np.asarray(preprocessing[k], np.float32) for k in ("mean", "std")}
    variables = {"mean": model.standardize.mean, "std": model.standardize.std}
    problems += [f"shape mismatch: standardize.{k} is {stats[k].shape}, model has {v.shape}"
                 for k, v in variables.items() if stats[k].shape != v.shape]
    _raise_misfits(problems)
    current.update({k: jnp.asarray(v, expected[k].dtype) for k, v in given.items()})
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(current))
    nnx.update(model, state)
    for k, variable in variables.items():
        variable.set_value(jnp.asarray(stats[k]))


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A `.pth`/`.pt` or `.safetensors` state dict -> numpy arrays by name.

    torch is needed only for the pickle formats; safetensors files load without it.
    """
    suffix = pathlib.Path(path).suffix
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix not in (".pth", ".pt"):
        raise UserError(f"{path}: expected a .pth, .pt or .safetensors state dict")
    torch = require("torch", "torch")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises the unsafe way round
        raise UserError(_refusal(path, torch)) from None
    except (RuntimeError, OSError, EOFError) as e:  # torch's words for a cut or garbled file
        raise UserError(f"{path}: not a readable torch file, truncated or corrupt "
                        f"({type(e).__name__}: {e}); download it again") from e
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(f"{path}: not a flat state dict of tensors (a training checkpoint? "
                        "save its model's state_dict() instead)")
    # numpy has no bfloat16; the converters cast to float32 anyway.
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in raw.items()}


def _refusal(path: str | pathlib.Path, torch: ModuleType) -> str:
    """Why torch's safe loader refused `path`, worded without its advice to load it unsafely.

    A torch.save archive names the globals it would import; an old-format or foreign pickle
    cannot be inspected without running it, so it is refused as unsafe or corrupt.
    """
    fix = ("use the file as its publisher released it, or one of tensors alone, as "
           "torch.save(model.state_dict(), PATH) writes")
    if zipfile.is_zipfile(path):
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe:
            return (f"{path}: refused as unsafe: loading it would import {', '.join(unsafe)}, "
                    f"which can run any code, and a weight file needs none; {fix}")
    return (f"{path}: refused as unsafe or corrupt: it holds something besides tensors "
            f"that only running its pickle could build; {fix}")


def _load_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    safetensors_numpy = require("safetensors.numpy", "safetensors")
    safetensors = require("safetensors", "safetensors")
    try:
        return dict(safetensors_numpy.load_file(str(path)))
    except safetensors.SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file, truncated or corrupt "
                        f"({e}); download it again") from e
