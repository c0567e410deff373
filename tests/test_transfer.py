"""Freezing, progressive unfreezing and discriminative learning rates on a narrow ResNet50."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import resnet50
from pneumojax import models, train, transfer


def config(**train_overrides):
    c = resnet50.get_config("demo")
    c.model.kwargs.width = 4
    c.data.image_size = 32
    c.train.warmup_epochs = 0.0  # the first step must move the weights
    c.train.update(train_overrides)
    return c


@pytest.fixture(scope="module")
def built():
    c = config()
    _, _, state = train.build(c)
    return c, state


def step_with(c, state, frozen, lr_multipliers=None):
    """One jitted train step; returns (new state, the step's jaxpr)."""
    if lr_multipliers:
        c = config(lr_multipliers=lr_multipliers)
    tx, _ = train.make_optimizer(c, 10, 100)
    trainable, _ = transfer.split(state["params"], frozen)
    s = dict(state, opt_state=tx.init(trainable), step=jnp.int32(0))
    step = train.make_train_step(train.train_graphdef(c, frozen), tx, c, jnp.ones(2), frozen)
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
    assert transfer.frozen_groups(c, 0.5) == {"stem", "stage1", "stage2", "stage3", "stage4",
                                              "backbone"}
    assert transfer.frozen_groups(c, 1.0) == {"stem", "stage1", "stage2", "stage3", "backbone"}
    assert transfer.frozen_groups(c, 4.2) == {"stem", "backbone"}
    assert transfer.frozen_groups(c, 5.0) == {"backbone"}  # no such group in a ResNet: all train
    with pytest.raises(ValueError, match="freeze='sometimes'"):
        transfer.frozen_groups(config(freeze="sometimes"), 0)


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


def test_progressive_stage_trains_only_what_is_thawed(built):
    c, state = built
    frozen = transfer.frozen_groups(config(freeze="progressive"), 1.5)  # stage4 thawed
    new, _ = step_with(c, state, frozen)
    assert groups_changed(state["params"], new["params"]) == {"stage4", "head"}


@pytest.mark.slow
def test_discriminative_learning_rates_scale_each_group(built):
    c, state = built
    multipliers = dict(stem=0.0, stage1=0.0, stage2=1.0, stage3=1.0, stage4=1.0, head=1.0)
    new, _ = step_with(c, state, frozenset(), multipliers)
    assert groups_changed(state["params"], new["params"]) == {"stage2", "stage3", "stage4",
                                                              "head"}
    with pytest.raises(ValueError, match="unknown groups"):
        train.make_optimizer(config(lr_multipliers={"stage9": 1.0}), 10, 100)


def test_graft_keeps_the_moments_of_groups_that_stay_trainable(built):
    c, state = built
    tx, _ = train.make_optimizer(c, 10, 100)
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


@pytest.mark.parametrize("head,names", [("dense", {"hidden", "head"}), ("lesion", {"lesion"})])
def test_every_deep_cnn_head_is_the_head_group(head, names):
    model = models.create("deep_cnn", widths=(4, 8), head=head, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grouped = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        grouped.setdefault(transfer.group(path), set()).add(path[0].key)
    assert grouped == {"backbone": {"blocks"}, "head": names}
