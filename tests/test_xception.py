"""Xception: Keras's exact topology, its three file layouts, and the real ImageNet weights.

The real weights come from the wheel of the PyPI package pneumonia-model-package 0.3.0,
fetched (never installed) by `.ci/run` into `.cache/wheels/`: its Keras 3 classifier embeds
`keras.applications.Xception(weights="imagenet")` unchanged (frozen, called with
training=False), and the wheel carries 16 chest X-rays of the test cohort.
"""

import dataclasses
import hashlib
import os
import pathlib
import zipfile

os.environ["KERAS_BACKEND"] = "jax"  # before keras is first imported

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pneumojax import cli, config_check, gradcam, models, transfer, weights
from pneumojax.weights import convert as conv
from pneumojax.weights import xception
from pneumojax.weights.__main__ import main
from tests.test_weights_convert import assert_same_tree, randomize_keras, write_keras_notop_h5

WHEEL = "pneumonia_model_package-0.3.0-py3-none-any.whl"
WHEEL_SHA256 = "4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536"
KERAS_FILE = ("pneumonia_model_package/trained_models/"
              "pneumonia_xception_model_val-acc_0.861.keras")
FILMS = "pneumonia_model_package/datasets/pneumonia-data/val/"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def pooled(tree: dict, preprocessing: dict, x: np.ndarray) -> np.ndarray:
    """`pre_logits` of an Xception holding `tree`, for images x in [0, 1]."""
    model = models.create("xception", in_channels=x.shape[-1], rngs=nnx.Rngs(0))
    conv.load_into(model, tree, preprocessing)
    model.eval()
    return np.asarray(nnx.jit(lambda m, x: m(x)[1]["pre_logits"])(model, jnp.asarray(x)))


def _scale(layer: str, weight: str) -> float:
    """Middle-flow blocks add to their input: damp their last batch norm, as a trained net's."""
    last_of_middle = layer.endswith("_sepconv3_bn") and 5 <= int(layer[5:].split("_")[0]) <= 12
    return 0.3 if weight == "gamma" and last_of_middle else 1.0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras' own
def test_every_keras_layout_converts_to_the_same_weights_and_keras_features(
        tmp_path, http_server, monkeypatch, capsys):
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    assert keras.backend.backend() == "jax"
    backbone = keras.applications.Xception(weights=None, include_top=False,
                                           input_shape=(71, 71, 3))
    randomize_keras(backbone, _scale)
    legacy = tmp_path / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras_notop_h5(backbone, legacy)
    backbone.load_weights(legacy)  # Keras's own legacy reader accepts the file
    tree = xception.from_keras(legacy)

    # The official file's layout, fetched: verified against its MD5, converted, cached.
    http_server.files["/xception_notop.h5"] = content = legacy.read_bytes()
    monkeypatch.setitem(weights.SOURCES, "xception", {"keras": dataclasses.replace(
        weights.SOURCES["xception"]["keras"], url=f"{http_server.base}/xception_notop.h5",
        md5=hashlib.md5(content).hexdigest())})
    argv = ["fetch", "xception", "--source", "keras", "--cache-dir", str(tmp_path / "cache")]
    assert cli.run(main, argv) == 0
    assert "--config.model.name=xception --config.model.init=imagenet:keras" in (
        capsys.readouterr().out)
    cached, preprocessing, _ = weights.load("xception", "keras", cache=tmp_path / "cache")
    assert_same_tree(cached, tree)
    assert preprocessing == {k: tuple(v) for k, v in conv.PREPROCESSING["tf"].items()}

    backbone.save_weights(tmp_path / "bare.weights.h5")  # Keras 3: names by class alone
    assert_same_tree(xception.from_keras(tmp_path / "bare.weights.h5"), tree)
    inputs = keras.Input((71, 71, 3))  # a classifier around it, as the PyPI package built
    features = keras.layers.GlobalAveragePooling2D()(backbone(inputs, training=False))
    keras.Model(inputs, keras.layers.Dense(2)(features)).save(tmp_path / "wrapped.keras")
    with pytest.raises(cli.UserError, match=f"wraps {backbone.name}; pass --submodel"):
        xception.from_keras(tmp_path / "wrapped.keras")
    assert_same_tree(xception.from_keras(tmp_path / "wrapped.keras", backbone.name), tree)

    x = np.random.default_rng(0).uniform(size=(2, 71, 71, 3)).astype(np.float32)
    tf_mode = keras.applications.xception.preprocess_input(255 * x)  # x / 127.5 - 1
    expected = np.asarray(backbone(tf_mode, training=False)).mean(axis=(1, 2))
    got = pooled(tree, conv.PREPROCESSING["tf"], x)
    assert 0.1 < np.abs(expected).max() < 100
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    grey = x.mean(axis=-1, keepdims=True)  # one channel, conv1 folded: exactly the RGB model
    np.testing.assert_allclose(pooled(*conv.to_grayscale(tree, conv.PREPROCESSING["tf"]), grey),
                               pooled(tree, conv.PREPROCESSING["tf"], np.repeat(grey, 3, -1)),
                               rtol=0, atol=1e-4)


def test_a_resnet_file_is_not_xception_and_the_cache_stays_empty(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "resnet.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("conv1_conv/conv1_conv/kernel:0", data=np.zeros((7, 7, 3, 64)))
    argv = ["convert", str(path), "--model", "xception", "--source", "keras",
            "--cache-dir", str(tmp_path / "cache")]
    assert cli.run(main, argv) == 2
    err = capsys.readouterr().err
    assert "not an Xception layer: 'conv1_conv'" in err and str(path) in err
    assert not (tmp_path / "cache").exists()


def test_offline_fetch_names_the_url_and_the_convert_route(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(weights.SOURCES, "xception", {"keras": dataclasses.replace(
        weights.SOURCES["xception"]["keras"], url="http://127.0.0.1:9/x.h5")})
    assert cli.run(main, ["fetch", "xception", "--source", "keras",
                          "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:9/x.h5" in err
    assert "python -m pneumojax.weights convert PATH --model xception --source keras" in err


def test_the_official_source_is_keras_notop_file_with_its_md5():
    src = weights.SOURCES["xception"]["keras"]
    assert src.url.endswith("/xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert src.md5 == "b0042744bf5b25fce3cb969f33bebb97" and src.preprocessing == "tf"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The PyPI wheel's files, unzipped; skips where `.ci/run` could not fetch it."""
    path = pathlib.Path(os.environ.get("PNEUMOJAX_XCEPTION_WHEEL", ROOT / ".cache/wheels" / WHEEL))
    if not path.is_file():
        pytest.skip(f"{path} is absent (no package index?); fetch it with: pip download "
                    "--no-deps pneumonia-model-package==0.3.0 -d .cache/wheels")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WHEEL_SHA256, f"{path} changed"
    out = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(out, [n for n in archive.namelist()
                                 if n == KERAS_FILE or (n.startswith(FILMS) and
                                                        n.endswith(".jpeg"))])
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras: the saved input structure
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_the_real_imagenet_xception_matches_keras_on_real_x_rays(wheel, tmp_path, capsys):
    keras = pytest.importorskip("keras")
    argv = ["convert", str(wheel / KERAS_FILE), "--model", "xception", "--source", "keras",
            "--submodel", "xception", "--cache-dir", str(tmp_path)]
    assert cli.run(main, argv) == 0, capsys.readouterr().err
    tree, preprocessing, _ = weights.load("xception", "keras", cache=tmp_path)
    films = sorted((wheel / FILMS).glob("*.jpeg"))
    assert len(films) == 16
    grey = np.stack([np.asarray(Image.open(f).convert("L").resize((150, 150), Image.BILINEAR),
                                np.float32) / 255 for f in films])[..., None]
    rgb = np.repeat(grey, 3, axis=-1)
    backbone = keras.saving.load_model(wheel / KERAS_FILE, compile=False).get_layer("xception")
    tf_mode = keras.applications.xception.preprocess_input(255 * rgb)
    expected = np.asarray(backbone(tf_mode, training=False)).mean(axis=(1, 2))
    assert expected.shape == (16, 2048) and 1 < np.abs(expected).max() < 100
    np.testing.assert_allclose(pooled(tree, preprocessing, rgb), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(pooled(*conv.to_grayscale(tree, preprocessing), grey), expected,
                               rtol=0, atol=1e-4)


def test_every_xception_config_is_valid_and_cpu_thaws_the_exit_flow_then_the_middle():
    from configs import xception as configs

    for arg in (None, *configs.VARIANTS):
        config_check.validate(configs.get_config(arg), devices=1)
    c = configs.get_config("cpu")
    backbone = {"stem", "entry", "middle", "exit"}
    assert [transfer.frozen_groups(c, epoch) for epoch in (0, 1, 2, 3.5)] == [
        backbone, backbone - {"exit"}, {"stem", "entry"}, {"stem", "entry"}]
    assert transfer.frozen_groups(configs.get_config("cpu_frozen"), 4) == backbone
    with pytest.raises(ValueError, match="unknown argument 'gpu'.*:cpu_frozen"):
        configs.get_config("gpu")


def test_gradcam_reads_xceptions_stages_and_picks_the_last_fine_enough_one():
    tiny = models.Xception.TINY_KWARGS
    assert gradcam.default_layer("xception", 299, **tiny) == "exit"  # 10x10
    assert gradcam.default_layer("xception", 128, **tiny) == "middle"  # exit is 4x4
    assert gradcam.default_layer("xception", 71, **tiny) == "block3"  # 9x9; block4 is 5x5
    model = models.contract.instance("xception", **tiny)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 1), dtype=np.uint8)
    for layer in ("stem", "block4", "middle", "exit"):
        out = gradcam.cams(graphdef, dict(params=params, rest=rest), images, layer=layer)
        maps = np.asarray(out["maps"])
        assert maps.shape == (2, 96, 96) and np.isfinite(maps).all() and maps.max() > 0, layer


def test_a_source_two_models_publish_needs_the_model(tmp_path, capsys):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"")
    assert cli.run(main, ["convert", str(path), "--source", "keras"]) == 2
    assert "source 'keras' exists for resnet50, xception; pass --model" in (
        capsys.readouterr().err)
