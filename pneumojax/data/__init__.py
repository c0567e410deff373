"""Chest X-ray data: the TFDS builder `chest_xray_pneumonia` (registered on import), readers."""

from pneumojax.data.builder import (ChestXrayPneumonia, config_name, default_data_dir,
                                    ensure_prepared, prepare)
from pneumojax.data.pipeline import (DeviceData, ImageLabels, data_source, device_batch,
                                     eval_batches, to_device, train_dataset)

__all__ = ["ChestXrayPneumonia", "DeviceData", "ImageLabels", "config_name", "data_source",
           "default_data_dir", "device_batch", "ensure_prepared", "eval_batches", "prepare",
           "to_device", "train_dataset"]
