"""Training: `loop` runs a config in a workdir (`train_and_evaluate`), `step` builds the jitted
train step on its own, `data` prepares what a config reads. Losses are `pneumojax.losses`;
restoring and scoring a trained run is `pneumojax.inference`, which imports nothing from here.
"""

from pneumojax.training.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
