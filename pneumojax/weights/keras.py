"""Keras weight files, every layout, read into one form: Keras layer name -> {leaf: array}.

Three layouts exist, and users hold all of them:

- legacy HDF5 (Keras 2, and Keras 3's `legacy_h5`): the official `*_notop.h5` files, and a
  full model's `.h5` with the same under `model_weights/`. One group per layer, named after
  the layer; the datasets' names say what they are (`block1_conv1/kernel:0`).
- Keras 3 `.keras` archives: a zip of `config.json` and `model.weights.h5`. The weights file
  stores variables by object path (`layers/batch_normalization_3/vars/0`), where the name is
  the layer's class in snake case, numbered by its place among the layers of that class, and
  the variables are numbered in creation order. `config.json` lists the layers in that same
  order with their names, so the archive gives names back exactly.
- Keras 3 `.weights.h5` alone: the same paths without the config. The model's converter
  passes the layer order of its Keras application (`order`), which is how Keras saves it.

A layer nested in a bigger saved model (a backbone inside a classifier, as
`keras.applications.Xception(include_top=False)` called inside a `keras.Model`) is read with
`submodel=NAME`; reading such a file without it names the nested models to choose from.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
import zipfile
from collections.abc import Sequence

import numpy as np

from pneumojax.cli import UserError
from pneumojax.weights.convert import WrongWeights, require

Layers = dict[str, dict[str, np.ndarray]]  # Keras layer name -> leaf name -> array, in order

# What Keras 3 numbers `vars/0`, `vars/1`, ... of a layer: its trainable variables in
# creation order, then the non-trainable ones. A flag in the layer's config drops a leaf.
_KERAS3_VARS = {
    "Conv2D": (("kernel", None), ("bias", "use_bias")),
    "DepthwiseConv2D": (("depthwise_kernel", None), ("bias", "use_bias")),
    "SeparableConv2D": (("depthwise_kernel", None), ("pointwise_kernel", None),
                        ("bias", "use_bias")),
    "Dense": (("kernel", None), ("bias", "use_bias")),
    "BatchNormalization": (("gamma", "scale"), ("beta", "center"), ("moving_mean", None),
                           ("moving_variance", None)),
}
_NESTED = ("Functional", "Sequential", "Model")
# Keras's variable names -> flax's, for convs, dense layers and batch norms.
LEAF = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias",
        "moving_mean": "mean", "moving_variance": "var"}


def read_layers(path: str | pathlib.Path, *, submodel: str | None = None,
                order: Sequence[tuple[str, str]] | None = None) -> Layers:
    """The layers of the Keras file at `path`, whatever its layout (see the module's doc).

    `order` is the (name, class) list of the model's layers, used for a `.weights.h5` that
    comes without its config.
    """
    h5py = require("h5py", "h5py")
    path = pathlib.Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
                weights = io.BytesIO(archive.read("model.weights.h5"))
            with h5py.File(weights, "r") as f:
                return _keras3(f, _config_layers(config), submodel, path)
        with h5py.File(path, "r") as f:
            if "layers" in f and "layer_names" not in f.attrs and "model_weights" not in f:
                if order is None:
                    raise UserError(f"{path}: a Keras 3 weights file, which names layers by "
                                    "class alone; convert the .keras archive it came with")
                root = _only_nested(f, submodel, path) if submodel else f
                return _keras3(root, [dict(class_name=c, config=dict(name=n))
                                      for n, c in order], None, path)
            if submodel:
                raise UserError(f"{path}: --submodel reads Keras 3 files (.keras, .weights.h5); "
                                "save the backbone alone, or the model as .keras")
            return _legacy(f["model_weights"] if "model_weights" in f else f)
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable Keras file, truncated or corrupt "
                        f"({type(e).__name__}: {e}); download it again") from e


def _config_layers(config: dict) -> list[dict]:
    return config["config"]["layers"]


def _snake(class_name: str) -> str:
    """Keras's `to_snake_case`: the name a layer of this class gets in a weights file."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _paths(layers: list[dict]) -> list[str]:
    """Each layer's group name in a Keras 3 weights file: class in snake case, numbered."""
    used: dict[str, int] = {}
    names = []
    for layer in layers:
        name = _snake(layer["class_name"])
        used[name] = used.get(name, -1) + 1
        names.append(f"{name}_{used[name]}" if used[name] else name)
    return names


def _keras3(root, layers: list[dict], submodel: str | None, path: pathlib.Path) -> Layers:
    group = root["layers"]
    paths = _paths(layers)
    nested = {layer["config"]["name"]: (p, layer) for p, layer in zip(paths, layers)
              if layer["class_name"] in _NESTED}
    if submodel is not None:
        if submodel not in nested:
            raise UserError(f"{path}: holds no nested model {submodel!r}; it holds "
                            f"{', '.join(nested) or 'none'}")
        p, layer = nested[submodel]
        return _keras3(group[p], _config_layers(layer), None, path)
    if nested:
        raise UserError(f"{path}: a model that wraps {', '.join(nested)}; pass --submodel "
                        f"{next(iter(nested))} to convert that one")
    out: Layers = {}
    for p, layer in zip(paths, layers):
        if p not in group or "vars" not in group[p]:
            continue
        variables = group[p]["vars"]
        arrays = [np.asarray(variables[str(i)], np.float32) for i in range(len(variables))]
        if not arrays:
            continue
        leaves = _KERAS3_VARS.get(layer["class_name"])
        if leaves is None:
            raise WrongWeights(f"layer {layer['config']['name']!r} is a "
                                 f"{layer['class_name']}, whose variables this reader does "
                                 "not know")
        flags = layer["config"]
        names = [leaf for leaf, flag in leaves if flag is None or flags.get(flag, True)]
        if not any(flag in flags for _, flag in leaves):  # no config: the optional ones last
            names = [leaf for leaf, _ in leaves][:len(arrays)]
        if len(names) != len(arrays):
            raise WrongWeights(f"layer {layer['config']['name']!r} ({p}) has "
                                 f"{len(arrays)} variables, a {layer['class_name']} "
                                 f"{len(names)}")
        out[layer["config"]["name"]] = dict(zip(names, arrays))
    return out


def _only_nested(f, submodel: str, path: pathlib.Path):
    """The one nested model of a bare Keras 3 weights file (its config, and so its name,
    is not in the file)."""
    nested = [name for name, g in f["layers"].items() if "layers" in g]
    if len(nested) != 1:
        raise UserError(f"{path}: holds {len(nested)} nested models ({', '.join(nested)}); "
                        f"convert the .keras archive, whose config says which is {submodel!r}")
    return f["layers"][nested[0]]


def _text(name: bytes | str) -> str:
    """HDF5 string attributes come back as bytes from Keras 2 files, str from others."""
    return name.decode() if isinstance(name, bytes) else str(name)


def _legacy(root) -> Layers:
    """The layers of a legacy HDF5 weights group, in the file's `layer_names` order."""
    out: Layers = {}
    for layer in [_text(n) for n in root.attrs.get("layer_names", list(root.keys()))]:
        if layer in root and (weights := _h5_datasets(root[layer])):
            out[layer] = weights
    return out


def _h5_datasets(group) -> dict[str, np.ndarray]:
    """Leaf name ("kernel", "gamma", ...) -> array, for one layer's HDF5 group.

    Keras 2 files list the datasets in a `weight_names` attribute (`conv1_conv/kernel:0`,
    nested as `layer/layer/kernel:0`); Keras 3's legacy `.h5` drops the ":0". Without
    the attribute every dataset under the group is taken.
    """
    if not hasattr(group, "visititems"):  # a dataset where a layer's group belongs
        raise WrongWeights(f"{group.name} is a dataset, a Keras layer is a group")
    if "weight_names" in group.attrs:
        names = [_text(n) for n in group.attrs["weight_names"]]
    else:
        names = []
        group.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
    return {n.split("/")[-1].removesuffix(":0"): np.asarray(group[n], np.float32) for n in names}
