"""The model contract (`pneumojax.models.contract`): every registered model keeps it, a broken
model is refused with a one-line reason, and adding a model is one registration."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common
from pneumojax import cli, config_check, models, transfer
from pneumojax.models import contract
from pneumojax.models.cnn import Standardize, global_pool
from pneumojax.models.stages import stage


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_registered_model_keeps_the_contract(name):
    shapes = contract.check(name)
    assert list(shapes)[-1] == "pre_logits"


class VGG(nnx.Module):
    """A small VGG: blocks of 3x3 conv + batch norm + ReLU + 2x2 max-pool, then a classifier,
    written as a researcher would, from flax and the package's public pieces."""

    TRANSFER_GROUPS = {"features": "backbone", "classifier": "head"}
    UNFREEZE_ORDER = ("backbone",)

    def __init__(self, *, in_channels=1, widths=(4, 8), pool_r=0.0, input_mean=(0.5,),
                 input_std=(0.25,), dtype=jnp.float32, rngs):
        self.standardize = Standardize(in_channels, input_mean, input_std)
        self.pool_r = pool_r
        self.features = nnx.List([
            nnx.List([nnx.Conv(c_in, c_out, (3, 3), dtype=dtype, param_dtype=jnp.float32,
                               rngs=rngs),
                      nnx.BatchNorm(c_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)])
            for c_in, c_out in zip((in_channels, *widths[:-1]), widths)])
        self.classifier = nnx.Linear(widths[-1], 1, param_dtype=jnp.float32, rngs=rngs)

    def block(self, i, x):
        conv, bn = self.features[i]
        return nnx.max_pool(nnx.relu(bn(conv(x))), (2, 2), strides=(2, 2))

    def __call__(self, x):
        out = {}
        x = self.standardize(x)
        for i in range(len(self.features)):
            x = stage(out, f"block{i + 1}", self.block(i, x))
        x = stage(out, "pre_logits", global_pool(x, self.pool_r))
        return self.classifier(x)[:, 0].astype(jnp.float32), out


class BesideTheComputation(VGG):
    def __call__(self, x):
        out = {}
        x = stage(out, "block1", self.block(0, self.standardize(x)))
        y = self.block(1, x)
        out["block2"] = y * 1.0  # a copy: what the classifier reads is y
        x = stage(out, "pre_logits", global_pool(y, self.pool_r))
        return self.classifier(x)[:, 0], out


class Undeclared(VGG):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra = nnx.Linear(8, 1, rngs=nnx.Rngs(0))


class ColumnLogits(VGG):
    def __call__(self, x):
        logits, out = super().__call__(x)
        return logits[:, None], out


class NoOrder(VGG):
    UNFREEZE_ORDER = ()


@pytest.mark.parametrize("cls,says", [
    (BesideTheComputation, "BesideTheComputation: stage 'block2' has an identically zero "
                           "activation gradient, so the logits do not read it: write "
                           "`x = stage(out, 'block2', y)`"),
    (Undeclared, "Undeclared: attribute(s) extra hold parameters but are in no transfer "
                 "group; declare them in Undeclared.TRANSFER_GROUPS"),
    (ColumnLogits, "ColumnLogits: logits must be float32 of shape (B,) = (2,), got float32 "
                   "(2, 1)"),
    (NoOrder, "NoOrder: NoOrder.UNFREEZE_ORDER must be a tuple of every group but 'head' "
              "(backbone), top down; got ()"),
])
def test_a_broken_model_is_refused_with_the_reason(cls, says):
    with pytest.raises(contract.ContractError) as caught:
        contract.check(cls)
    assert str(caught.value).startswith(says) and "\n" not in str(caught.value)
    with pytest.raises(contract.ContractError):  # nor can it be registered, where it shows
        models.register("broken")(NoOrder)
    assert "broken" not in models.MODELS


def test_one_attribute_name_means_one_group_throughout_the_registry():
    class Clash(VGG):
        TRANSFER_GROUPS = {"features": "backbone", "classifier": "head", "conv1": "backbone"}

    with pytest.raises(ValueError, match="clash puts attribute 'conv1' in transfer group "
                                         "'backbone', resnet50 puts it in 'stem'"):
        models.register("clash")(Clash)
    assert "clash" not in models.MODELS


@pytest.fixture
def vgg():
    name = "vgg_test"
    models.register(name)(VGG)
    yield name
    del models.MODELS[name]


def test_adding_a_model_is_one_registration(vgg):
    contract.check(vgg)
    c = common.get_config()
    c.model.name = vgg
    c.model.kwargs = ml_collections.ConfigDict(dict(widths=(4, 8), pool_r=0.0))
    c.train.freeze = "progressive"
    config_check.validate(c, devices=1)  # its name, arguments and groups come from the class
    c.model.init = "imagenet:keras"
    with pytest.raises(cli.UserError, match=f"{vgg} has no such ImageNet weights; they exist "
                       r"for resnet50 \(keras, .*\), xception \(keras\)"):
        config_check.validate(c, devices=1)

    # One training step through pneumojax.transfer: the backbone frozen, the classifier trains.
    c.model.init, c.train.freeze = "scratch", "backbone"
    frozen = transfer.frozen_groups(c, 0.0)
    assert frozen == {"backbone"}
    model = contract.instance(vgg, **c.model.kwargs)  # random weights without RNG compiles
    model.train()
    transfer.freeze_batch_norm(model, frozen)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    trainable, fixed = transfer.split(params, frozen)
    assert set(trainable) == {"classifier"} and set(fixed) == {"features"}
    tx = transfer.optimizer(optax.sgd(0.1), c)

    @jax.jit
    def step(trainable, opt_state, x, y):
        def loss_fn(trainable):
            logits, _ = nnx.merge(graphdef, trainable, fixed, rest)(x)
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()
        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 1)).astype(np.float32)
    new, _ = step(trainable, tx.init(trainable), x, jnp.asarray([0.0, 1.0, 0.0, 1.0]))
    assert not np.allclose(new["classifier"]["kernel"][...], trainable["classifier"]["kernel"][...])
