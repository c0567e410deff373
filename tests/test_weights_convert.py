"""Tests for pneumojax.weights.convert: exact parity with Keras and torch on random weights.

No file is downloaded: each test writes random weights in the official layout (a
torchvision state dict; the legacy HDF5 file of Keras' notop weights), converts them,
and compares pooled features with the framework's own forward pass at 64 px.
Random weights are drawn so that activations stay O(1) through the 16 blocks
(He-scaled kernels, bn3 scales well below 1), which makes an absolute tolerance of
1e-4 meaningful in float32.
"""

import os
import shlex
import sys

os.environ["KERAS_BACKEND"] = "jax"  # before keras is first imported

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import pneumojax.weights.convert as conv
from pneumojax.weights import resnet
from pneumojax.cli import UserError
from pneumojax.models.resnet import ResNet50

SIZE = 64
STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))  # (blocks, planes) of ResNet50


def build(**kwargs) -> ResNet50:
    """A ResNet50 in eval mode with zeros everywhere: shapes only, no ~20 s RNG init."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNet50(rngs=nnx.Rngs(0), **kwargs)))
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    model.eval()
    return model


@nnx.jit
def pooled(model: ResNet50, x: jax.Array) -> jax.Array:
    return model(x)[1]["pre_logits"]


def images(channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(2, SIZE, SIZE, channels)).astype(np.float32)


def random_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A plausible trained value for a conv/BN variable, by its (torch or Keras) name."""
    if name in ("kernel", "weight") and len(shape) == 4:
        fan_in = np.prod(shape[:-1]) if name == "kernel" else np.prod(shape[1:])
        value = rng.normal(0, np.sqrt(2 / fan_in), shape)
    elif name in ("depthwise_kernel", "pointwise_kernel"):  # (kh, kw, C, 1), (1, 1, C, O)
        value = rng.normal(0, np.sqrt(1 / np.prod(shape[:3 if name[0] == "p" else 2])), shape)
    elif name in ("gamma", "weight"):
        value = rng.uniform(0.5, 1.0, shape)
    elif name in ("moving_variance", "running_var"):
        value = rng.uniform(0.5, 1.5, shape)
    else:  # conv and BN biases, moving means
        value = rng.normal(0, 0.1, shape)
    return value.astype(np.float32)


def torchvision_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random ResNet50 weights under torchvision's names, `fc` and counters included."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        sd[f"{name}.weight"] = random_weight("weight", (c_out, c_in, k, k), rng)

    def bn(name: str, c: int, damp: float = 1.0) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{name}.{leaf}"] = random_weight(leaf, (c,), rng)
        sd[f"{name}.weight"] *= damp
        sd[f"{name}.num_batches_tracked"] = np.array(1000, np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    c_in = 64
    for s, (blocks, planes) in enumerate(STAGES):
        for b in range(blocks):
            p = f"layer{s + 1}.{b}"
            conv(f"{p}.conv1", planes, c_in, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", 4 * planes, planes, 1)
            bn(f"{p}.bn3", 4 * planes, damp=0.3)
            if b == 0:
                conv(f"{p}.downsample.0", 4 * planes, c_in, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            c_in = 4 * planes
    sd["fc.weight"] = rng.normal(0, 0.01, (1000, 2048)).astype(np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


def torch_features(sd: dict[str, np.ndarray], x_nhwc: np.ndarray) -> np.ndarray:
    """torchvision's ResNet50 forward (eval mode, no `fc`) from torch.nn.functional ops."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in sd.items()}

    def bn(x, p: str):
        return F.batch_norm(x, t[f"{p}.running_mean"], t[f"{p}.running_var"], t[f"{p}.weight"],
                            t[f"{p}.bias"], training=False, eps=1e-5)

    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    x = F.relu(bn(F.conv2d(x, t["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for s, (blocks, _) in enumerate(STAGES):
        for b in range(blocks):
            p, stride = f"layer{s + 1}.{b}", 2 if s > 0 and b == 0 else 1
            y = F.relu(bn(F.conv2d(x, t[f"{p}.conv1.weight"]), f"{p}.bn1"))
            y = F.conv2d(y, t[f"{p}.conv2.weight"], stride=stride, padding=1)
            y = F.relu(bn(y, f"{p}.bn2"))
            y = bn(F.conv2d(y, t[f"{p}.conv3.weight"]), f"{p}.bn3")
            if b == 0:
                x = F.conv2d(x, t[f"{p}.downsample.0.weight"], stride=stride)
                x = bn(x, f"{p}.downsample.1")
            x = F.relu(y + x)
    return F.adaptive_avg_pool2d(x, 1).flatten(1).numpy()


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return torchvision_state_dict()


def flat(tree: dict) -> dict:
    return traverse_util.flatten_dict(tree)


def assert_same_tree(a: dict, b: dict) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


@pytest.mark.slow
def test_torchvision_parity(state_dict):
    x = images()
    mean, std = (np.array(conv.PREPROCESSING["torch"][k], np.float32) for k in ("mean", "std"))
    expected = torch_features(state_dict, (x - mean) / std)
    model = build(in_channels=3, variant="v1.5")
    conv.load_into(model, resnet.from_torch(state_dict), conv.PREPROCESSING["torch"])
    got = np.asarray(pooled(model, jnp.asarray(x)))
    assert 0.1 < np.abs(expected).max() < 100  # O(1) features: the tolerance below means something
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def randomize_keras(model, scale, seed: int = 0) -> None:
    """Seeded plausible weights (`random_weight`) into every layer of a Keras model, each
    times `scale(layer name, weight name)`."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        layer.set_weights([random_weight(w.name, tuple(w.shape), rng) * scale(layer.name, w.name)
                           for w in layer.weights])


def write_keras_notop_h5(model, path) -> None:
    """A Keras model's weights, laid out like the official notop `.h5` files.

    Keras 3 cannot write this layout: `save_weights` insists on `.weights.h5` (a new
    layout, `layers/<name>/vars/0`) and `model.save("x.h5")` nests the weights under
    `model_weights/` with names lacking ":0". So it is written here as Keras 2 wrote it:
    root attributes `layer_names`, `backend`, `keras_version`; one group per layer with
    a `weight_names` attribute and datasets at `<layer>/<layer>/<weight>:0`.
    """
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights  # legacy order
            names = [f"{layer.name}/{w.name}:0" for w in weights]
            group.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
            for name, w in zip(names, weights):
                group.create_dataset(name, data=np.asarray(w))


def _resnet_scale(layer: str, weight: str) -> float:
    if weight == "gamma" and layer.endswith("_3_bn"):
        return 0.3  # keep the residual sums O(1), as in the torch test
    if layer == "conv1_conv" and weight == "kernel":
        return 1 / 64  # caffe inputs span 0-255: a trained stem's weights are small
    return 1.0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras' own
def test_keras_parity(tmp_path):
    keras = pytest.importorskip("keras")
    h5py = pytest.importorskip("h5py")
    assert keras.backend.backend() == "jax"
    model = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg",
                                        input_shape=(SIZE, SIZE, 3))
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    randomize_keras(model, _resnet_scale)
    write_keras_notop_h5(model, path)
    model.load_weights(path)  # Keras' own legacy reader accepts the file
    tree = resnet.from_keras(path)

    x = images()
    caffe = keras.applications.resnet50.preprocess_input(255 * x)  # RGB -> BGR, minus mean
    expected = np.asarray(model(caffe, training=False))
    flax_model = build(in_channels=3, variant="v1")
    conv.load_into(flax_model, tree, conv.PREPROCESSING["caffe"])
    got = np.asarray(pooled(flax_model, jnp.asarray(x)))
    assert 0.1 < np.abs(expected).max() < 100
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)

    # Keras 3's own legacy `.h5` (full model: `model_weights/`, no ":0") converts the same,
    # and so does a file without the `layer_names`/`weight_names` attributes.
    model.save(tmp_path / "keras3.h5")
    assert_same_tree(resnet.from_keras(tmp_path / "keras3.h5"), tree)
    model.save(tmp_path / "keras3.keras")  # Keras 3's archive: names come from its config
    assert_same_tree(resnet.from_keras(tmp_path / "keras3.keras"), tree)
    with h5py.File(path, "a") as f:
        del f.attrs["layer_names"]
        for group in f.values():
            del group.attrs["weight_names"]
    assert_same_tree(resnet.from_keras(path), tree)


def test_grayscale_equals_replicated_rgb(state_dict):
    tree = resnet.from_torch(state_dict)
    gray_tree, gray_pre = conv.to_grayscale(tree, conv.PREPROCESSING["torch"])
    assert gray_tree["conv1"]["kernel"].shape == (7, 7, 1, 64)
    assert tree["conv1"]["kernel"].shape == (7, 7, 3, 64)  # the input tree is left alone
    gray = build(in_channels=1)
    conv.load_into(gray, gray_tree, gray_pre)
    rgb = build(in_channels=3)
    conv.load_into(rgb, tree, {k: v * 3 for k, v in gray_pre.items()})
    x = images(channels=1)
    np.testing.assert_allclose(np.asarray(pooled(gray, jnp.asarray(x))),
                               np.asarray(pooled(rgb, jnp.asarray(np.repeat(x, 3, -1)))),
                               rtol=0, atol=1e-5)


def test_torch_save_round_trip(state_dict, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "resnet50.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
    loaded = conv.load_state_dict(path)
    assert_same_tree(loaded, state_dict)
    assert loaded["bn1.num_batches_tracked"].dtype == np.int64

    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="not a flat state dict"):
        conv.load_state_dict(tmp_path / "checkpoint.pt")


class _Exploit:
    """Unpickling this runs a shell command: what a booby-trapped `.pth` does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_malicious_pickle_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Exploit(str(marker))}, path)
    with pytest.raises(UserError, match="refused as unsafe: loading it would import posix.system"):
        conv.load_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: the file really is live
    assert marker.exists()


def test_safetensors_needs_no_torch(state_dict, tmp_path, monkeypatch):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(state_dict, str(path))
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    loaded = conv.load_state_dict(path)
    assert_same_tree(loaded, state_dict)
    assert_same_tree(resnet.from_torch(loaded), resnet.from_torch(state_dict))
    with pytest.raises(UserError, match="pip install torch"):
        conv.load_state_dict(tmp_path / "model.pth")
    with pytest.raises(ValueError, match="safetensors"):
        conv.load_state_dict(tmp_path / "model.bin")


def test_load_into_names_every_problem():
    model = nnx.eval_shape(lambda: ResNet50(in_channels=1, rngs=nnx.Rngs(0)))
    backbone = nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    tree = flat({k: v for k, v in backbone.items() if k != "head"})
    tree = {k: np.zeros(v.shape, np.float32) for k, v in tree.items()}
    del tree[("layer4", 2, "bn3", "var")]
    tree[("layer4", 3, "conv1", "kernel")] = np.zeros((1, 1, 2048, 512), np.float32)
    tree[("conv1", "kernel")] = np.zeros((7, 7, 3, 64), np.float32)
    with pytest.raises(ValueError) as err:
        conv.load_into(model, traverse_util.unflatten_dict(tree), conv.PREPROCESSING["torch"])
    message = str(err.value)
    assert "missing: layer4.2.bn3.var" in message
    assert "unexpected: layer4.3.conv1.kernel" in message
    assert "shape mismatch: conv1.kernel is (7, 7, 3, 64), model has (7, 7, 1, 64)" in message
    assert "shape mismatch: standardize.mean is (3,)" in message


def test_converters_reject_foreign_names(state_dict):
    with pytest.raises(ValueError, match="layer1.0.se.fc1.weight"):
        resnet.from_torch({**state_dict, "layer1.0.se.fc1.weight": np.zeros((4, 256, 1, 1))})


def test_check_names_what_does_not_fit(state_dict):
    tree = resnet.from_torch(state_dict)
    conv.check(tree, "resnet50", variant="v1.5")
    resnet101 = {**state_dict, **{f"layer3.{b}.conv1.weight": np.zeros((256, 1024, 1, 1))
                                  for b in range(6, 23)}}
    with pytest.raises(conv.WrongWeights, match=r"unexpected: layer3.10.conv1.kernel.*and 11 more"):
        conv.check(resnet.from_torch(resnet101), "resnet50", variant="v1.5")
    with pytest.raises(conv.WrongWeights, match="missing: conv1.bias"):
        # Keras' v1 has conv biases: torch weights do not fit it
        conv.check(tree, "resnet50", variant="v1")
    nan = {**state_dict, "bn1.running_var": np.full(64, np.nan, np.float32)}
    with pytest.raises(conv.WrongWeights, match="not finite: bn1.var"):
        conv.check(resnet.from_torch(nan), "resnet50", variant="v1.5")
    squashed = {**state_dict, "conv1.weight": np.zeros(64, np.float32)}  # no 4-D kernel to turn
    with pytest.raises(conv.WrongWeights, match=r"conv1.kernel is \(64,\)"):
        conv.check(resnet.from_torch(squashed), "resnet50", variant="v1.5")


def test_a_classifier_with_another_head_is_not_the_imagenet_file(state_dict, tmp_path):
    ten_classes = {**state_dict, "fc.weight": np.zeros((10, 2048), np.float32)}
    with pytest.raises(conv.WrongWeights, match=r"fc.weight is \(10, 2048\).*fine-tuned"):
        resnet.from_torch(ten_classes)
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "top.h5", "w") as f:
        f.create_dataset("predictions/predictions/kernel:0", data=np.zeros((2048, 2), np.float32))
    with pytest.raises(conv.WrongWeights, match=r"predictions/kernel is \(2048, 2\)"):
        resnet.from_keras(tmp_path / "top.h5")
    with h5py.File(tmp_path / "vgg.h5", "w") as f:
        f.create_dataset("block1_conv1/block1_conv1/kernel:0", data=np.zeros((3, 3, 3, 64)))
    with pytest.raises(conv.WrongWeights, match="not a ResNet50 layer: 'block1_conv1'"):
        resnet.from_keras(tmp_path / "vgg.h5")
