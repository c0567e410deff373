"""PyTorch twins of `pneumojax.models`, for experiments/bench_train.py: the same topology, so the
two frameworks do the same arithmetic.

Same widths, 3x3 convs with padding 1 (XLA's 'SAME' at stride 1), no conv bias before batch
norm, batch norm eps 1e-5 and momentum 0.1 (nnx's 0.9), 2x2 max-pools that drop an odd last
row/column, global pooling (the mean, or log-sum-exp for `pool_r` > 0), the deep CNN's hidden
dense + ReLU + dropout, one logit, input standardisation inside the model and one input channel.
Initialisation is torch's default: it does not affect speed. `tests/test_torch_twins.py` checks
the parameter counts and the pooling. torch is an optional dependency (`.[torch]`): nothing else
in the package imports this module.
Tensors are NCHW (torch's convention); `channels_last` is the caller's choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def global_pool(x: torch.Tensor, r: float) -> torch.Tensor:
    """`pneumojax.models.cnn.global_pool` over NCHW: the mean, or log-sum-exp for r > 0."""
    if r == 0:
        return x.mean(dim=(2, 3))
    return (torch.logsumexp(r * x.flatten(2), dim=2) - math.log(x.shape[2] * x.shape[3])) / r


class Standardize(nn.Module):
    """(x - mean) / std per channel, as buffers: no parameters, as in pneumojax."""

    def __init__(self, in_channels: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        shape = (1, in_channels, 1, 1)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).expand(
            in_channels).reshape(shape).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).expand(
            in_channels).reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ShallowCNN(nn.Module):
    """pneumojax ShallowCNN: 3 x (conv3x3 with bias, ReLU, max-pool 2), global pooling, logit."""

    def __init__(self, *, in_channels: int = 1, width: int = 32, pool_r: float = 0.0,
                 input_mean: Sequence[float] = (0.5,), input_std: Sequence[float] = (0.25,)):
        super().__init__()
        self.standardize = Standardize(in_channels, input_mean, input_std)
        widths = (width, 2 * width, 4 * width)
        self.pool_r = pool_r
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *widths[:-1]), widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.standardize(x))
        return self.head(global_pool(x, self.pool_r))[:, 0]


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """pneumojax ConvBlock: 2 x (conv3x3 no bias, BN, ReLU), then a 2x2 max-pool."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, momentum=0.1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, momentum=0.1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2))


class DeepCNN(nn.Module):
    """pneumojax DeepCNN: conv blocks, global pooling, dense(hidden) + ReLU + dropout, logit."""

    def __init__(self, *, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128, 256),
                 hidden: int = 128, dropout: float = 0.5, pool_r: float = 0.0,
                 input_mean: Sequence[float] = (0.5,), input_std: Sequence[float] = (0.25,)):
        super().__init__()
        self.pool_r = pool_r
        self.standardize = Standardize(in_channels, input_mean, input_std)
        self.blocks = nn.Sequential(*[conv_block(c_in, c_out) for c_in, c_out
                                      in zip((in_channels, *widths[:-1]), widths)])
        self.hidden = nn.Linear(widths[-1], hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = global_pool(self.blocks(self.standardize(x)), self.pool_r)
        return self.head(self.dropout(torch.relu(self.hidden(x))))[:, 0]


class Bottleneck(nn.Module):
    """pneumojax / torchvision bottleneck; `variant` moves the stride and adds conv biases."""

    def __init__(self, c_in: int, planes: int, stride: int, variant: str):
        super().__init__()
        v1 = variant == "v1"
        eps = 1.001e-5 if v1 else 1e-5
        c_out = planes * 4
        s1, s3 = (stride, 1) if v1 else (1, stride)
        self.conv1 = nn.Conv2d(c_in, planes, 1, stride=s1, bias=v1)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s3, padding=1, bias=v1)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=v1)
        self.bn3 = nn.BatchNorm2d(c_out, eps=eps)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=v1),
                                         nn.BatchNorm2d(c_out, eps=eps))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNet50(nn.Module):
    """pneumojax ResNet50 (torchvision topology), `width` / `stage_sizes` as there."""

    def __init__(self, *, in_channels: int = 1, variant: str = "v1.5", width: int = 64,
                 stage_sizes: Sequence[int] = (3, 4, 6, 3), zero_init_residual: bool = False,
                 pool_r: float = 0.0, input_mean: Sequence[float] = (0.5,),
                 input_std: Sequence[float] = (0.25,)):
        super().__init__()
        v1 = variant == "v1"
        self.pool_r = pool_r
        self.standardize = Standardize(in_channels, input_mean, input_std)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=v1),
            nn.BatchNorm2d(width, eps=1.001e-5 if v1 else 1e-5), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1))
        blocks, c_in = [], width
        for s, size in enumerate(stage_sizes):
            planes = width * 2**s
            for b in range(size):
                blocks.append(Bottleneck(c_in, planes, 2 if s > 0 and b == 0 else 1, variant))
                c_in = planes * 4
        self.blocks = nn.Sequential(*blocks)
        if zero_init_residual:
            for block in blocks:
                nn.init.zeros_(block.bn3.weight)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.standardize(x)))
        return self.head(global_pool(x, self.pool_r))[:, 0]


MODELS: dict[str, type[nn.Module]] = {
    "shallow_cnn": ShallowCNN, "deep_cnn": DeepCNN, "resnet50": ResNet50}


def create(name: str, **kwargs) -> nn.Module:
    return MODELS[name](**kwargs)
