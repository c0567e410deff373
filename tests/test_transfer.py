"""Freezing, progressive unfreezing and discriminative learning rates on a narrow ResNet50,
and the groups every registered model declares."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, resnet50
from pneumojax import models, transfer
from pneumojax.models import contract
from pneumojax.training import step as steps


def config(**train_overrides):
    c = resnet50.get_config("demo")
    c.model.kwargs.update(width=4, stage_sizes=(1, 1, 1, 1))  # every stage, one block each
    c.data.image_size = 32
    c.train.warmup_epochs = 0.0  # the first step must move the weights
    c.train.update(train_overrides)
    return c


@pytest.fixture(scope="module")
def built():
    """A ResNet50 with random values drawn on the host (`contract.instance`): its grouping,
    not its initialisation, is under test, and nothing compiles."""
    c = config()
    model = contract.instance(c.model.name, in_channels=1, **c.model.kwargs)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return c, dict(params=params, rest=rest)


def step_with(c, state, frozen, lr_multipliers=None):
    """One jitted train step; returns (new state, the step's jaxpr)."""
    if lr_multipliers:
        c = config(lr_multipliers=lr_multipliers)
    tx, _ = steps.make_optimizer(c, 10, 100)
    trainable, _ = transfer.split(state["params"], frozen)
    s = dict(state, opt_state=tx.init(trainable), step=jnp.int32(0))
    step = steps.make_train_step(steps.train_graphdef(c, frozen), tx, c, jnp.ones(2), frozen)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (4, 32, 32, 1), dtype=np.uint8))
    labels = jnp.asarray([0, 1, 0, 1])
    jaxpr = jax.make_jaxpr(step)(s, images, labels)
    return jax.jit(step)(s, images, labels)[0], jaxpr


def groups_changed(before, after) -> set[str]:
    changed = set()
    flat_a = jax.tree_util.tree_leaves_with_path(before)
    flat_b = jax.tree.leaves(after)
    for (path, a), b in zip(flat_a, flat_b):
        if not np.array_equal(a, b):
            changed.add(transfer.group(path))
    return changed


def test_frozen_groups_per_mode_and_epoch():
    assert transfer.frozen_groups(config(freeze="none"), 0) == frozenset()
    assert "stage4" in transfer.frozen_groups(config(freeze="backbone"), 99)
    c = config(freeze="progressive", unfreeze_epochs=(1, 2, 3, 4, 5))
    assert transfer.frozen_groups(c, 0.5) == {"stem", "stage1", "stage2", "stage3", "stage4"}
    assert transfer.frozen_groups(c, 1.0) == {"stem", "stage1", "stage2", "stage3"}
    assert transfer.frozen_groups(c, 4.2) == {"stem"}
    assert transfer.frozen_groups(c, 5.0) == frozenset()  # all train
    with pytest.raises(ValueError, match="freeze='sometimes'"):
        transfer.frozen_groups(config(freeze="sometimes"), 0)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_model_freezes_all_but_its_head_and_thaws_its_own_order(name):
    cls = models.MODELS[name]
    c = common.get_config()
    c.model.name = name
    c.train.update(freeze="backbone", unfreeze_epochs=(1, 2, 3, 4, 5))
    backbone = set(cls.TRANSFER_GROUPS.values()) - {"head"}
    assert transfer.frozen_groups(c, 99) == backbone
    c.train.freeze = "progressive"
    order = cls.UNFREEZE_ORDER
    for thawed in range(len(order) + 1):  # the head alone, then one more group each epoch
        assert transfer.frozen_groups(c, thawed + 0.5) == backbone - set(order[:thawed])


@pytest.mark.slow
def test_a_frozen_backbone_is_untouched_costs_no_backward_pass_and_no_optimizer_state(built):
    c, state = built
    backbone = transfer.frozen_groups(config(freeze="backbone"), 0)
    new, jaxpr_frozen = step_with(c, state, backbone)
    assert groups_changed(state["params"], new["params"]) == {"head"}
    # batch norm of frozen stages stays in inference mode: running statistics unchanged
    assert groups_changed(state["rest"], new["rest"]) == set()
    head_params = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(state["params"])
                      if transfer.group(p) == "head")
    moments = [x for x in jax.tree.leaves(new["opt_state"]) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * head_params  # Adam's mu and nu, of the head only
    _, jaxpr_full = step_with(c, state, frozenset())
    convs = lambda j: str(j).count("conv_general_dilated")
    assert convs(jaxpr_full) > 2.5 * convs(jaxpr_frozen)  # forward only when frozen


@pytest.mark.slow
def test_progressive_stage_trains_only_what_is_thawed(built):
    c, state = built
    frozen = transfer.frozen_groups(config(freeze="progressive"), 1.5)  # stage4 thawed
    new, _ = step_with(c, state, frozen)
    assert groups_changed(state["params"], new["params"]) == {"stage4", "head"}
    # batch norm of the thawed stage trains (running statistics move), the frozen ones do not
    assert groups_changed(state["rest"], new["rest"]) == {"stage4"}


@pytest.mark.slow
def test_discriminative_learning_rates_scale_each_group(built):
    c, state = built
    multipliers = dict(stem=0.0, stage1=0.0, stage2=1.0, stage3=1.0, stage4=1.0, head=1.0)
    new, _ = step_with(c, state, frozenset(), multipliers)
    assert groups_changed(state["params"], new["params"]) == {"stage2", "stage3", "stage4",
                                                              "head"}
    with pytest.raises(ValueError, match="unknown groups"):
        steps.make_optimizer(config(lr_multipliers={"stage9": 1.0}), 10, 100)


def test_graft_keeps_the_moments_of_groups_that_stay_trainable(built):
    c, state = built
    tx, _ = steps.make_optimizer(c, 10, 100)
    head_only = transfer.frozen_groups(config(freeze="backbone"), 0)
    old = tx.init(transfer.split(state["params"], head_only)[0])
    old = jax.tree.map(lambda x: x + 7, old)  # recognisable values
    new = transfer.graft(tx.init(state["params"]), old)
    kept = [x for p, x in jax.tree_util.tree_leaves_with_path(new)
            if "head" in jax.tree_util.keystr(p)]
    fresh = [x for p, x in jax.tree_util.tree_leaves_with_path(new)
             if "layer4" in jax.tree_util.keystr(p)]
    assert kept and all((np.asarray(x) == 7).all() for x in kept)
    assert fresh and all((np.asarray(x) == 0).all() for x in fresh)


def declared_variants() -> list:
    """(name, kwargs) of every registered model, small, and again with its LESION_KWARGS."""
    variants = []
    for name, cls in models.MODELS.items():
        tiny = dict(getattr(cls, "TINY_KWARGS", {}))
        variants.append(pytest.param(name, tiny, id=name))
        if getattr(cls, "LESION_KWARGS", None) is not None:
            variants.append(pytest.param(name, {**tiny, **cls.LESION_KWARGS}, id=f"{name}-lesion"))
    return variants


@pytest.mark.parametrize("name,kwargs", declared_variants())
def test_every_parameter_is_in_the_group_its_model_declares(name, kwargs):
    model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
    declared = models.MODELS[name].TRANSFER_GROUPS
    grouped = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        assert transfer.group(path) == declared[path[0].key]
        grouped.setdefault(transfer.group(path), set()).add(path[0].key)
    assert set(grouped) == set(declared.values())  # no declared group is empty


def test_freeze_backbone_trains_the_lesion_head():  # it was once left out, and froze by mistake
    model = nnx.eval_shape(lambda: models.create("deep_cnn", widths=(4, 8), head="lesion",
                                                 rngs=nnx.Rngs(0)))
    c = common.get_config()
    c.model.name, c.train.freeze = "deep_cnn", "backbone"
    trainable, _ = transfer.split(nnx.state(model, nnx.Param), transfer.frozen_groups(c, 0))
    assert set(trainable) == {"lesion"}


@pytest.mark.parametrize("name,kwargs", declared_variants())
def test_frozen_groups_run_batch_norm_in_inference_mode_and_nothing_else(name, kwargs):
    model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
    model.train()
    c = common.get_config()
    c.model.name, c.train.freeze = name, "backbone"
    frozen = transfer.frozen_groups(c, 0)
    transfer.freeze_batch_norm(model, frozen)
    declared = models.MODELS[name].TRANSFER_GROUPS
    for path, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            assert module.use_running_average is (declared[path[0]] in frozen), path
        if isinstance(module, nnx.Dropout):  # the head's dropout keeps training
            assert module.deterministic is False, path


def test_a_parameter_outside_every_declared_group_is_refused():
    with pytest.raises(ValueError, match="'extra' are in no transfer group; declare 'extra'"):
        transfer.group((jax.tree_util.DictKey("extra"), jax.tree_util.DictKey("kernel")))
