r"""ResNet50 (torchvision topology, v1.5), 224 px, fine-tuned from ImageNet.

    python -m pneumojax.weights fetch resnet50 --source torchvision-v2   # once
    python -m pneumojax.main --config configs/resnet50.py --config.data.source=folder:PATH
    python -m pneumojax.main --config configs/resnet50.py:demo    # synthetic, scratch, < 3 CPU min
    python -m pneumojax.main --config configs/resnet50.py:scratch --config.data.source=folder:PATH
    python -m pneumojax.main --config configs/resnet50.py:cpu --config.data.source=folder:PATH

Other weights: `--config.model.init=imagenet:timm-a1` (or torchvision-v1), or
`imagenet:keras --config.model.kwargs.variant=v1`; `--config.model.init=scratch` trains from
random weights. `--config.train.freeze=backbone` extracts features, `progressive` unfreezes
stage4, stage3, ... at `train.unfreeze_epochs`. `:scratch` is the same ResNet50 from random
weights (one learning rate for all layers); `:cpu` trains it at 64 px for 1 epoch, about 25
minutes on a 2-core CPU (about 4 images/s). On several GPUs the same command uses all of
them; `--config.model.dtype=bfloat16` for mixed precision.
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.get_config()
    c.model.name = "resnet50"
    c.model.kwargs.variant = "v1.5"
    c.data.image_size = 224
    c.train.batch_size = 64
    c.train.epochs = 20.0
    c.model.init = "imagenet:torchvision-v2"
    c.train.learning_rate = 3e-4
    # Discriminative learning rates: generic early features move least.
    c.train.lr_multipliers.update(dict(stem=0.1, stage1=0.1, stage2=0.3, stage3=0.5))
    if arg == "demo":  # a narrow ResNet50 on 64 px phantoms: learns in under 3 CPU minutes
        c.model.init = "scratch"
        c.train.lr_multipliers.update(dict(stem=1.0, stage1=1.0, stage2=1.0, stage3=1.0))
        c.data.source = "synthetic"
        c.data.synthetic_count = 400
        c.data.image_size = 64
        c.data.validation_fraction = 0.25
        c.model.kwargs.width = 8
        c.train.batch_size = 32
        c.train.eval_batch_size = 64
        # From scratch on 300 images its first steps are chaotic: a run can sit at chance for
        # up to ten epochs before it learns, and which run does changes with float rounding
        # (docs/cpu-performance.md, "A change taken back"). 30 epochs and a patience of 10 let
        # all learn.
        c.train.epochs = 30.0
        c.train.patience = 10
        c.train.learning_rate = 3e-3
        c.train.log_every = 5
    elif arg in ("scratch", "cpu"):  # full width; random weights need no discriminative rates
        c.model.init = "scratch"
        c.train.learning_rate = 1e-3
        c.train.lr_multipliers.update(dict(stem=1.0, stage1=1.0, stage2=1.0, stage3=1.0))
        if arg == "cpu":
            c.data.image_size = 64
            c.train.batch_size = 32
            c.train.epochs = 1.0
    elif arg:
        raise ValueError(f"unknown argument {arg!r}; use configs/resnet50.py, :demo, :scratch "
                         "or :cpu")
    return c
