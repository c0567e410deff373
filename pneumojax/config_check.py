"""Every field of a training config, checked before any work: a typo found after an hour of
data preparation, or one that trains the wrong thing without a word, costs more than this file.

`FIELDS` is the schema: each field of `pneumojax/defaults.py` with the rule its value must meet
(`model.kwargs` goes to the model's constructor, which states its own arguments). `validate`
reports every broken rule on one line, each naming the field, what is wrong and the flag that
sets it, as a `cli.UserError`; fields the schema does not know are typos and are named with the
closest known field.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections

from pneumojax import cli, losses, metrics, models, transfer
from pneumojax.data import augment, intensity, sources

Rule = Callable[[Any], str | None]  # a value -> what is wrong with it, or None
Node = ml_collections.ConfigDict | dict  # ConfigDict is no collections.abc.Mapping

DTYPES = ("float32", "bfloat16")  # bfloat16: mixed precision (parameters stay float32)
SOURCES = ("folder:PATH", "medmnist", "synthetic")


def _number(low: float, high: float = math.inf, *, open_low: bool = False,
            open_high: bool = False) -> Rule:
    if high == math.inf:
        wanted = f"a number {'above' if open_low else 'at least'} {low:g}"
    else:
        brackets = ("(" if open_low else "[", ")" if open_high else "]")
        wanted = f"a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}"

    def rule(value: Any) -> str | None:
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value) and (low < value if open_low else low <= value)
              and (value < high if open_high else value <= high))
        return None if ok else f"must be {wanted}"
    return rule


def _integer(minimum: int, maximum: int | None = None) -> Rule:
    wanted = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def rule(value: Any) -> str | None:
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
              and (maximum is None or value <= maximum))
        return None if ok else f"must be an integer, {wanted}"
    return rule


def _choice(options: dict[str, Any] | tuple[str, ...]) -> Rule:
    def rule(value: Any) -> str | None:
        ok = isinstance(value, str) and value in options
        return None if ok else f"choose one of {', '.join(options)}"
    return rule


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def _optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be text"


def _arguments(value: Any) -> str | None:
    """The model's constructor arguments; `validate` checks them against the model."""
    return None if isinstance(value, Node) else "must be a ConfigDict of keyword arguments"


def _init(value: Any) -> str | None:
    """scratch, or imagenet:SOURCE with a source `pneumojax.weights` knows."""
    from pneumojax import weights

    kind, _, name = str(value).partition(":")
    known = weights.source_names()
    if value == "scratch" or (kind == "imagenet" and name in known):
        return None
    return f"choose scratch or imagenet:SOURCE with SOURCE one of {', '.join(known)}"


def _source(value: Any) -> str | None:
    if value in SOURCES[1:]:
        return None
    if not (isinstance(value, str) and value.startswith("folder:")):
        return f"choose one of {', '.join(SOURCES)}"
    if not sources.folder_of(value).is_dir():
        return "names no folder; give folder:PATH of a folder of train/, val/, test/"
    return None


def _threshold(value: Any) -> str | None:
    """Whatever `metrics.choose_threshold` accepts, tried on two examples."""
    wanted = (f"choose one of {', '.join(metrics.CRITERIA)}, e.g. sensitivity:0.95 (in [0, 1]) "
              "or prevalence:0.1 (in (0, 1))")
    if not isinstance(value, str):
        return wanted
    try:
        metrics.choose_threshold([0, 1], [0.2, 0.8], value)
    except ValueError:
        return wanted
    return None


def _epochs(value: Any) -> str | None:
    longest = max((cls.UNFREEZE_ORDER for cls in models.MODELS.values()), key=len)
    wanted = (f"must be up to {len(longest)} epochs at least 0, at which the groups of the "
              f"model's UNFREEZE_ORDER thaw in turn (e.g. {', '.join(longest)})")
    if not isinstance(value, tuple | list) or len(value) > len(longest):
        return wanted
    return wanted if any(_number(0)(e) for e in value) else None


def _zoom(value: Any) -> str | None:
    ok = (isinstance(value, tuple | list) and len(value) == 2
          and not any(_number(0, open_low=True)(z) for z in value) and value[0] <= value[1])
    return None if ok else "must be (low, high) scales with 0 < low <= high"


FIELDS: dict[str, Rule] = {
    "model.name": _choice(models.MODELS),
    "model.init": _init,
    "model.dtype": _choice(DTYPES),
    "model.kwargs": _arguments,
    "data.source": _source,
    "data.data_dir": _optional(_text),
    "data.image_size": _integer(32),  # the models' smallest input
    "data.validation_fraction": _number(0, 1, open_low=True, open_high=True),
    "data.split_seed": _integer(0),
    "data.synthetic_count": _integer(2),
    "data.num_workers": _integer(0),
    "data.device_resident": _boolean,
    "data.holdout": _text,
    "data.intensity": _choice(intensity.METHODS),
    "data.tta_views": _integer(1, len(augment.TTA_VIEWS)),  # the views defined
    "data.augment.enabled": _boolean,
    "data.augment.rotation_deg": _number(0, 180),
    "data.augment.translate": _number(0, 1, open_high=True),
    "data.augment.zoom": _zoom,
    "data.augment.hflip": _boolean,
    "data.augment.brightness": _number(0, 1),
    "data.augment.contrast": _number(0, 1),
    "data.augment.gamma": _number(0, 2),
    "data.augment.blur": _number(0, 8),
    "data.augment.noise": _number(0, 1),
    "train.seed": _integer(0),
    "train.batch_size": _integer(1),
    "train.eval_batch_size": _integer(1),
    "train.epochs": _number(0, open_low=True),
    "train.learning_rate": _number(0, open_low=True),
    "train.warmup_epochs": _number(0),
    "train.end_lr_factor": _number(0, 1),
    "train.weight_decay": _number(0),
    "train.grad_clip": _number(0, open_low=True),
    "train.loss": _choice(losses.LOSSES),
    "train.label_smoothing": _number(0, 1, open_high=True),
    "train.mixup": _number(0),
    "train.lesion_weight": _number(0),
    "train.class_weights": _boolean,
    "train.eval_every": _integer(0),
    "train.log_every": _integer(1),
    "train.patience": _integer(0),
    "train.threshold": _threshold,
    "train.calibrate": _boolean,
    "train.freeze": _choice(transfer.FREEZE_MODES),
    "train.unfreeze_epochs": _epochs,
    **{f"train.lr_multipliers.{g}": _number(0) for g in transfer.groups()},
    "train.num_devices": _optional(_integer(1)),
    "checkpoint.keep": _integer(1),
}
OPTIONAL = {f"train.lr_multipliers.{g}" for g in transfer.groups()}  # a missing one keeps 1.0


def leaves(config: Node, prefix: str = "", whole: tuple[str, ...] = ("model.kwargs",)
           ) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every field below `config`; each of `whole` is one field."""
    for key, value in config.items():
        if isinstance(value, Node) and prefix + key not in whole:
            yield from leaves(value, f"{prefix}{key}.", whole)
        else:
            yield prefix + key, value


def _problem(path: str, value: Any, why: str, fix: str = "") -> str:
    return f"config field {path}={value!r}: {why}; {fix or f'set --config.{path}'}"


def unknown_field(config: Node, path: str) -> str | None:
    """What is wrong with `--config.PATH` if `config` has no such field (with the closest one
    it has), or None. ml_collections would answer with a traceback."""
    node, walked = config, []
    for part in path.split("."):
        if isinstance(node, Node) and part in node:
            node = node[part]
            walked.append(part)
            continue
        options = sorted(node) if isinstance(node, Node) else []
        close = difflib.get_close_matches(part, options, n=1)
        where = ".".join(walked) or "the config"
        hint = (f"did you mean --config.{'.'.join([*walked, close[0]])}?" if close else
                f"its fields are {', '.join(options)}" if options else "it has no fields")
        return f"--config.{path}: {where} has no field {part!r}; {hint}"
    return None


def field_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Each field against its rule, every field the schema lacks, every rule without a field."""
    found = dict(leaves(config))
    problems = []
    for path, value in found.items():
        if path not in FIELDS:
            close = difflib.get_close_matches(path, FIELDS, n=1)
            problems.append(f"config field {path}: no such field"
                            + (f"; did you mean {close[0]}?" if close else ""))
        elif why := FIELDS[path](value):
            problems.append(_problem(path, value, why))
    problems += [f"config field {path}: missing; build configs on pneumojax.defaults.get_config()"
                 for path in FIELDS if path not in found and path not in OPTIONAL]
    return problems


def _mesh_problems(config: ml_collections.ConfigDict, devices: int, processes: int
                   ) -> Iterator[str]:
    wanted = config.train.num_devices
    if wanted is not None and wanted > devices:
        yield _problem("train.num_devices", wanted, f"only {devices} devices exist")
        return
    mesh = wanted or devices
    for field in ("batch_size", "eval_batch_size"):
        size = config.train[field]
        for count, what in ((mesh, "devices of the mesh"), (processes, "processes")):
            if size % count:
                yield _problem(f"train.{field}", size, f"must be a multiple of the {count} {what}")


def _model_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    """model.kwargs against the constructor (names, then values, built abstractly: no
    memory, 0.5 s for ResNet50), model.init against the model."""
    from flax import nnx

    name, kwargs = config.model.name, dict(config.model.get("kwargs", {}))
    params = inspect.signature(models.MODELS[name].__init__).parameters
    accepted = [p for p in params if p not in ("self", "in_channels", "dtype", "rngs")]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        yield (f"config field model.kwargs.{unknown[0]}: {name} takes no such argument; its "
               f"arguments are {', '.join(accepted)}")
        return
    try:
        nnx.eval_shape(lambda: models.create(name, in_channels=1, rngs=nnx.Rngs(0), **kwargs))
    except (TypeError, ValueError) as e:
        yield f"config field model.kwargs={kwargs}: {name} rejects it: {cli.one_line(e)}"
        return
    init = config.model.init
    if init != "scratch":
        from pneumojax import weights

        source = init.partition(":")[2]
        if source not in weights.SOURCES.get(name, {}):
            ported = [f"{m} ({', '.join(s)})" for m, s in weights.SOURCES.items()]
            yield _problem("model.init", init, f"{name} has no such ImageNet weights; they "
                           f"exist for {', '.join(ported)}", "set --config.model.init=scratch")
        elif (variant := weights.SOURCES[name][source].variant) and kwargs.get(
                "variant", "v1.5") != variant:
            yield _problem("model.init", init, f"these are ResNet50 {variant} weights",
                           f"add --config.model.kwargs.variant={variant}")


def _scores_cells(name: str, kwargs: dict) -> bool:
    """Whether model `name` built with `kwargs` records `lesion_logits` (its `LESION_KWARGS`)."""
    cls = models.MODELS[name]
    wanted = getattr(cls, "LESION_KWARGS", None)
    defaults = inspect.signature(cls.__init__).parameters
    return wanted is not None and all(
        kwargs.get(k, defaults[k].default if k in defaults else None) == v
        for k, v in wanted.items())


def _training_problems(config: ml_collections.ConfigDict) -> Iterator[str]:
    t = config.train
    if t.lesion_weight > 0 and config.data.source != "synthetic":
        yield _problem("train.lesion_weight", t.lesion_weight,
                       "> 0 needs lesion masks, which only the synthetic source has, not "
                       f"{config.data.source!r}")
    if t.lesion_weight > 0 and not _scores_cells(config.model.name, dict(config.model.kwargs)):
        fixes = [f"{n} with " + " ".join(f"--config.model.kwargs.{k}={v}"
                                         for k, v in cls.LESION_KWARGS.items())
                 for n, cls in models.MODELS.items() if getattr(cls, "LESION_KWARGS", None)]
        yield _problem("train.lesion_weight", t.lesion_weight, "> 0 needs a model that "
                       "scores cells", f"use {' or '.join(fixes)}")
    if t.mixup > 0 and t.lesion_weight > 0:
        yield _problem("train.mixup", t.mixup, "> 0 blends two images into one, whose lesion "
                       "mask is neither's, so it cannot go with train.lesion_weight > 0",
                       "set --config.train.mixup=0 or --config.train.lesion_weight=0")
    if t.threshold.startswith("prevalence:") and not t.calibrate:
        yield _problem("train.threshold", t.threshold, "the Bayes threshold for a prevalence "
                       "assumes calibrated probabilities", "add --config.train.calibrate=True")


def validate(config: ml_collections.ConfigDict, *, devices: int, processes: int = 1) -> None:
    """Raises `cli.UserError` naming every broken rule, on one line; `devices` and
    `processes` are what the batch is sharded over."""
    problems = field_problems(config)
    if not problems:  # the checks across fields assume each field is sound
        problems = [*_mesh_problems(config, devices, processes), *_model_problems(config),
                    *_training_problems(config)]
    if len(problems) == 1:
        raise cli.UserError(problems[0])
    if problems:
        raise cli.UserError(f"{len(problems)} problems: "
                            + " ".join(f"({i}) {p}." for i, p in enumerate(problems, 1)))
