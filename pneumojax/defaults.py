"""The defaults of every config field. Each file in configs/ starts from `get_config()` here
and changes a few fields; a run's saved config.json is completed from them (a field added
since the run was made gets its default), so a workdir is read the same wherever a command
runs, with or without a checkout of configs/."""

import dataclasses

import ml_collections
from ml_collections import config_dict

from pneumojax.data.augment import AugmentConfig


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        name="deep_cnn",
        init="scratch",                  # or imagenet:SOURCE (see pneumojax.weights)
        dtype="float32",                 # "bfloat16": mixed precision, parameters stay float32
        # Passed to the model's constructor. pool_r: global pooling, 0 = mean, r > 0 log-sum-exp.
        kwargs=ml_collections.ConfigDict(dict(pool_r=0.0)),
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",              # folder:PATH | medmnist | synthetic
        data_dir=config_dict.placeholder(str),  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
        image_size=64,
        validation_fraction=0.1,
        split_seed=0,                    # seed of the patient-disjoint validation split; kept
                                         # apart from train.seed so seed ensembles share it
        synthetic_count=1200,
        num_workers=0,                   # grain worker processes; 0 reads in threads
        device_resident=False,           # train split on the accelerator, no host work per step
        holdout="",                      # file-name prefix of a sub-cohort of train held out as
                                         # a whole (split "holdout"), e.g. NORMAL2-; "" = none
        intensity="none",                # none | equalize | clahe: the same in train, eval, predict
        tta_views=1,                     # test-time augmentation: views averaged (1 = none)
        augment=ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig())),
    ))
    c.train = ml_collections.ConfigDict(dict(
        seed=0,
        batch_size=64,                   # global, over all devices and hosts
        eval_batch_size=128,
        epochs=10.0,
        learning_rate=1e-3,
        warmup_epochs=0.5,
        end_lr_factor=0.01,              # cosine decay to learning_rate * end_lr_factor
        weight_decay=1e-4,
        grad_clip=1.0,                   # global norm
        loss="bce",                      # pneumojax.training.losses.LOSSES: bce | focal
        label_smoothing=0.0,
        mixup=0.0,                       # Beta(a, a) mixing of example pairs; 0 = off
        lesion_weight=0.0,               # > 0: also fit per-cell lesion scores to the masks
                                         # (synthetic data, deep_cnn head="lesion")
        class_weights=True,              # inverse class frequency of the train split
        eval_every=0,                    # steps between validation runs; 0 = once per epoch
        log_every=20,
        patience=5,                      # validation runs without a better ROC-AUC before stopping
        threshold="youden",              # criterion for the decision threshold chosen on validation
        calibrate=False,                 # temperature scaling fitted on validation
        freeze="none",                   # none | backbone (feature extraction) | progressive
        unfreeze_epochs=(1, 2, 3, 4, 5),  # progressive: epochs at which stage4, 3, 2, 1, stem thaw
        lr_multipliers=ml_collections.ConfigDict(dict(  # discriminative learning rates per group
            stem=1.0, stage1=1.0, stage2=1.0, stage3=1.0, stage4=1.0, backbone=1.0, head=1.0,
            entry=1.0, middle=1.0, exit=1.0)),
        num_devices=config_dict.placeholder(int),  # default: all devices
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(keep=2))
    return c
