r"""Xception (Keras topology), 299 px, fine-tuned from Keras's ImageNet weights.

    python -m pneumojax.weights fetch xception --source keras   # once
    python -m pneumojax.main --config configs/xception.py --config.data.source=folder:PATH
    python -m pneumojax.main --config configs/xception.py:cpu --config.data.source=folder:PATH
    python -m pneumojax.main --config configs/xception.py:cpu_frozen \
        --config.data.source=folder:PATH
    python -m pneumojax.main --config configs/xception.py:demo     # synthetic, tiny, scratch

Offline, the same weights come out of a Keras model that embeds them, e.g. the classifier of
the PyPI package pneumonia-model-package 0.3.0 (docs/weights.md):
`python -m pneumojax.weights convert FILE.keras --model xception --source keras
--submodel xception`.

The variants:
- (none): every layer trains from the start, with discriminative learning rates (the
  generic early flows move least); a GPU run.
- `:frozen`: feature extraction, the backbone frozen (`train.freeze=backbone`), 299 px.
- `:scratch`: the same Xception from random weights, one learning rate.
- `:cpu`: 128 px on a 2-core CPU: the head alone for an epoch, then the exit flow, then the
  middle flow too (`train.freeze=progressive`), 4 epochs in about 25 minutes; the entry flow
  and the stem stay frozen, since their gradients at 64 and 32 px cost most and move least.
- `:cpu_frozen`: `:frozen` at 128 px for 5 epochs, about 8 minutes on a 2-core CPU.
- `:cpu_scratch`: `:scratch` at 128 px for 2 epochs, about 35 minutes on a 2-core CPU: the
  control for what the ImageNet weights buy at the same size.
- `:demo`: a narrow Xception on 64 px phantoms, from scratch, for a first look in minutes.
"""

from configs import common

VARIANTS = ("frozen", "scratch", "cpu", "cpu_frozen", "cpu_scratch", "demo")


def get_config(arg: str | None = None):
    if arg not in (None, *VARIANTS):
        raise ValueError(f"unknown argument {arg!r}; use configs/xception.py or one of "
                         + ", ".join(f":{v}" for v in VARIANTS))
    c = common.get_config()
    c.model.name = "xception"
    c.model.init = "imagenet:keras"
    c.data.image_size = 299
    c.train.batch_size = 32
    c.train.epochs = 10.0
    c.train.learning_rate = 1e-3
    # The head learns at the full rate; the ImageNet layers at a tenth or less.
    c.train.lr_multipliers.update(dict(stem=0.01, entry=0.03, middle=0.1, exit=0.1))
    if arg in ("frozen", "cpu_frozen"):
        c.train.freeze = "backbone"
    if arg == "cpu":
        c.train.freeze = "progressive"
        c.train.unfreeze_epochs = (1, 2)  # exit flow, then middle flow; entry and stem stay
    if arg in ("cpu", "cpu_frozen", "cpu_scratch"):
        c.data.image_size = 128
        c.train.epochs = {"cpu": 4.0, "cpu_frozen": 5.0, "cpu_scratch": 2.0}[arg]
    if arg in ("scratch", "cpu_scratch", "demo"):
        c.model.init = "scratch"
        c.train.lr_multipliers.update(dict(stem=1.0, entry=1.0, middle=1.0, exit=1.0))
    if arg == "demo":
        c.data.source = "synthetic"
        c.data.synthetic_count = 400
        c.data.image_size = 64
        c.data.validation_fraction = 0.25
        c.model.kwargs.widths = (16, 32, 32, 64, 64, 64, 96, 128)
        c.model.kwargs.middle_blocks = 2
        c.train.epochs = 15.0
        c.train.log_every = 5
    return c
