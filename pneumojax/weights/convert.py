"""ImageNet ResNet50 weights from torch and Keras files, as pure dicts for `models.ResNet50`.

Each converter returns the backbone's nested pure dict (params and batch stats, no
`head`), the shape of `nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))`.
Weights are only half of a pretrained model: the input preprocessing they were trained
with travels beside them (`PREPROCESSING`) and `load_into` writes both, because the
same weights behind the wrong mean/std give quietly worse features, not an error.

Families, and the `ResNet50(variant=...)` each one needs:

- "torch" (torchvision, timm): variant "v1.5", ImageNet mean/std on RGB in [0, 1].
- "keras" (`keras.applications.ResNet50`): variant "v1", "caffe" preprocessing, i.e.
  BGR, 0-255, mean-subtracted, no scaling. `from_keras_h5` flips conv1's input
  channels BGR -> RGB, so every model here takes RGB in [0, 1] and the caffe mode
  becomes mean = caffe mean / 255, std = 1 / 255.

Loading never unpickles arbitrary objects: torch files go through
`torch.load(weights_only=True)`, which refuses anything but tensors and containers,
and safetensors and HDF5 files hold no code at all.

Errors: a file that cannot be read (truncated, corrupt, unsafe, a missing reader) raises
`cli.UserError` naming the file; a file that reads but whose arrays are not ResNet50's
raises `NotResNet50`, which the caller words with the source it expected.
"""

import importlib
import pathlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from types import ModuleType

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from pneumojax.cli import UserError
from pneumojax.models.resnet import ResNet50

PREPROCESSING: dict[str, dict] = {
    "torch": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "keras": {"mean": (123.68 / 255, 116.779 / 255, 103.939 / 255), "std": (1 / 255,) * 3},
}

_TORCH_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_KERAS_LEAF = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias",
               "moving_mean": "mean", "moving_variance": "var"}
# Keras block `conv{S}_block{B}_{K}_{conv,bn}`; K = 0 is the projection shortcut.
_KERAS_BLOCK = re.compile(r"conv([2-5])_block(\d+)_([0-3])_(conv|bn)")
# Classifier layers of the with-top files: dropped, like torch's `fc`.
_KERAS_CLASSIFIERS = ("predictions", "probs", "fc1000")
# Every source is an ImageNet-1k classifier: a head of another size marks a fine-tuned model.
_TORCH_HEAD = {"fc.weight": (1000, 2048), "fc.bias": (1000,)}
_KERAS_HEAD = {"kernel": (2048, 1000), "bias": (1000,)}
_LISTED_PROBLEMS = 6  # a ResNet101 has hundreds; the first few tell what the file is

Tree = dict
Flat = dict[tuple, np.ndarray]


class NotResNet50(ValueError):
    """The file reads, but its arrays are not ResNet50's: their names or shapes differ."""


def _require(module: str, package: str) -> ModuleType:
    """Imports an optional dependency, naming the pip package when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"this weight format needs {package}: pip install {package}") from e


def _check_head(name: str, shape: tuple, imagenet: tuple | None) -> None:
    """The dropped classifier must still be ImageNet's: other weights sit behind another head."""
    if shape != imagenet:
        raise NotResNet50(f"classifier {name} is {shape}, ImageNet's is {imagenet}: "
                          "a fine-tuned model, not the published ImageNet weights")


def _node(name: str) -> str | int:
    """Pure-dict keys of `nnx.List` entries are ints; everything else is a string."""
    return int(name) if name.isdigit() else name


def from_torch(state_dict: Mapping[str, np.ndarray]) -> Tree:
    """A torchvision or timm ResNet50 state dict -> backbone tree for variant "v1.5".

    `fc.*` is dropped (the head is a fresh 1-logit classifier) and so are the
    `num_batches_tracked` counters, which only matter to torch's momentum=None mode.
    Shapes are not checked here but by `check`, which names every misfit at once.
    """
    flat: Flat = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            _check_head(key, np.shape(value), _TORCH_HEAD.get(key))
            continue
        if key.endswith(".num_batches_tracked"):
            continue
        *module, leaf = key.split(".")
        if len(module) >= 2 and module[-2] == "downsample":
            module = [*module[:-2], ("downsample_conv", "downsample_bn")[int(module[-1])]]
        array = np.asarray(value, dtype=np.float32)
        layer = module[-1] if module else ""
        if "conv" in layer and leaf == "weight":
            leaf = "kernel"
            array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array  # OIHW -> HWIO
        elif "bn" in layer and leaf in _TORCH_BN:
            leaf = _TORCH_BN[leaf]
        else:
            raise NotResNet50(f"not a ResNet50 state dict entry: {key!r}")
        flat[(*map(_node, module), leaf)] = array
    return traverse_util.unflatten_dict(flat)


def _keras_module(layer: str) -> tuple | None:
    """Keras layer name -> path of the flax module, or None if it is no backbone layer."""
    if layer in ("conv1_conv", "conv1_bn"):
        return ("conv1",) if layer.endswith("conv") else ("bn1",)
    match = _KERAS_BLOCK.fullmatch(layer)
    if match is None:
        return None
    stage, block, k, kind = match.groups()
    name = f"downsample_{kind}" if k == "0" else f"{kind}{k}"
    return (f"layer{int(stage) - 1}", int(block) - 1, name)


def _text(name: bytes | str) -> str:
    """HDF5 string attributes come back as bytes from Keras 2 files, str from others."""
    return name.decode() if isinstance(name, bytes) else str(name)


def _h5_datasets(group) -> dict[str, np.ndarray]:
    """Leaf name ("kernel", "gamma", ...) -> array, for one layer's HDF5 group.

    Keras 2 files list the datasets in a `weight_names` attribute (`conv1_conv/kernel:0`,
    nested as `layer/layer/kernel:0`); Keras 3's legacy `.h5` drops the ":0". Without
    the attribute every dataset under the group is taken.
    """
    if not hasattr(group, "visititems"):  # a dataset where a layer's group belongs
        raise NotResNet50(f"{group.name} is a dataset, a Keras layer is a group")
    if "weight_names" in group.attrs:
        names = [_text(n) for n in group.attrs["weight_names"]]
    else:
        names = []
        group.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
    return {n.split("/")[-1].removesuffix(":0"): np.asarray(group[n], np.float32) for n in names}


def from_keras_h5(path: str | pathlib.Path) -> Tree:
    """A legacy Keras ResNet50 HDF5 file -> backbone tree for variant "v1".

    Reads the layout of `resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`, and the
    same layout under `model_weights/` in a full-model `.h5`. Kernels are HWIO already;
    conv1's input channels are reversed so that the model takes RGB, not caffe's BGR.
    """
    h5py = _require("h5py", "h5py")
    try:
        with h5py.File(path, "r") as f:
            flat = _keras_layers(f["model_weights"] if "model_weights" in f else f)
    except (OSError, KeyError) as e:  # h5py's words for a cut file and a dangling name
        raise UserError(f"{path}: not a readable HDF5 file, truncated or corrupt ({e}); "
                        "download it again") from e
    kernel = flat.get(("conv1", "kernel"))
    if kernel is not None and kernel.ndim == 4:  # other shapes are left to `check` to name
        flat[("conv1", "kernel")] = np.ascontiguousarray(kernel[:, :, ::-1])
    return traverse_util.unflatten_dict(flat)


def _keras_layers(root) -> Flat:
    """The backbone arrays of an open Keras weights group, by flax path; conv1 still BGR."""
    flat: Flat = {}
    for layer in [_text(n) for n in root.attrs.get("layer_names", list(root.keys()))]:
        weights = _h5_datasets(root[layer]) if layer in root else {}
        if layer in _KERAS_CLASSIFIERS:
            for leaf, array in weights.items():
                _check_head(f"{layer}/{leaf}", array.shape, _KERAS_HEAD.get(leaf))
            continue
        if not weights:
            continue
        module = _keras_module(layer)
        if module is None or not weights.keys() <= _KERAS_LEAF.keys():
            raise NotResNet50(f"not a ResNet50 layer: {layer!r} with {sorted(weights)}")
        for leaf, array in weights.items():
            flat[(*module, _KERAS_LEAF[leaf])] = array
    return flat


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
        raise NotResNet50("weights do not fit the model: " + "; ".join(shown)
                          + (f"; and {more} more" if more else ""))


def check(tree: Tree, variant: str) -> None:
    """Raises `NotResNet50` unless `tree` is exactly the backbone of a 3-channel ResNet50
    `variant`: the cache runs it before writing, so that a wrong file fails when it is
    converted, not at the first training run, and never replaces a good conversion."""
    model = nnx.eval_shape(lambda: ResNet50(in_channels=3, variant=variant, rngs=nnx.Rngs(0)))
    _raise_misfits(_misfits(_backbone(model), traverse_util.flatten_dict(tree)))


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
    torch = _require("torch", "torch")
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
    safetensors_numpy = _require("safetensors.numpy", "safetensors")
    safetensors = _require("safetensors", "safetensors")
    try:
        return dict(safetensors_numpy.load_file(str(path)))
    except safetensors.SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file, truncated or corrupt "
                        f"({e}); download it again") from e
