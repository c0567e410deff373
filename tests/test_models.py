"""Tests for pneumojax.models: the shared contract, ResNet50's exact topology, modes and bf16.

ResNet50 is never randomly initialised here: on a 2-core CPU that costs ~20 s of
RNG compiles. `nnx.eval_shape` builds it abstractly, which is all that parameter
counts, shapes and dtypes need; numerics run on tiny variants.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pneumojax import models
from pneumojax.models import contract

# The built-in architectures' topology, pinned at their default configurations. The contract
# itself (tests/test_contract.py) and the loops below cover every registered model.
STAGES = {
    "shallow_cnn": ["block1", "block2", "block3", "pre_logits"],
    "deep_cnn": ["block1", "block2", "block3", "block4", "pre_logits"],
    "resnet50": ["stem", "stage1", "stage2", "stage3", "stage4", "pre_logits"],
}
# Channels of each stage and the stride it sits at, for the default configurations.
CHANNELS = {
    "shallow_cnn": [(32, 2), (64, 4), (128, 8), (128, None)],
    "deep_cnn": [(32, 2), (64, 4), (128, 8), (256, 16), (128, None)],
    "resnet50": [(64, 4), (256, 4), (512, 8), (1024, 16), (2048, 32), (2048, None)],
}


@functools.cache
def abstract(name: str, **kwargs) -> nnx.Module:
    """The model with ShapeDtypeStructs for arrays: built in ~1 s, without any RNG compile."""
    return nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))


def forward(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array):
    """The trainer's pattern: a pure function of (graphdef, state, x) that returns the new state."""
    model = nnx.merge(graphdef, state)
    logits, inter = model(x)
    return logits, inter, nnx.state(model)


jit_forward = jax.jit(forward, static_argnums=0)


def out_shapes(model: nnx.Module, shape: tuple[int, ...]
               ) -> tuple[jax.ShapeDtypeStruct, dict, list]:
    """(logits, intermediates, their names in the model's own order) without computing anything."""
    graphdef, state = nnx.split(model)
    names: list[str] = []

    def run(state, x):
        logits, inter = nnx.merge(graphdef, state)(x)
        names.extend(inter)  # eval_shape hands dicts back key-sorted; record the real order
        return logits, inter

    logits, inter = jax.eval_shape(run, state, jax.ShapeDtypeStruct(shape, jnp.float32))
    return logits, inter, names


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


# Two cases that cover both sizes and both channel counts (ResNet50 traces take seconds).
CONTRACT_CASES = [(name, size, channels) for name in STAGES
                  for size, channels in [((32, 32), 1), ((48, 64), 3)]]


@pytest.mark.parametrize("name,size,channels", CONTRACT_CASES,
                         ids=[f"{n}-{h}x{w}x{c}" for n, (h, w), c in CONTRACT_CASES])
def test_output_contract(name, size, channels):
    logits, inter, names = out_shapes(abstract(name, in_channels=channels), (2, *size, channels))
    assert logits.shape == (2,) and logits.dtype == jnp.float32
    assert names == STAGES[name]
    for stage, (c, stride) in zip(names, CHANNELS[name]):
        # The CNNs' 2x2 pools floor odd sizes (torch's MaxPool2d(2)); ResNet's padded
        # stride-2 layers round up. At these sizes only ResNet meets an odd size.
        spatial = (ceil_div(size[0], stride), ceil_div(size[1], stride)) if stride else ()
        assert inter[stage].shape == (2, *spatial, c), stage
        assert inter[stage].dtype == jnp.float32


def test_resnet50_stage_shapes_at_64px():
    _, inter, _ = out_shapes(abstract("resnet50", in_channels=3), (2, 64, 64, 3))
    assert {k: v.shape for k, v in inter.items()} == {
        "stem": (2, 16, 16, 64), "stage1": (2, 16, 16, 256), "stage2": (2, 8, 8, 512),
        "stage3": (2, 4, 4, 1024), "stage4": (2, 2, 2, 2048), "pre_logits": (2, 2048)}


def test_parameter_counts():
    # torchvision resnet50: 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000.
    v15 = abstract("resnet50", in_channels=3)
    assert models.ResNet50.backbone_params(v15) == 25_557_032 - 2_049_000 == 23_508_032
    assert models.count_params(v15) == 23_508_032 + 2048 + 1  # plus the one-logit head
    # v1 (Keras) adds a bias to every conv, one per output channel, and every conv is
    # followed by a BN of the same width, so the extra count equals the BN channels:
    # stem 64; per block 6 * planes (planes + planes + 4 * planes); plus one 4 * planes
    # shortcut per stage: 64 + 3*6*64+256 + 4*6*128+512 + 6*6*256+1024 + 3*6*512+2048
    # = 64 + 1408 + 3584 + 10240 + 11264 = 26,560. Keras' ResNet50(include_top=False)
    # reports the same 23,534,592 trainable parameters.
    v1 = abstract("resnet50", in_channels=3, variant="v1")
    assert models.ResNet50.backbone_params(v1) == 23_508_032 + 26_560 == 23_534_592
    assert models.count_params(v15, nnx.BatchStat) == 2 * 26_560  # running mean and var
    # Grey-scale input: the stem conv loses 7 * 7 * 2 * 64 weights.
    assert models.ResNet50.backbone_params(abstract("resnet50")) == 23_508_032 - 6272
    # ShallowCNN: 3x3 convs 1->32->64->128 with bias, then 128 -> 1.
    assert models.count_params(abstract("shallow_cnn")) == 320 + 18_496 + 73_856 + 129 == 92_801
    # DeepCNN: two bias-free 3x3 convs per block plus 2 BN vectors each, then 256->128->1.
    blocks = [9 * a * b + 9 * b * b + 4 * b for a, b in [(1, 32), (32, 64), (64, 128), (128, 256)]]
    assert models.count_params(abstract("deep_cnn")) == sum(blocks) + 32_896 + 129 == 1_205_665


@pytest.mark.parametrize("kwargs,stride_at,bias,eps", [
    ({}, "conv2", False, 1e-5), ({"variant": "v1"}, "conv1", True, 1.001e-5)], ids=["v1.5", "v1"])
def test_resnet_variants(kwargs, stride_at, bias, eps):
    model = abstract("resnet50", in_channels=3, **kwargs)  # the instances the count test built
    block = model.layer2[0]
    assert {k: getattr(block, k).strides for k in ("conv1", "conv2", "conv3")} == {
        k: 2 if k == stride_at else 1 for k in ("conv1", "conv2", "conv3")}
    assert block.downsample_conv.strides == 2 and model.layer2[1].downsample_conv is None
    assert all(c.use_bias is bias for c in (model.conv1, block.conv1, block.downsample_conv))
    assert model.bn1.epsilon == block.bn3.epsilon == eps and block.bn3.momentum == 0.9
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    assert [len(s) for s in layers] == [3, 4, 6, 3]


def test_resnet_stem_pads_symmetrically_like_torch():
    """A centre-tap stem kernel maps input pixel (4i, 4j) to stem pixel (i, j) exactly.

    XLA's 'SAME' would pad the 7x7/2 conv by (2, 3) on a 64 px input and put the
    conv centres on odd pixels: the stem would come out all zero.
    """
    graphdef, abstract_state = nnx.split(abstract("resnet50", width=4, stage_sizes=(1, 1, 1, 1)))
    model = nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_state))
    model.eval()
    model.standardize.std[...] = 1.0
    model.conv1.kernel[3, 3] = 1.0  # centre tap, every output channel
    model.bn1.scale[...] = model.bn1.var[...] = 1.0
    x = np.zeros((1, 64, 64, 1), np.float32)
    x[0, 12, 20] = 1.0
    logits, inter, _ = jit_forward(*nnx.split(model), x)
    expected = np.zeros((1, 16, 16, 4), np.float32)
    expected[0, 3, 5] = 1.0 / np.sqrt(1.0 + 1e-5)
    np.testing.assert_allclose(inter["stem"], expected, rtol=1e-6)
    assert np.isfinite(logits).all() and inter["stage4"].shape == (1, 2, 2, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(models.MODELS))
def test_bf16_computes_in_bf16_with_float32_params_and_logits(name):
    model = abstract(name, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    logits, inter, names = out_shapes(model, (2, 32, 32, 1))
    assert logits.dtype == jnp.float32
    assert inter[names[-2]].dtype == jnp.bfloat16  # the last feature map


@pytest.fixture(scope="module")
def deep_cnn() -> models.DeepCNN:
    return models.DeepCNN(widths=(4, 4, 4, 4), hidden=8, rngs=nnx.Rngs(params=0, dropout=1))


def test_train_and_eval_modes(deep_cnn):
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 1)).astype(np.float32)
    deep_cnn.train()
    train_def, state = nnx.split(deep_cnn)
    deep_cnn.eval()
    eval_def, eval_state = nnx.split(deep_cnn)
    # One state serves both graphdefs, so the trainer splits each mode once.
    assert jax.tree.structure(state) == jax.tree.structure(eval_state)

    a, _, state1 = jit_forward(train_def, state, x)
    b, _, state2 = jit_forward(train_def, state1, x)
    assert not np.allclose(a, b)  # fresh dropout masks: BN uses batch stats both times
    bn = lambda s: np.asarray(s["blocks"][0]["bn1"]["mean"][...])
    assert not np.allclose(bn(state1), bn(state)) and not np.allclose(bn(state2), bn(state1))

    c, _, state3 = jit_forward(eval_def, state2, x)
    d, _, state4 = jit_forward(eval_def, state3, x)
    np.testing.assert_array_equal(c, d)
    np.testing.assert_array_equal(bn(state4), bn(state2))  # eval leaves running stats alone

    nnx.update(deep_cnn, state2)  # the stepped state goes back into the object graph
    np.testing.assert_array_equal(deep_cnn.blocks[0].bn1.mean[...], bn(state2))


def test_jit_round_trip_matches_eager_and_pre_logits_feed_the_head(deep_cnn):
    model = deep_cnn
    model.eval()
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 1)).astype(np.float32)
    eager_logits, eager_inter = model(x)
    logits, inter, _ = jit_forward(*nnx.split(model), x)
    np.testing.assert_allclose(logits, eager_logits, rtol=1e-5, atol=1e-6)
    for name in STAGES["deep_cnn"]:
        np.testing.assert_allclose(inter[name], eager_inter[name], rtol=1e-5, atol=1e-6)
    # pre_logits is the tensor the head reads, not a detached copy of something nearby.
    np.testing.assert_allclose(model.head(eager_inter["pre_logits"])[:, 0], eager_logits, rtol=1e-6)


def test_input_standardisation_is_a_constant_not_a_param():
    model = abstract("shallow_cnn", in_channels=3, input_mean=(0.485, 0.456, 0.406),
                     input_std=(0.229, 0.224, 0.225))
    assert type(model.standardize.mean) is nnx.Variable and model.standardize.std.shape == (3,)
    assert not jax.tree.leaves(nnx.state(model.standardize, nnx.Param))
    with pytest.raises(ValueError, match="3 input channels"):
        out_shapes(model, (1, 32, 32, 1))


def test_registry():
    assert isinstance(abstract("resnet50"), models.ResNet50)
    assert set(STAGES) <= set(models.MODELS)
    with pytest.raises(ValueError, match=f"unknown model 'vgg16'; valid names: "
                                         f"{', '.join(sorted(models.MODELS))}"):
        models.create("vgg16", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model name 'resnet50' is taken by ResNet50"):
        models.register("resnet50")(models.ShallowCNN)
    assert models.MODELS["resnet50"] is models.ResNet50
    with pytest.raises(ValueError, match="v1.5, v1"):
        models.create("resnet50", variant="v2", rngs=nnx.Rngs(0))


def test_global_pool_runs_from_the_mean_to_the_max_and_weights_positions_by_softmax():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    pool = models.cnn.global_pool
    np.testing.assert_allclose(pool(x), x.mean((1, 2)), rtol=1e-6)
    x64 = x.astype(np.float64).reshape(2, 35, 3)
    for r in (0.5, 10.0):
        expected = np.log(np.mean(np.exp(r * x64), axis=1)) / r
        np.testing.assert_allclose(pool(x, r), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool(x, 1e-4), x.mean((1, 2)), atol=1e-4)  # no cancellation
    # max - log(N) / r <= LSE_r <= max: the max is the limit.
    big = np.asarray(pool(x, 1e3))
    assert np.all(big <= x.max((1, 2)) + 1e-5) and np.all(big >= x.max((1, 2)) - np.log(35) / 1e3)
    # Evidence counts where it is strongest: the gradient is softmax(r x) over positions.
    grad = jax.grad(lambda v: pool(v, 10.0).sum())(x).reshape(2, 35, 3)
    np.testing.assert_allclose(grad, jax.nn.softmax(10.0 * x64, axis=1), rtol=1e-4, atol=1e-7)
    # Stable where exp(r x) overflows float32, and float32 out of a bf16 body.
    out = pool(jnp.full((1, 4, 4, 2), 100.0, jnp.bfloat16), 10.0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 100.0)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_pool_r_sets_every_models_global_pooling(name):
    # 64 px: a tiny ResNet's last stage is 2x2 there (1x1 at 32 px, where every pooling agrees).
    x = np.random.default_rng(2).uniform(size=(2, 64, 64, 1)).astype(np.float32)
    kwargs = getattr(models.MODELS[name], "TINY_KWARGS", {})
    pooled = {}
    for r in (0.0, 10.0):
        model = contract.instance(name, pool_r=r, **kwargs)  # the same weights for both
        model.eval()
        _, inter, _ = jit_forward(*nnx.split(model), x)
        pooled[r] = inter["pre_logits"]
    assert not np.allclose(pooled[0.0], pooled[10.0])  # same weights, another pooling
    with pytest.raises(ValueError, match="pool_r must be >= 0"):
        nnx.eval_shape(lambda: models.create(name, pool_r=-1.0, rngs=nnx.Rngs(0), **kwargs))


@pytest.mark.parametrize("name,kwargs", [("shallow_cnn", dict(width=4)), (
    "resnet50", dict(width=4, stage_sizes=(1, 1, 1, 1))), ("deep_cnn", dict(widths=(4,) * 4))])
def test_pre_logits_is_the_global_pool_of_the_last_stage(name, kwargs):
    x = np.random.default_rng(2).uniform(size=(2, 64, 64, 1)).astype(np.float32)
    model = contract.instance(name, pool_r=10.0, **kwargs)
    model.eval()
    _, inter, _ = jit_forward(*nnx.split(model), x)
    features = models.cnn.global_pool(inter[STAGES[name][-2]], 10.0)
    if name == "deep_cnn":  # its dense head's hidden layer reads the pool
        features = nnx.relu(model.hidden(features))
    np.testing.assert_allclose(inter["pre_logits"], features, rtol=1e-5, atol=1e-6)


def test_the_lesion_head_scores_cells_and_pools_them_into_the_logit():
    x = np.random.default_rng(3).uniform(size=(2, 32, 32, 1)).astype(np.float32)
    model = contract.instance("deep_cnn", widths=(4, 8), head="lesion", pool_r=10.0)
    model.eval()
    logits, inter = model(x)
    cells = inter["lesion_logits"]
    assert cells.shape == (2, 8, 8) and cells.dtype == jnp.float32
    expected = model.lesion(inter["block2"])[..., 0]  # the 1x1 conv of the last block
    np.testing.assert_allclose(cells, expected, rtol=1e-6)
    np.testing.assert_allclose(logits, models.cnn.global_pool(cells[..., None], 10.0)[:, 0],
                               rtol=1e-6)
    # pre_logits is on the path: the pooled cell score, of which the logit is the one column
    assert list(inter) == ["block1", "block2", "lesion_logits", "pre_logits"]
    np.testing.assert_array_equal(inter["pre_logits"][:, 0], logits)
    assert not hasattr(model, "hidden")  # no dense head to train or to misread
    with pytest.raises(ValueError, match="unknown head 'mlp'; valid: dense, lesion"):
        models.create("deep_cnn", head="mlp", rngs=nnx.Rngs(0))
