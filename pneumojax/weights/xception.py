"""Xception's port: `keras.applications.Xception`'s layers -> `models.Xception`'s paths.

Keras names the layers of the main path (`block1_conv1`, `block1_conv1_bn`,
`block{B}_sepconv{K}`, `block{B}_sepconv{K}_bn`) but not the four strided 1x1 shortcut
convs and their batch norms: they get Keras's automatic names (`conv2d`, `conv2d_1`, ...,
or `conv2d_4`... in a session that built other layers first). Those are taken in the order
the file lists them, which follows the graph: the shortcuts of block2, block3, block4 and
block13. The "tf" preprocessing needs no channel flip: Keras feeds Xception RGB.

    block1_conv1[_bn], block1_conv2[_bn]  -> conv1, bn1, conv2, bn2
    block{2-4}_sepconv{K}                 -> entry[B-2].units[K-1].{depthwise,pointwise}
    block{5-12}_sepconv{K}                -> middle[B-5].units[K-1]...
    block{13,14}_sepconv{K}               -> exit[B-13].units[K-1]...
    block{B}_sepconv{K}_bn                -> the same unit's .bn
    the 4 shortcut convs and batch norms  -> entry[0..2], exit[0] .shortcut_{conv,bn}
    depthwise_kernel (3, 3, C, 1)         -> depthwise.kernel (3, 3, 1, C)
"""

import pathlib
import re

import numpy as np
from flax import traverse_util

from pneumojax.models.xception import MIDDLE_BLOCKS
from pneumojax.weights import keras
from pneumojax.weights.convert import Flat, Tree, WrongWeights, check_head

_STEM = {"block1_conv1": "conv1", "block1_conv1_bn": "bn1", "block1_conv2": "conv2",
         "block1_conv2_bn": "bn2"}
_SEPCONV = re.compile(r"block(\d+)_sepconv([1-3])(_bn)?")
_SHORTCUTS = (("entry", 0), ("entry", 1), ("entry", 2), ("exit", 0))
_CLASSIFIER = {"kernel": (2048, 1000), "bias": (1000,)}  # `predictions` of the with-top file


def _flow(block: int) -> tuple[str, int]:
    """Keras's block number (2-14) -> (flow attribute, index in it)."""
    if 2 <= block <= 4:
        return "entry", block - 2
    if 5 <= block < 5 + MIDDLE_BLOCKS:
        return "middle", block - 5
    if block in (13, 14):
        return "exit", block - 13
    raise WrongWeights(f"Xception has blocks 1-14, the file names block{block}")


def keras_order() -> list[tuple[str, str]]:
    """(name, class) of the layers with weights of `keras.applications.Xception`, in the order
    Keras saves them: what reads a Keras 3 `.weights.h5` that comes without its config."""
    order = [("block1_conv1", "Conv2D"), ("block1_conv1_bn", "BatchNormalization"),
             ("block1_conv2", "Conv2D"), ("block1_conv2_bn", "BatchNormalization")]
    shortcut = 0
    for block in range(2, 15):
        units = 3 if 5 <= block <= 12 else 2
        for k in range(1, units + 1):
            order += [(f"block{block}_sepconv{k}", "SeparableConv2D"),
                      (f"block{block}_sepconv{k}_bn", "BatchNormalization")]
        if block in (2, 3, 4, 13):
            suffix = f"_{shortcut}" if shortcut else ""
            order += [(f"conv2d{suffix}", "Conv2D"),
                      (f"batch_normalization{suffix}", "BatchNormalization")]
            shortcut += 1
    return order


def from_keras(path: str | pathlib.Path, submodel: str | None = None) -> Tree:
    """A Keras Xception file (any layout `weights.keras` reads) -> backbone tree."""
    flat: Flat = {}
    shortcut_convs, shortcut_bns = [], []
    for layer, weights in keras.read_layers(path, submodel=submodel, order=keras_order()).items():
        if layer == "predictions":
            for leaf, array in weights.items():
                check_head(f"{layer}/{leaf}", array.shape, _CLASSIFIER.get(leaf))
            continue
        if layer in _STEM:
            module = (_STEM[layer],)
        elif match := _SEPCONV.fullmatch(layer):
            block, k, bn = match.groups()
            module = (*_flow(int(block)), "units", int(k) - 1, *(("bn",) if bn else ()))
        elif weights.keys() == {"kernel"} and weights["kernel"].shape[:2] == (1, 1):
            shortcut_convs.append((layer, weights))
            continue
        elif weights.keys() == {"gamma", "beta", "moving_mean", "moving_variance"}:
            shortcut_bns.append((layer, weights))
            continue
        else:
            raise WrongWeights(f"not an Xception layer: {layer!r} with {sorted(weights)}")
        _put(flat, module, layer, weights)
    for kind, found in (("conv", shortcut_convs), ("bn", shortcut_bns)):
        if len(found) != len(_SHORTCUTS):
            names = ", ".join(name for name, _ in found) or "none"
            raise WrongWeights(f"Xception has {len(_SHORTCUTS)} shortcut {kind} layers, the "
                               f"file has {len(found)} ({names})")
        for (flow, i), (layer, weights) in zip(_SHORTCUTS, found):
            _put(flat, (flow, i, f"shortcut_{kind}"), layer, weights)
    return traverse_util.unflatten_dict(flat)


def _put(flat: Flat, module: tuple, layer: str, weights: dict[str, np.ndarray]) -> None:
    for leaf, array in weights.items():
        if leaf == "depthwise_kernel":  # (3, 3, C, 1): one filter per channel
            flat[(*module, "depthwise", "kernel")] = array.transpose(0, 1, 3, 2)
        elif leaf == "pointwise_kernel":
            flat[(*module, "pointwise", "kernel")] = array
        elif leaf in keras.LEAF:
            flat[(*module, keras.LEAF[leaf])] = array
        else:
            raise WrongWeights(f"not an Xception layer: {layer!r} with {sorted(weights)}")
