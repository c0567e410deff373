"""ResNet50's ports: torchvision/timm state dicts (variant "v1.5") and Keras files ("v1").

Keras's layers are `conv1_{conv,bn}` and `conv{S}_block{B}_{K}_{conv,bn}` (K = 0 is the
projection shortcut); torch's names are given in `pneumojax.models.resnet`. Every source is
an ImageNet-1k classifier, so a with-top file's classifier is checked to be ImageNet's
(1000 classes) and dropped: a head of another size marks a fine-tuned model.
"""

import pathlib
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from pneumojax.weights import keras
from pneumojax.weights.convert import Flat, Tree, WrongWeights, check_head, node

_TORCH_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_KERAS_BLOCK = re.compile(r"conv([2-5])_block(\d+)_([0-3])_(conv|bn)")
# Classifier layers of the with-top files: dropped, like torch's `fc`.
_KERAS_CLASSIFIERS = ("predictions", "probs", "fc1000")
_TORCH_HEAD = {"fc.weight": (1000, 2048), "fc.bias": (1000,)}
_KERAS_HEAD = {"kernel": (2048, 1000), "bias": (1000,)}


def from_torch(state_dict: Mapping[str, np.ndarray]) -> Tree:
    """A torchvision or timm ResNet50 state dict -> backbone tree for variant "v1.5".

    `fc.*` is dropped (the head is a fresh 1-logit classifier) and so are the
    `num_batches_tracked` counters, which only matter to torch's momentum=None mode.
    Shapes are not checked here but by `check`, which names every misfit at once.
    """
    flat: Flat = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            check_head(key, np.shape(value), _TORCH_HEAD.get(key))
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
            raise WrongWeights(f"not a ResNet50 state dict entry: {key!r}")
        flat[(*map(node, module), leaf)] = array
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


def from_keras(path: str | pathlib.Path, submodel: str | None = None) -> Tree:
    """A Keras ResNet50 file (any layout `weights.keras` reads) -> backbone tree for "v1".

    Kernels are HWIO already; conv1's input channels are reversed so that the model takes
    RGB, not caffe's BGR.
    """
    flat: Flat = {}
    for layer, weights in keras.read_layers(path, submodel=submodel).items():
        if layer in _KERAS_CLASSIFIERS:
            for leaf, array in weights.items():
                check_head(f"{layer}/{leaf}", array.shape, _KERAS_HEAD.get(leaf))
            continue
        module = _keras_module(layer)
        if module is None or not weights.keys() <= keras.LEAF.keys():
            raise WrongWeights(f"not a ResNet50 layer: {layer!r} with {sorted(weights)}")
        for leaf, array in weights.items():
            flat[(*module, keras.LEAF[leaf])] = array
    kernel = flat.get(("conv1", "kernel"))
    if kernel is not None and kernel.ndim == 4:  # other shapes are left to `check` to name
        flat[("conv1", "kernel")] = np.ascontiguousarray(kernel[:, :, ::-1])
    return traverse_util.unflatten_dict(flat)
