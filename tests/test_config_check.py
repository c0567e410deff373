"""config_check: every field of a training config is checked, and a broken rule is one line that
names the field, what is wrong and the flag that fixes it."""

import dataclasses

import pytest

from configs import common, deep_cnn, resnet50, shallow_cnn
from pneumojax import cli, config_check
from pneumojax.data.augment import AugmentConfig

SHIPPED = [(resnet50, None), (resnet50, "demo"), (resnet50, "scratch"), (resnet50, "cpu"),
           (deep_cnn, None), (deep_cnn, "cpu"), (deep_cnn, "robust"), (shallow_cnn, None),
           (shallow_cnn, "cpu")]


def problem(config, devices: int = 1, processes: int = 1) -> str:
    with pytest.raises(cli.UserError) as caught:
        config_check.validate(config, devices=devices, processes=processes)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("module,arg", SHIPPED)
def test_every_shipped_config_passes(module, arg):
    config_check.validate(module.get_config(arg), devices=1)


def test_the_schema_has_a_rule_for_each_field_of_the_defaults_and_no_other():
    fields = dict(config_check.leaves(common.get_config()))
    assert set(fields) == set(config_check.FIELDS)
    assert {f"data.augment.{f.name}" for f in dataclasses.fields(AugmentConfig)} == {
        k for k in fields if k.startswith("data.augment.")}


@pytest.mark.parametrize("field,value,says", [
    ("train.batch_size", 0, "must be an integer, at least 1"),
    ("train.eval_batch_size", -8, "must be an integer, at least 1"),
    ("train.epochs", 0.0, "must be a number above 0"),
    ("train.epochs", float("inf"), "must be a number above 0"),
    ("train.grad_clip", float("nan"), "must be a number above 0"),
    ("train.learning_rate", -1e-3, "must be a number above 0"),
    ("train.patience", -1, "at least 0"),
    ("data.validation_fraction", 1.0, "must be a number in (0, 1)"),
    ("data.validation_fraction", 0.0, "must be a number in (0, 1)"),
    ("train.label_smoothing", 1.0, "must be a number in [0, 1)"),
    ("train.end_lr_factor", 1.5, "must be a number in [0, 1]"),
    ("data.augment.brightness", -0.1, "must be a number in [0, 1]"),
    ("data.augment.zoom", (1.2, 0.9), "0 < low <= high"),
    ("data.augment.blur", 9.0, "must be a number in [0, 8]"),
    ("data.intensity", "histogram", "choose one of none, equalize, clahe"),
    ("data.tta_views", 8, "must be an integer, from 1 to 7"),
    ("data.image_size", 16, "at least 32"),
    ("checkpoint.keep", 0, "at least 1"),
    ("train.freeze", "nonee", "choose one of none, backbone, progressive"),
    ("train.threshold", "youdn", "choose one of youden, f1, balanced_accuracy, sensitivity:"),
    ("train.threshold", "sensitivity:1.5", "e.g. sensitivity:0.95"),
    ("train.threshold", "sensitivity:high", "e.g. sensitivity:0.95"),
    ("model.init", "imagenet:torchvision", "imagenet:SOURCE with SOURCE one of keras, "
                                           "torchvision-v1, torchvision-v2, timm-a1"),
    ("model.init", "random", "choose scratch or imagenet:SOURCE"),
    ("model.dtype", "float64", "choose one of float32, bfloat16"),
    ("model.name", "resnet", "choose one of shallow_cnn, deep_cnn, resnet50"),
    ("data.source", "kaggle", "choose one of folder:PATH, medmnist, synthetic"),
    ("data.source", "folder:/no/such/folder", "names no folder"),
    ("train.unfreeze_epochs", (1, -2), "up to 5 epochs at least 0"),
    ("train.unfreeze_epochs", (1, 2, 3, 4, 5, 6), "up to 5 epochs at least 0"),
    ("train.lr_multipliers.head", -1.0, "at least 0"),
])
def test_a_value_out_of_range_names_the_field_the_rule_and_the_flag(field, value, says):
    c = shallow_cnn.get_config()
    section, name = field.rsplit(".", 1)
    node = c
    for part in section.split("."):
        node = node[part]
    node[name] = value
    message = problem(c)
    assert message.startswith(f"config field {field}={value!r}: ")
    assert says in message and message.endswith(f"set --config.{field}")


def test_a_misspelt_field_gets_the_closest_one():
    c = shallow_cnn.get_config()
    c.train.epoch = 3.0  # a config file can add fields; the command line cannot
    assert problem(c) == "config field train.epoch: no such field; did you mean train.epochs?"
    c = shallow_cnn.get_config()
    del c.train["patience"]
    assert problem(c) == ("config field train.patience: missing; build configs on "
                          "pneumojax.defaults.get_config()")


def test_an_override_of_a_missing_field_is_named_with_the_closest_one():
    c = shallow_cnn.get_config()
    assert config_check.unknown_field(c, "train.epochs") is None
    assert config_check.unknown_field(c, "train.epoch") == (
        "--config.train.epoch: train has no field 'epoch'; did you mean --config.train.epochs?")
    assert config_check.unknown_field(c, "trian.epochs") == (
        "--config.trian.epochs: the config has no field 'trian'; did you mean --config.train?")
    assert config_check.unknown_field(c, "model.kwargs.widht") == (
        "--config.model.kwargs.widht: model.kwargs has no field 'widht'; did you mean "
        "--config.model.kwargs.width?")
    assert config_check.unknown_field(c, "model.kwargs.zzz") == (
        "--config.model.kwargs.zzz: model.kwargs has no field 'zzz'; its fields are pool_r, "
        "width")


def test_batches_split_evenly_over_the_mesh_and_the_processes():
    c = shallow_cnn.get_config()
    c.train.batch_size = 30
    assert problem(c, devices=4) == ("config field train.batch_size=30: must be a multiple of "
                                     "the 4 devices of the mesh; set --config.train.batch_size")
    c.train.batch_size = 64
    assert "config field train.eval_batch_size=128: must be a multiple of the 3 processes" in (
        problem(c, devices=6, processes=3))
    c.train.num_devices = 8
    assert problem(c, devices=4).startswith("config field train.num_devices=8: only 4 devices")
    c.train.num_devices = 2
    c.train.batch_size = 6  # a multiple of the 2 devices it asks for, not of all 4
    config_check.validate(c, devices=4)


def test_the_model_arguments_are_checked_against_the_model():
    c = deep_cnn.get_config()
    c.model.name = "shallow_cnn"
    assert problem(c) == ("config field model.kwargs.dropout: shallow_cnn takes no such "
                          "argument; its arguments are width, pool_r, input_mean, input_std")
    c = deep_cnn.get_config()
    c.model.kwargs.head = "lesionn"
    assert "deep_cnn rejects it: unknown head 'lesionn'; valid: dense, lesion" in problem(c)


def test_the_fields_that_depend_on_each_other_agree():
    c = shallow_cnn.get_config()
    c.model.init = "imagenet:torchvision-v2"
    assert ("shallow_cnn has no such ImageNet weights; they exist for resnet50 (keras, "
            "torchvision-v1, torchvision-v2, timm-a1), xception (keras); set "
            "--config.model.init=scratch") in problem(c)
    c = resnet50.get_config()
    c.model.init = "imagenet:keras"
    assert "these are ResNet50 v1 weights; add --config.model.kwargs.variant=v1" in problem(c)
    c = shallow_cnn.get_config()
    c.train.freeze = "progressive"  # every model declares its UNFREEZE_ORDER (CNNs: backbone)
    config_check.validate(c, devices=1)
    c = deep_cnn.get_config()
    c.train.lesion_weight = 1.0
    assert "needs a model that scores cells; use deep_cnn with --config.model.kwargs.head=" in (
        problem(c))
    c.model.kwargs.head = "lesion"
    c.data.source = "medmnist"
    assert "only the synthetic source has, not 'medmnist'" in problem(c)


def test_every_problem_is_on_the_one_line():
    c = shallow_cnn.get_config()
    c.train.epochs = -1.0
    c.train.freeze = "all"
    assert problem(c) == (
        "2 problems: (1) config field train.epochs=-1.0: must be a number above 0; set "
        "--config.train.epochs. (2) config field train.freeze='all': choose one of none, "
        "backbone, progressive; set --config.train.freeze.")
