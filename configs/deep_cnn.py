r"""Deep CNN: 4 conv blocks with batch norm, a dense head with dropout.

    python -m pneumojax.main --config configs/deep_cnn.py
    python -m pneumojax.main --config configs/deep_cnn.py:cpu \
        --config.data.source=folder:PATH/chest_xray --workdir workdirs/deep_cnn_cpu

`:cpu` is sized to train on real X-rays on a 2-core CPU within 30 minutes. `:robust` is `:cpu`
with the lever that carried it best to an unseen cohort on the proxy of docs/cohort.md:
photometric augmentation aimed at acquisition shift (exposure, contrast, gamma, blur, noise).
"""

from configs import common


def get_config(arg: str | None = None):
    c = common.get_config()
    c.model.name = "deep_cnn"
    c.model.kwargs.widths = (32, 64, 128, 256)
    c.model.kwargs.dropout = 0.5
    c.data.image_size = 128
    c.train.epochs = 30.0
    if arg in ("cpu", "robust"):
        c.data.image_size = 64
        c.model.kwargs.widths = (16, 32, 64, 128)
        c.train.batch_size = 32
        c.train.epochs = 12.0
    if arg == "robust":
        c.data.augment.update(brightness=0.2, contrast=0.3, gamma=0.4, blur=1.0, noise=0.03)
    elif arg not in (None, "cpu"):
        raise ValueError(f"unknown argument {arg!r}; use configs/deep_cnn.py, :cpu or :robust")
    return c
