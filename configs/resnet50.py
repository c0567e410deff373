r"""ResNet50 (torchvision topology, v1.5), 224 px.

    python -m pneumojax.main --config configs/resnet50.py
    python -m pneumojax.main --config configs/resnet50.py:demo    # synthetic data, < 3 min on a CPU

On several GPUs the same command uses all of them; `--config.model.dtype=bfloat16` for mixed
precision.
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.get_config()
    c.model.name = "resnet50"
    c.model.kwargs.variant = "v1.5"
    c.data.image_size = 224
    c.train.batch_size = 64
    c.train.epochs = 20.0
    c.train.learning_rate = 1e-3
    if arg == "demo":  # a narrow ResNet50 on 64 px phantoms: learns in under 3 CPU minutes
        c.data.source = "synthetic"
        c.data.synthetic_count = 400
        c.data.image_size = 64
        c.data.validation_fraction = 0.25
        c.model.kwargs.width = 8
        c.train.batch_size = 32
        c.train.eval_batch_size = 64
        c.train.epochs = 18.0
        c.train.learning_rate = 3e-3
        c.train.log_every = 5
    elif arg:
        raise ValueError(f"unknown argument {arg!r}; use configs/resnet50.py or :demo")
    return c
