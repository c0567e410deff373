r"""Shallow CNN: three conv layers, a baseline that trains in minutes on a CPU.

    python -m pneumojax.main --config configs/shallow_cnn.py
    python -m pneumojax.main --config configs/shallow_cnn.py:cpu \
        --config.data.source=folder:PATH/chest_xray --workdir workdirs/shallow_cnn_cpu
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.get_config()
    c.model.name = "shallow_cnn"
    c.model.kwargs.width = 32
    c.data.image_size = 128
    c.train.epochs = 20.0
    if arg == "cpu":
        c.data.image_size = 64
        c.train.epochs = 10.0
    elif arg:
        raise ValueError(f"unknown argument {arg!r}; use configs/shallow_cnn.py or :cpu")
    return c
